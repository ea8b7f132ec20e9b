"""Sync task code on threads that a stopping worker can stop waiting for.

A thread cannot be interrupted. ``trio.to_thread.run_sync`` offers two choices when the
waiting task is cancelled: wait until the thread returns (``abandon_on_cancel=False``), or
return at once and leave the thread running (``True``). A worker needs the first while it
runs (a cancelled or timed-out run keeps its thread until the thread returns) and the
second once its grace period is over (stopping must not wait for a thread that sleeps on).

:class:`ThreadWaits` gives both: its threads run with ``abandon_on_cancel=True`` (so the
thread's ``trio.from_thread.check_cancelled()`` sees a cancellation, as with either
choice), and a cancelled caller then waits, shielded, until the thread returns, unless the
owner calls :meth:`ThreadWaits.give_up`. A thread given up on runs on in the background;
whatever it returns or raises is discarded.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import TypeVar

import attrs
import trio

log = logging.getLogger("trioworker.worker")

T = TypeVar("T")


@attrs.define(eq=False)
class ThreadWaits:
    """A worker's hold on the threads of its sync runs (see the module docstring)."""

    #: True once :meth:`give_up` was called: cancelled callers no longer wait.
    given_up: bool = False
    #: Callers waiting for a cancelled thread to return -> what the thread runs.
    _waiting: dict[trio.CancelScope, str] = attrs.field(factory=dict)

    @property
    def waiting(self) -> list[str]:
        """What the threads being waited for run (labels, e.g. ``"run <id> of <key>"``)."""
        return list(self._waiting.values())

    def give_up(self) -> None:
        """Stop waiting for every thread now and later; their results will be discarded."""
        self.given_up = True
        for scope in list(self._waiting):
            scope.cancel()

    async def run_sync(self, fn: Callable[[], T], limiter: trio.CapacityLimiter, label: str) -> T:
        """``fn()`` on a thread; returns or raises what it does.

        **Cancellation handling:** the thread is told (its ``check_cancelled()`` raises),
        and the caller waits until it returns, then raises ``Cancelled``; after
        :meth:`give_up` it raises ``Cancelled`` at once and the thread runs on alone.
        """
        token = trio.lowlevel.current_trio_token()
        returned = trio.Event()
        lock = threading.Lock()
        # "pending" until the thread starts fn; "skipped" if cancelled before that.
        phase = ["pending"]

        def returned_soon() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(returned.set)

        def in_thread() -> T | None:
            with lock:
                if phase[0] == "skipped":
                    return None  # cancelled before it started: fn never runs
                phase[0] = "running"
            try:
                return fn()
            finally:
                returned_soon()

        try:
            result = await trio.to_thread.run_sync(in_thread, limiter=limiter, abandon_on_cancel=True)
        except trio.Cancelled:
            with lock:
                started = phase[0] == "running"
                if not started:
                    phase[0] = "skipped"
            if started:
                await self._wait_for(returned, label)
            raise
        return result  # type: ignore[return-value]  # None only when skipped, which raised

    async def _wait_for(self, returned: trio.Event, label: str) -> None:
        if self.given_up:
            log.warning("%s: not waiting for its thread; it runs on, and what it returns is discarded", label)
            return
        with trio.CancelScope(shield=True) as waiting:
            self._waiting[waiting] = label
            try:
                await returned.wait()
            finally:
                del self._waiting[waiting]
        if waiting.cancelled_caught:
            log.warning(
                "%s: stopped waiting for its thread; it runs on, and what it returns is discarded", label
            )


#: Set by the worker around one run: the threads of that run and how to name them.
current_thread_waits: ContextVar[tuple[ThreadWaits, str] | None] = ContextVar(
    "trioworker_thread_waits", default=None
)


async def run_sync(fn: Callable[[], T], limiter: trio.CapacityLimiter) -> T:
    """Run sync task code on a thread: the worker's :class:`ThreadWaits` when one is set,
    else plain ``trio.to_thread.run_sync`` (cancellation waits for the thread)."""
    current = current_thread_waits.get()
    if current is None:
        return await trio.to_thread.run_sync(fn, limiter=limiter)
    waits, label = current
    return await waits.run_sync(fn, limiter, label)
