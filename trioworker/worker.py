"""The worker: :class:`TaskWorker` and :func:`serve`.

The nursery tree of a running worker::

    TaskWorker.start()
      nursery
        status server (hypercorn, only with a port)     started with nursery.start
        subscription: websocket, reconnecting           started with nursery.start
        runs nursery: one task per run; async code runs here, sync code in
                      trio.to_thread.run_sync; a CapacityLimiter bounds them all

When ``start()`` returns, every task, thread and socket of the worker has ended.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Self, final

import trio

from trioworker import engine
from trioworker._util import only_exception
from trioworker.client import TaskRunClient, connect, using_client
from trioworker.engine import Outcome
from trioworker.errors import NotFound, StopTaskWorker
from trioworker.models import SetStateResult, State, TaskRun, utcnow
from trioworker.settings import DEFAULT_STATUS_HOST, MAX_PREFETCH, Settings, api_root
from trioworker.subscription import SubscriptionClient, websocket_url
from trioworker.tasks import Task

log = logging.getLogger("trioworker.worker")

#: Seconds in-flight runs get to finish after stop() before they are cancelled.
DEFAULT_SHUTDOWN_GRACE_SECONDS: Final = 30.0
#: Credit asked for when the worker has no limit.
UNLIMITED_CREDIT: Final = 1000
#: Threads for sync tasks when the worker has no limit.
UNLIMITED_THREADS: Final = 100
#: Seconds to wait for the server to confirm the quit once runs are done or handed back.
QUIT_TIMEOUT: Final = 5.0


class WorkerState(enum.Enum):
    UNOPENED = "unopened"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class _RestReporter:
    """Reports over REST, for runs handed to :meth:`TaskWorker.execute_task_run`."""

    def __init__(self, client: TaskRunClient) -> None:
        self.client = client

    async def report(self, run_id: uuid.UUID, state: State) -> SetStateResult:
        return await self.client.set_state(run_id, state)


def _check_tasks(tasks: Iterable[object]) -> dict[str, Task[..., Any]]:
    by_key: dict[str, Task[..., Any]] = {}
    for item in tasks:
        if not isinstance(item, Task):
            raise TypeError(f"{item!r} is not a task: decorate the function with @trioworker.task")
        if item.key in by_key and by_key[item.key] is not item:
            raise ValueError(f"two different tasks share the key {item.key!r}")
        by_key[item.key] = item
    if not by_key:
        raise ValueError("a worker needs at least one task")
    return by_key


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@final
class TaskWorker:
    """Subscribes to runs of ``tasks`` and runs them, at most ``limit`` at once.

    Args:
        tasks: the :class:`~trioworker.Task` objects this worker serves.
        limit: the most runs at once (None: no limit; the worker then asks for up to
            1,000 runs at a time and runs sync tasks on up to 100 threads).
        api_url, api_key: the server (default ``TRIOWORKER_API_URL`` / ``TRIOWORKER_API_KEY``);
            ``http://host:port`` as the server prints it, or ``.../api``.
        shutdown_grace_seconds: after :meth:`stop`, how long in-flight runs may finish
            before they are cancelled and handed back to the queue.
        status_server_port: serve ``/status``, ``/health`` and ``/metrics`` on this port
            (0 picks a free one; see :attr:`status_url`).
        status_server_host: the address the status server listens on (``"0.0.0.0"``: every
            interface, for a probe on another host).
        allow_pickle: accept runs whose parameters are pickled (they can run any code).
        client_id: how the server knows this worker (default ``"<hostname>-<pid>"``).
        prefetch: runs the server may send ahead into this worker's buffer, so that a
            freed slot starts its next run at once instead of after a round trip to the
            server (worth it for short runs; 0, the default, keeps every waiting run on the
            server). A run waits in the buffer only while no other worker of its task has
            a free slot; when one gets one, the server takes back the runs not started.
            Without a limit there is nothing to wait for, and prefetch is 0.

    **Cancellation handling:** stopping is strict: :meth:`stop` (or cancelling
    :meth:`start`'s scope, or SIGTERM under :func:`serve`) stops taking runs, lets
    in-flight runs finish within the grace period, then cancels them. A sync task's
    thread cannot be interrupted: cancelling it waits until it returns (it may call
    ``trio.from_thread.check_cancelled()`` to leave early). Runs that did not finish go
    back to the queue for another worker.
    """

    def __init__(
        self,
        *tasks: Task[..., Any],
        limit: int | None = 10,
        api_url: str | None = None,
        api_key: str | None = None,
        shutdown_grace_seconds: float = DEFAULT_SHUTDOWN_GRACE_SECONDS,
        status_server_port: int | None = None,
        status_server_host: str = DEFAULT_STATUS_HOST,
        allow_pickle: bool = False,
        client_id: str | None = None,
        prefetch: int = 0,
    ) -> None:
        self._tasks = _check_tasks(tasks)
        if limit is not None and limit < 1:
            raise ValueError("limit must be >= 1, or None for no limit")
        if not 0 <= prefetch <= MAX_PREFETCH:
            raise ValueError(f"prefetch must be from 0 to {MAX_PREFETCH}")
        if shutdown_grace_seconds < 0:
            raise ValueError("shutdown_grace_seconds must be >= 0")
        settings = Settings.from_env()
        self.api_url = api_root(api_url or settings.api_url)
        self.api_key = api_key if api_key is not None else settings.api_key
        self.limit = limit
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self.status_server_port = status_server_port
        self.status_server_host = status_server_host
        self.allow_pickle = allow_pickle
        self.prefetch = prefetch if limit is not None else 0
        self.delete_failed_submissions = _env_flag("TRIOWORKER_DELETE_FAILED_SUBMISSIONS")
        self.client_id = client_id or f"{socket.gethostname()}-{os.getpid()}"
        self.started_at: datetime | None = None
        self.status_url: str | None = None
        #: Per task key: run id -> when it started running here.
        self.in_flight_task_runs: dict[str, dict[uuid.UUID, datetime]] = {k: {} for k in self._tasks}
        #: Per task key: runs that ended here (completed, failed, retrying or cancelled).
        self.finished_task_runs: dict[str, int] = dict.fromkeys(self._tasks, 0)
        self.started_task_runs: dict[str, int] = dict.fromkeys(self._tasks, 0)
        self.failed_task_runs: dict[str, int] = dict.fromkeys(self._tasks, 0)
        self._state = WorkerState.UNOPENED
        self._limiter = trio.CapacityLimiter(limit if limit is not None else math.inf)
        self._thread_limiter = trio.CapacityLimiter(limit if limit is not None else UNLIMITED_THREADS)
        self._held: set[uuid.UUID] = set()
        self._executing: set[uuid.UUID] = set()
        self._scopes: dict[uuid.UUID, trio.CancelScope] = {}
        self._cancel_requested: set[uuid.UUID] = set()
        self._dispatch_scope: trio.CancelScope | None = None
        self._startup_scope: trio.CancelScope | None = None
        self._subscription: SubscriptionClient | None = None
        self._running_context: Any = None

    # -- what users read
    @property
    def task_keys(self) -> list[str]:
        return list(self._tasks)

    @property
    def started(self) -> bool:
        return self._state is not WorkerState.UNOPENED

    @property
    def stopping(self) -> bool:
        return self._state in (WorkerState.STOPPING, WorkerState.STOPPED)

    @property
    def connected(self) -> bool:
        """True while the worker holds a live subscription to the server."""
        subscription = self._subscription
        return self._state is not WorkerState.STOPPED and subscription is not None and subscription.connected

    @property
    def current_tasks(self) -> int:
        """Runs executing right now."""
        return int(self._limiter.borrowed_tokens)

    @property
    def available_tasks(self) -> float:
        """Free slots (``math.inf`` without a limit)."""
        return self._limiter.available_tokens

    def __repr__(self) -> str:
        return f"<TaskWorker {self.client_id} {self._state.value} tasks={self.task_keys} limit={self.limit}>"

    # -- lifecycle
    async def start(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`stop`; reports ``started`` once subscribed.

        **Error handling:** a failing run never stops the worker (it ends FAILED). Errors
        of the worker itself (a refused API key, a status port in use) propagate: one error
        as itself, several at once as an exception group.
        """
        if self._state is not WorkerState.UNOPENED:
            raise RuntimeError("this TaskWorker was already started; create a new one to start again")
        websocket_url(self.api_url)  # a clear ValueError now for an unusable URL
        self._state = WorkerState.RUNNING
        self.started_at = utcnow()
        log.info("Subscribing to runs of task(s): %s", " | ".join(self._tasks))
        send, receive = trio.open_memory_channel[TaskRun](math.inf)
        self._subscription = SubscriptionClient(
            api_url=self.api_url,
            api_key=self.api_key,
            keys=tuple(self._tasks),
            client_id=self.client_id,
            credit=self.limit if self.limit is not None else UNLIMITED_CREDIT,
            held=lambda: set(self._held),
            on_cancel=self._on_cancel,
            prefetch=self.prefetch,
        )
        try:
            await self._run_tree(send, receive, task_status)
        except BaseExceptionGroup as group:
            single = only_exception(group)
            if single is None:
                raise
            raise single from None
        finally:
            self._state = WorkerState.STOPPED
            log.info("worker %s stopped", self.client_id)

    async def _run_tree(
        self,
        send: trio.MemorySendChannel[TaskRun],
        receive: trio.MemoryReceiveChannel[TaskRun],
        task_status: trio.TaskStatus[None],
    ) -> None:
        """The nursery tree (see the module docstring)."""
        # One client for everything the worker's runs say over REST (their own .delay()
        # calls included: it is the ambient client of their context).
        async with connect(self.api_url, self.api_key), trio.open_nursery() as nursery:
            if self.status_server_port is not None:
                from trioworker.status import serve_status

                self.status_url = await nursery.start(
                    serve_status, self, self.status_server_port, self.status_server_host
                )
            subscription_done = trio.Event()

            async def hold_subscription(*, task_status: trio.TaskStatus[None]) -> None:
                assert self._subscription is not None
                try:
                    await self._subscription.run(send, task_status=task_status)
                finally:
                    subscription_done.set()

            # stop() before the first subscribe (a server still unreachable) ends the wait.
            with trio.CancelScope() as self._startup_scope:
                if self._state is not WorkerState.RUNNING:
                    self._startup_scope.cancel()
                await nursery.start(hold_subscription)
            self._startup_scope = None
            task_status.started()
            if self._state is not WorkerState.RUNNING and not (
                self._subscription and self._subscription.connected
            ):
                nursery.cancel_scope.cancel()
                return
            async with receive:
                await self._dispatch(receive)
            with trio.move_on_after(QUIT_TIMEOUT):
                await subscription_done.wait()
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        """Stop taking runs; in-flight runs get the grace period, then are cancelled.

        Safe to call from any Trio task of the worker's run, and more than once.

        Raises:
            RuntimeError: the worker was never started.
        """
        if self._state is WorkerState.UNOPENED:
            raise RuntimeError("this TaskWorker is not running: start() it before calling stop()")
        if self._state is not WorkerState.RUNNING:
            return
        log.info("worker %s stopping (grace %g s)", self.client_id, self.shutdown_grace_seconds)
        self._state = WorkerState.STOPPING
        if self._startup_scope is not None:
            self._startup_scope.cancel()
        if self._dispatch_scope is not None:
            self._dispatch_scope.cancel()

    @asynccontextmanager
    async def _run_in_background(self) -> AsyncIterator[Self]:
        body_error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.start)
                try:
                    yield self
                except BaseException as exc:
                    body_error = exc
                    raise
                finally:
                    if self._state is WorkerState.RUNNING:
                        self.stop()
        except BaseExceptionGroup as group:
            # Give the caller its own exception back, not wrapped by our nursery.
            if body_error is not None and list(group.exceptions) == [body_error]:
                raise body_error from None
            raise

    async def __aenter__(self) -> Self:
        """``async with TaskWorker(...) as worker:`` runs it until the block ends."""
        context = self._run_in_background()
        worker = await context.__aenter__()
        self._running_context = context
        return worker

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        context, self._running_context = self._running_context, None
        assert context is not None, "__aexit__ without __aenter__"
        return bool(await context.__aexit__(exc_type, exc, tb))

    # -- dispatch
    async def _dispatch(self, receive: trio.MemoryReceiveChannel[TaskRun]) -> None:
        subscription = self._subscription
        assert subscription is not None
        async with trio.open_nursery() as runs:
            with trio.CancelScope() as self._dispatch_scope:
                if self._state is not WorkerState.RUNNING:
                    self._dispatch_scope.cancel()
                async for run in receive:
                    task = self._tasks.get(run.task_key)
                    if task is None:
                        subscription.take(run.id)
                        await self._unknown_key(run, subscription.release)
                        continue
                    if run.id in self._held:
                        subscription.take(run.id)
                        continue  # delivered again while we still hold it (after a reconnect)
                    self._held.add(run.id)
                    await self._limiter.acquire_on_behalf_of(run.id)
                    if not subscription.take(run.id):
                        # Revoked while it waited in the buffer: handed back, not ours.
                        self._held.discard(run.id)
                        self._limiter.release_on_behalf_of(run.id)
                        continue
                    runs.start_soon(self._run_one, task, run, subscription)
            # Stopping: no new runs; the ones running get the grace period.
            subscription.quit()
            runs.cancel_scope.deadline = trio.current_time() + self.shutdown_grace_seconds
        while True:
            try:
                self._held.add(receive.receive_nowait().id)
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        if self._held:
            log.info("handing back %d unfinished run(s)", len(self._held))
            subscription.release(sorted(self._held))
            self._held.clear()

    async def _unknown_key(self, run: TaskRun, release: Callable[[list[uuid.UUID]], None]) -> None:
        if self.delete_failed_submissions:
            log.warning("deleting run %s: this worker does not serve task %r", run.id, run.task_key)
            async with TaskRunClient(self.api_url, self.api_key) as client:
                with contextlib.suppress(NotFound):
                    await client.delete(run.id)
        else:
            log.warning("releasing run %s: this worker does not serve task %r", run.id, run.task_key)
            release([run.id])

    def _on_cancel(self, run_ids: list[uuid.UUID]) -> None:
        for run_id in run_ids:
            scope = self._scopes.get(run_id)
            if scope is not None:
                scope.cancel()
            else:
                self._cancel_requested.add(run_id)

    async def _run_one(self, task: Task[..., Any], run: TaskRun, reporter: engine.Reporter) -> None:
        key = task.key
        scope = trio.CancelScope()
        self._scopes[run.id] = scope
        if run.id in self._cancel_requested:
            scope.cancel()
        slot_free = False

        def free_slot() -> None:
            """The task's code is done: the next run may start (its report is on its way)."""
            nonlocal slot_free
            if not slot_free:
                slot_free = True
                self.in_flight_task_runs[key].pop(run.id, None)
                self._limiter.release_on_behalf_of(run.id)

        try:

            def on_running() -> None:
                self.in_flight_task_runs[key][run.id] = utcnow()
                self.started_task_runs[key] += 1

            outcome = await engine.execute(
                task,
                run,
                reporter,
                scope=scope,
                thread_limiter=self._thread_limiter,
                allow_pickle=self.allow_pickle,
                on_running=on_running,
                on_attempt_end=free_slot,
                fetch=self._fetch_runs,
                # Runs from the subscription were just leased to us: RUNNING is all but
                # certain, and a cancel would reach us anyway.
                queue_report=self._subscription.send_report
                if self._subscription is not None and reporter is self._subscription
                else None,
            )
            if outcome is not Outcome.REFUSED:
                self.finished_task_runs[key] += 1
            if outcome is Outcome.FAILED:
                self.failed_task_runs[key] += 1
            if outcome is Outcome.CANCELLED and self._subscription is not None:
                self._subscription.release([run.id])  # frees the lease the server kept for our answer
            self._held.discard(run.id)
            if outcome is Outcome.STOP:
                self.stop()
        finally:
            self._scopes.pop(run.id, None)
            self._cancel_requested.discard(run.id)
            free_slot()

    async def _fetch_runs(self, run_ids: list[uuid.UUID]) -> list[TaskRun]:
        async with using_client() as client:
            return (await client.wait_many(run_ids, seconds=0)).ended

    async def execute_task_run(self, task_run: TaskRun) -> None:
        """Run one given run here and now (reporting over REST), outside the subscription.

        The same run handed over twice at once runs once: the second call returns at once.
        """
        if task_run.id in self._executing or task_run.id in self._scopes:
            log.info("run %s is already executing here", task_run.id)
            return
        self._executing.add(task_run.id)
        try:
            async with connect(self.api_url, self.api_key) as client:
                task = self._tasks.get(task_run.task_key)
                if task is None:
                    await self._unknown_key(task_run, lambda ids: None)
                    return
                await self._limiter.acquire_on_behalf_of(task_run.id)
                await self._run_one(task, task_run, _RestReporter(client))
        finally:
            self._executing.discard(task_run.id)


async def serve(
    *tasks: Task[..., Any],
    limit: int | None = 10,
    status_server_port: int | None = None,
    **options: Any,
) -> None:
    """Serve ``tasks`` until SIGINT, SIGTERM or :class:`StopTaskWorker`; then return.

    Use it as ``trio.run(serve, say, yell)`` or with ``functools.partial`` for options
    (any :class:`TaskWorker` argument). Any other error propagates.
    """
    worker = TaskWorker(*tasks, limit=limit, status_server_port=status_server_port, **options)
    async with trio.open_nursery() as nursery:

        async def stop_on_signals(*, task_status: trio.TaskStatus[None]) -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                task_status.started()
                async for signum in signals:
                    log.info("received %s", signal.Signals(signum).name)
                    worker.stop()

        await nursery.start(stop_on_signals)
        try:
            await worker.start()
        except* StopTaskWorker:
            log.info("StopTaskWorker: the worker stopped")
        nursery.cancel_scope.cancel()
