"""Run groups: a Trio nursery whose children are runs, on whichever workers run them.

::

    async with trioworker.open_run_group() as group:
        await resize.delay(first)
        await resize.map(rest)
    # here every run of the group has ended; one that failed raised

Every run submitted inside the block (``.delay``, ``.map``, ``.apply_async``, from the
block's task or from tasks it starts, at any depth of calls) joins the group: it carries
the group's id, and the server keeps the group (:meth:`TaskRunClient.cancel_group
<trioworker.client.rest.TaskRunClient.cancel_group>` cancels it in one transaction). The
rules are a nursery's (``strict_exception_groups``, as Trio's default):

- leaving the block waits until every run of the group has ended (each waited for as its
  future would be: over the client channel, or on the one long-poll that all waits of the
  Trio run share, so a group adds no long-poll of its own);
- when a run fails (FAILED or CRASHED), the group cancels the others on the server (one
  request), cancels the block's body if it still runs, and raises an :class:`ExceptionGroup`
  of the failures, each the task's own exception where it can be rebuilt here (see
  :func:`~trioworker.client.futures.failure_of`);
- when the block raises or is cancelled (a cancel scope, a deadline), the group's runs that
  have not ended are cancelled on the server (shielded, within :data:`CANCEL_SECONDS`) and
  the exception or the cancellation propagates;
- :meth:`RunGroup.cancel` cancels the body and the runs, and the block ends quietly, as
  ``nursery.cancel_scope.cancel()`` does. A run cancelled by anyone is not a failure.

:func:`open_sync_run_group` (``trioworker.sync.open_run_group``) is the blocking twin.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final, final

import attrs
import trio

from trioworker.client.futures import (
    POLL_SECONDS,
    SyncTaskRunFuture,
    TaskRunFuture,
    _FutureBase,
    failure_of,
    linger_for,
    wait_with,
)
from trioworker.client.rest import SyncTaskRunClient, TaskRunClient, using_client, using_sync_client
from trioworker.context import in_run_group
from trioworker.errors import NotFound
from trioworker.models import StateType, TaskRun, WaitResult

log = logging.getLogger("trioworker.client")

#: Seconds a group whose block raised or was cancelled may take to cancel its runs on the
#: server (shielded from the cancellation, so this bound is what ends it).
CANCEL_SECONDS: Final = 10.0
#: The end states that are failures of a group (CANCELLED is not).
FAILURES: Final = frozenset({StateType.FAILED, StateType.CRASHED})

#: Logged when a group that is raising its failures cannot read how its other runs ended.
UNREAD: Final = "run group %s: the ends of its other runs could not be read: %s"
#: The RuntimeError of a submission made with a group's context after its block ended.
CLOSED: Final = "this run group's block has ended: it takes no more runs (submit inside the block)"


def _as_async(future: _FutureBase[Any]) -> TaskRunFuture[Any]:
    if isinstance(future, TaskRunFuture):
        return future
    return TaskRunFuture(future.task_run_id, future.task, future.task_run)


def _as_sync(future: _FutureBase[Any]) -> SyncTaskRunFuture[Any]:
    if isinstance(future, SyncTaskRunFuture):
        return future
    return SyncTaskRunFuture(future.task_run_id, future.task, future.task_run)


@attrs.define(eq=False)
class _Ledger:
    """The runs of a group and what became of them; the two kinds of group share it."""

    futures: list[_FutureBase[Any]] = attrs.field(factory=list)
    known: set[uuid.UUID] = attrs.field(factory=set)
    #: Not ended, as far as the group knows.
    pending: dict[uuid.UUID, _FutureBase[Any]] = attrs.field(factory=dict)
    #: The exceptions of the runs that failed, in the order the group saw them end.
    failures: list[BaseException] = attrs.field(factory=list)

    def add(self, futures: Sequence[_FutureBase[Any]]) -> list[_FutureBase[Any]]:
        """Take the runs of ``futures`` in; those new to the group and not ended."""
        added: list[_FutureBase[Any]] = []
        for future in futures:
            if future.task_run_id in self.known:
                continue
            self.known.add(future.task_run_id)
            self.futures.append(future)
            self.pending[future.task_run_id] = future
            if future.task_run is not None and future.task_run.state.is_terminal:
                self.settle(future.task_run)  # created CANCELLED: its group or parent was
            else:
                added.append(future)
        return added

    def settle(self, run: TaskRun) -> BaseException | None:
        """``run`` ended: its future gets it; a failure is kept, and returned (None: it was
        not one, or the run was settled before)."""
        future = self.pending.pop(run.id, None)
        if future is None:
            return None
        future.task_run = run
        if run.state.type not in FAILURES:
            return None
        failure = failure_of(run)
        self.failures.append(failure)
        return failure

    def settle_answer(self, answer: WaitResult) -> None:
        for run in answer.ended:
            self.settle(run)
        for run_id in answer.missing:
            self.pending.pop(run_id, None)  # deleted: gone, as a cancelled run is, not a failure


@final
class RunGroup:
    """A group of runs that behaves as a Trio nursery of them: made by
    :func:`open_run_group`, alive for its block.

    Attributes:
        id: the group's id (a UUID): its runs carry it as ``group_id``;
            ``GET /api/task_runs?group_id=`` lists them.
    """

    def __init__(self, client: TaskRunClient) -> None:
        self.id: uuid.UUID = uuid.uuid4()
        self._client = client
        self._ledger = _Ledger()
        #: Set when the last pending run ended, or the body ended.
        self._changed = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._nursery: trio.Nursery | None = None
        #: The body has ended: the group takes no more runs.
        self._closed = False
        self._cancel_called = False
        #: A run was admitted: a create may be on its way (a cancel must reach the server).
        self._admitted = False
        #: A run failed: the group is being cancelled (then its failures are raised).
        self._failing = False
        self._raising = False
        self._cancel_sent = False

    @property
    def futures(self) -> list[TaskRunFuture[Any]]:
        """The futures of the group's runs, in the order they joined (a new list)."""
        return [_as_async(f) for f in self._ledger.futures]

    @property
    def cancel_called(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancel_called

    def cancel(self) -> None:
        """Cancel the group: its block's body (as ``nursery.cancel_scope.cancel()``), and its
        runs that have not ended, on the server, as the block ends (the cancel is sent then,
        in one request, shielded). The block then ends without an exception, and a run
        created in the group afterwards is created CANCELLED. Idempotent; after the block, it
        does nothing."""
        if self._nursery is None or self._cancel_called:
            return
        self._cancel_called = True
        self._nursery.cancel_scope.cancel()

    def admit(self) -> uuid.UUID:
        if self._closed:
            raise RuntimeError(CLOSED)
        self._admitted = True
        return self.id

    def joined(self, futures: Sequence[object]) -> None:
        found = [f for f in futures if isinstance(f, _FutureBase)]
        try:
            here = trio.lowlevel.current_trio_token() is self._token
        except RuntimeError:  # a thread of the block's (trio.to_thread)
            here = False
        if here:
            self._add(found)
        else:
            self._token.run_sync_soon(self._add, found)

    def _add(self, futures: Sequence[_FutureBase[Any]]) -> None:
        added = self._ledger.add([_as_async(f) for f in futures])
        if self._nursery is not None:
            for future in added:
                self._nursery.start_soon(self._await_end, future)

    def __repr__(self) -> str:
        ledger = self._ledger
        return f"<RunGroup {self.id} runs={len(ledger.futures)} pending={len(ledger.pending)}>"

    # -- the tasks of the group's nursery
    async def _await_end(self, future: _FutureBase[Any]) -> None:
        """Wait for one run to end, as its future's ``wait`` does (over the client channel
        when it is open, else on the long-poll every waiter of the Trio run shares: a group
        adds no long-poll of its own); a failure starts the group's :meth:`_fail`."""
        ledger = self._ledger
        try:
            run = await wait_with(self._client, _as_async(future), math.inf)
        except NotFound:
            ledger.pending.pop(future.task_run_id, None)  # deleted: gone, as a cancelled run is
        else:
            failure = None if run is None else ledger.settle(run)
            if failure is not None:
                if self._raising:
                    assert self._nursery is not None
                    self._nursery.start_soon(_reraise, failure)
                elif not self._failing:
                    self._failing = True
                    assert self._nursery is not None
                    self._nursery.start_soon(self._fail)
        if not ledger.pending:
            self._changed.set()

    async def _fail(self) -> None:
        """A run failed: cancel the others on the server, learn what they ended as (one may
        have failed meanwhile), and raise every failure into the nursery, each as a child
        task raises its own (which cancels the body and the waits)."""
        ledger = self._ledger
        await self._cancel_on_server()
        if ledger.pending:
            try:
                ledger.settle_answer(await self._client.wait_many(list(ledger.pending), seconds=0))
            except Exception as exc:  # the failures at hand are raised all the same
                log.warning(UNREAD, self.id, exc)
        self._raising = True
        assert self._nursery is not None
        for failure in ledger.failures:
            self._nursery.start_soon(_reraise, failure)

    async def _guard(self) -> None:
        """Until the body ended and every run with it: when cancelled before (the body
        raised or was cancelled, :meth:`cancel`, a failure), cancel the group on the server.

        **Cancellation handling:** that cancel is shielded, for :data:`CANCEL_SECONDS` at most.
        """
        completed = False
        try:
            while not (self._closed and not self._ledger.pending):
                await self._changed.wait()
                self._changed = trio.Event()
            completed = True
        finally:
            if not completed and not self._cancel_sent and (self._admitted or self._ledger.pending):
                with trio.move_on_after(CANCEL_SECONDS, shield=True):
                    await self._cancel_on_server()

    async def _cancel_on_server(self) -> None:
        """Cancel the group on the server; a failure to is logged (what raises is on its way
        already: a run's failure, the block's own exception, or a cancellation)."""
        try:
            await self._client.cancel_group(self.id)
        except Exception as exc:
            log.warning("run group %s: its runs could not be cancelled on the server: %s", self.id, exc)
        else:
            self._cancel_sent = True


async def _reraise(failure: BaseException) -> None:
    """A run's failure, raised as a child task of the group's nursery raises its own."""
    raise failure


@asynccontextmanager
async def open_run_group() -> AsyncIterator[RunGroup]:
    """A group that collects every run submitted inside the block, and acts as a Trio
    nursery of them (see the module's rules): leaving the block waits for all of them.

    Runs submitted with ``detached=True`` join no group.

    Raises:
        ExceptionGroup: runs of the group failed (each the task's own exception where its
            class is importable here, else :class:`~trioworker.TaskRunFailed`), and/or the
            block raised (its exception is in the group too, as a strict Trio nursery has it).
        RuntimeError: a run submitted with the group's context after its block ended.

    **Cancellation handling:** a cancellation of the block (a cancel scope, a deadline)
    cancels the group's runs on the server, shielded and bounded by :data:`CANCEL_SECONDS`,
    and propagates. A server that cannot be reached then is logged, not raised.

    **Resource handling:** the group's nursery lives exactly as long as the block: a guard
    task, and one task per run not ended that waits for it as its future would (over the
    client channel, or on the long-poll that every waiter of the Trio run shares). It uses
    the client of the enclosing ``trioworker.connect()``, or one of its own for the block.
    """
    async with using_client() as client:
        group = RunGroup(client)
        with in_run_group(group):
            async with trio.open_nursery() as nursery:
                group._nursery = nursery
                nursery.start_soon(group._guard)
                try:
                    yield group
                finally:
                    group._closed = True
                    group._changed.set()
            group._nursery = None


# --------------------------------------------------------------------------- the blocking twin


@final
class SyncRunGroup:
    """The blocking twin of :class:`RunGroup`, made by :func:`open_sync_run_group`.

    Plain code cannot be interrupted, so a run that fails is found when the block ends
    (not while it runs): the group then cancels the others and raises.
    """

    def __init__(self) -> None:
        self.id: uuid.UUID = uuid.uuid4()
        self._ledger = _Ledger()
        self._lock = threading.Lock()
        self._client: SyncTaskRunClient | None = None
        self._closed = False
        self._cancel_called = False
        self._admitted = False

    @property
    def futures(self) -> list[SyncTaskRunFuture[Any]]:
        """The futures of the group's runs, in the order they joined (a new list)."""
        with self._lock:
            return [_as_sync(f) for f in self._ledger.futures]

    @property
    def cancel_called(self) -> bool:
        return self._cancel_called

    def cancel(self) -> None:
        """Cancel the group's runs on the server now (one request); a run created in it
        afterwards is created CANCELLED. The block goes on (plain code cannot be
        interrupted) and ends without an exception for the group's runs.

        Raises:
            ServerUnavailable, ApiError: the server could not be told.
        """
        if self._client is None or self._cancel_called:
            return
        self._cancel_called = True
        self._client.cancel_group(self.id)

    def admit(self) -> uuid.UUID:
        if self._closed:
            raise RuntimeError(CLOSED)
        self._admitted = True
        return self.id

    def joined(self, futures: Sequence[object]) -> None:
        with self._lock:
            self._ledger.add([_as_sync(f) for f in futures if isinstance(f, _FutureBase)])

    def __repr__(self) -> str:
        ledger = self._ledger
        return f"<SyncRunGroup {self.id} runs={len(ledger.futures)} pending={len(ledger.pending)}>"

    def _wait(self, client: SyncTaskRunClient) -> None:
        """Until every run ended, or one failed: then cancel the others and learn their ends."""
        ledger = self._ledger
        while ledger.pending and not ledger.failures:
            ids = list(ledger.pending)
            answer = client.wait_many(ids, seconds=POLL_SECONDS, linger=linger_for(len(ids)))
            with self._lock:
                ledger.settle_answer(answer)
        if ledger.failures:
            self._cancel_quietly(client)
            if ledger.pending:
                try:
                    answer = client.wait_many(list(ledger.pending), seconds=0)
                except Exception as exc:  # the failures at hand are raised all the same
                    log.warning(UNREAD, self.id, exc)
                    return
                with self._lock:
                    ledger.settle_answer(answer)

    def _cancel_quietly(self, client: SyncTaskRunClient) -> None:
        try:
            client.cancel_group(self.id)
        except Exception as exc:
            log.warning("run group %s: its runs could not be cancelled on the server: %s", self.id, exc)


@contextmanager
def open_sync_run_group() -> Iterator[SyncRunGroup]:
    """The blocking twin of :func:`open_run_group` (``trioworker.sync.open_run_group``):
    the same rules, but a failed run is found when the block ends, since plain code
    cannot be interrupted.

    Raises:
        ExceptionGroup: as :func:`open_run_group` (the block's own exception, a
            ``KeyboardInterrupt`` too, comes wrapped in a ``BaseExceptionGroup``).
        ServerUnavailable, ApiError: the server could not be asked about the runs.
    """
    group = SyncRunGroup()
    with using_sync_client() as client, in_run_group(group):
        group._client = client
        try:
            yield group
        except BaseException as exc:
            group._closed = True
            if group._admitted:
                group._cancel_quietly(client)
            raise BaseExceptionGroup("Exceptions from a run group", [exc]) from None
        finally:
            group._closed = True
            group._client = None
        group._wait(client)
        if group._ledger.failures:
            raise BaseExceptionGroup("Exceptions from a run group", list(group._ledger.failures))
