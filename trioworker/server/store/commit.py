"""Group commit, the same in every store: operations queued from Trio run in groups, each
group in one transaction on a worker thread that the store owns.

A store is an :class:`Operations` (plain synchronous functions of its connection) behind a
:class:`GroupCommitStore`, which gives the async :class:`~trioworker.server.store.base.Store`
interface: every call queues one operation; a committer task takes every operation waiting
at that moment (up to :data:`MAX_GROUP`) and hands the group to the store's
:meth:`GroupCommitStore._commit_group` inside one ``trio.to_thread.run_sync`` call. So the
Trio thread never waits on the database, and a burst of 1,000 writes costs one commit.

A store whose commit never waits on anything but the local file system (SQLite: its commits
append to the write-ahead log without an fsync, and it checkpoints on a thread of its own)
may commit a small group of *light* operations on the Trio thread instead
(:attr:`GroupCommitStore._commits_inline`): one operation on a few runs costs tens of
microseconds there, a thread's hop and wake-up several times that, and the hop sat twice on
the path of every run (its create, its end). When the committer is idle and nothing waits,
such an operation is committed by its caller at once (:meth:`GroupCommitStore._queue`): no
wake-up of the committer either. Right after such a commit, the next light operations queue
for a while (:data:`DIRECT_COMMIT_GAP`), so a burst still shares one commit.

The counts of the operator's view (:meth:`GroupCommitStore.count_runs` and the like) read
many rows: a store may run them beside the committer, on a connection of its own
(:meth:`GroupCommitStore._read_beside`), so that they never hold up a commit.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Final, Generic, Protocol, TypeVar

import attrs
import trio

from trioworker.models import (
    TIMED_OUT,
    Schedule,
    ScheduleCreate,
    SetStateRequest,
    StateChange,
    StateType,
    TaskRun,
    TaskRunCreate,
    utcnow,
)
from trioworker.server.store.base import (
    Change,
    EndedCount,
    Fired,
    QueuedOp,
    QueuedRun,
    Requeued,
    RunCount,
    StoreError,
)

T = TypeVar("T")

#: Most operations one group commit takes (bounds one thread call's latency).
MAX_GROUP: Final = 512
#: Most operations a group committed on the Trio thread may hold (each of them light).
MAX_INLINE_GROUP: Final = 16
#: Most runs (creates, ids, reports) an operation may touch and still be light.
LIGHT_ITEMS: Final = 32
#: Seconds after an operation committed by its caller during which light operations queue
#: for the committer instead (a burst of them then shares one commit).
DIRECT_COMMIT_GAP: Final = 0.0002


class Operations(Protocol):
    """A store's synchronous operations; each runs inside the committer's transaction, on
    its thread. Their meaning is :class:`~trioworker.server.store.base.Store`'s. A store's
    class derives from it (for :meth:`read_ended`)."""

    def create_runs(
        self,
        creates: Sequence[TaskRunCreate],
        clock_now: float | None = None,
        leases: Mapping[int, str] | None = None,
    ) -> list[tuple[TaskRun, QueuedRun | None]]: ...

    def settle_cached(self, run_ids: Sequence[uuid.UUID], clock_now: float) -> list[Change]: ...

    def read_runs(self, run_ids: Sequence[uuid.UUID]) -> list[TaskRun]: ...

    def list_runs(
        self,
        task_key: str | None,
        state: StateType | None,
        limit: int,
        offset: int,
        parent: uuid.UUID | None,
        newest_first: bool,
        tags: Sequence[str] = (),
        group: uuid.UUID | None = None,
    ) -> list[TaskRun]: ...

    def descendants(self, run_id: uuid.UUID, limit: int) -> list[TaskRun]: ...

    def cancel_group(self, group_id: uuid.UUID, now: float) -> list[Change]: ...

    def delete_run_cascading(self, run_id: uuid.UUID, now: float) -> tuple[TaskRun | None, list[Change]]: ...

    def find_runs(self, id_prefix: str, limit: int) -> list[TaskRun]: ...

    def count_runs(self) -> list[RunCount]: ...

    def count_ended(self, since: datetime, until: datetime | None = None) -> list[EndedCount]: ...

    def oldest_waiting(self, now: datetime) -> list[TaskRun]: ...

    def history(self, run_id: uuid.UUID) -> list[StateChange] | None: ...

    def claim_runs(
        self,
        run_ids: Sequence[uuid.UUID],
        client_id: str,
        now: datetime,
        known: Mapping[uuid.UUID, TaskRun] | None = None,
    ) -> list[TaskRun]: ...

    def set_states(
        self, requests: Sequence[tuple[uuid.UUID, SetStateRequest]], now: float, holder: str | None = None
    ) -> list[Change]: ...

    def requeue(
        self,
        run_ids: Sequence[uuid.UUID],
        reason: str,
        max_deliveries: int | None,
        holder: str | None = None,
    ) -> list[Requeued]: ...

    def delete_run(self, run_id: uuid.UUID) -> TaskRun | None: ...

    def purge_ended(
        self, before: datetime, task_key: str | None, state: StateType | None, limit: int
    ) -> list[uuid.UUID]: ...

    def oldest_end(self) -> datetime | None: ...

    def reclaim(
        self, run_ids: Sequence[uuid.UUID], client_id: str
    ) -> tuple[list[uuid.UUID], list[uuid.UUID]]: ...

    def recover(self, max_deliveries: int) -> list[QueuedRun]: ...

    def states_of(self, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, StateType]: ...

    def runs_by_idempotency_key(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], uuid.UUID]: ...

    def upsert_schedule(self, create: ScheduleCreate, now: datetime) -> tuple[Schedule, bool]: ...

    def read_schedules(self, name: str | None) -> list[Schedule]: ...

    def delete_schedule(self, name: str) -> Schedule | None: ...

    def fire_schedules(self, now: float) -> Fired: ...

    def read_ended(self, run_ids: Sequence[uuid.UUID]) -> tuple[list[TaskRun], set[uuid.UUID]]:
        """The runs that ended, and the ids that exist: only ended runs are read whole."""
        states = self.states_of(run_ids)
        ended = [run_id for run_id, state in states.items() if state.is_terminal]
        return self.read_runs(ended), set(states)


OpsT = TypeVar("OpsT", bound=Operations)


@attrs.define(eq=False)
class Pending(Generic[OpsT, T]):
    """One queued operation: set ``value`` or ``error``, then ``done``."""

    op: Callable[[OpsT], T]
    #: A few rows' work, bounded (see :data:`LIGHT_ITEMS`): it may commit on the Trio thread.
    light: bool = False
    done: trio.Event = attrs.field(factory=trio.Event)
    value: T | None = None
    error: BaseException | None = None

    async def result(self) -> T:
        """Wait until it ran (shielded: once queued, its caller sees the outcome). When it
        already ran (its caller committed it), this returns at once, without a checkpoint:
        a caller in a loop of such operations still yields, since the operations right after
        such a commit queue (:data:`DIRECT_COMMIT_GAP`)."""
        if not self.done.is_set():
            with trio.CancelScope(shield=True):
                await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]

    def finish(self) -> None:
        """It ran: wake whoever waits for :meth:`result`."""
        self.done.set()


@attrs.frozen
class StoreStatistics:
    operations: int
    commits: int
    inline_commits: int = 0
    #: Of the inline commits, those made by the operation's caller (the committer idle).
    direct_commits: int = 0


class GroupCommitStore(Generic[OpsT]):
    """The :class:`~trioworker.server.store.base.Store` interface over ``ops``: each call is
    one operation of the next group commit.

    A subclass opens its database, then runs :meth:`_commit_forever` in a nursery for the
    life of the store, and implements :meth:`_commit_group`. One that reads beside the
    committer sets ``_reads_beside``, implements :meth:`_read_beside`, and closes its reading
    connection through :meth:`_close_reader`.
    """

    def __init__(self, ops: OpsT, send: trio.MemorySendChannel[Pending[OpsT, object]]) -> None:
        self._ops = ops
        self._send = send
        self._operations = 0
        self._commits = 0
        self._inline_commits = 0
        self._direct_commits = 0
        #: Small groups of light operations commit on the Trio thread (see the module's text).
        self._commits_inline = False
        #: The committer waits for operations (none queued, none running).
        self._committer_idle = False
        self._last_direct_commit = -math.inf  # time.perf_counter() at its end
        #: The counts run on a connection of their own (:meth:`_read_beside`), not queued.
        self._reads_beside = False
        self._reader_lock = trio.Lock()  # one count at a time; closing waits for it
        self._reader_closed = False

    def statistics(self) -> StoreStatistics:
        """How many operations ran, in how many transactions (group commit at work), and
        how many of those transactions ran on the Trio thread."""
        return StoreStatistics(
            operations=self._operations,
            commits=self._commits,
            inline_commits=self._inline_commits,
            direct_commits=self._direct_commits,
        )

    def _committed(self, operations: int) -> None:
        """Called on the Trio thread after each group commit of ``operations`` operations
        (SQLite counts them towards its next checkpoint)."""

    def _commit_group(self, group: list[Pending[OpsT, object]]) -> None:
        """Run ``group`` in one transaction (on a worker thread): set each operation's
        ``value`` or ``error``. Raising fails every operation of the group that has no
        error yet (a :class:`StoreError` as it is, anything else wrapped in one)."""
        raise NotImplementedError

    async def _commit_forever(self, receive: trio.MemoryReceiveChannel[Pending[OpsT, object]]) -> None:
        """Run the queued operations in groups until the send side is closed and all is done.

        Shielded from cancellation: the cleanup code of a cancelled server (a websocket
        handing back its runs) can still use the store; what was queued always runs.
        """
        with trio.CancelScope(shield=True):
            await self._commit_until_closed(receive)

    async def _commit_until_closed(self, receive: trio.MemoryReceiveChannel[Pending[OpsT, object]]) -> None:
        group: list[Pending[OpsT, object]] = []
        try:
            while True:
                self._committer_idle = True
                try:
                    first = await receive.receive()
                except trio.EndOfChannel:
                    break
                finally:
                    self._committer_idle = False
                group = [first]
                while len(group) < MAX_GROUP:
                    try:
                        group.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):  # EndOfChannel: the last group
                        break
                inline = self._commits_inline and len(group) <= MAX_INLINE_GROUP
                if inline and all(pending.light for pending in group):
                    self._commit_here(group)
                else:
                    try:
                        await trio.to_thread.run_sync(self._commit_group, group)
                    except Exception as exc:
                        self._failed(group, exc)
                    else:
                        self._count_commit(group)
                for pending in group:
                    pending.finish()
                group = []
        finally:
            self._committer_idle = False
            closed = StoreError("the store was closed before this operation ran")
            for pending in group:
                if not pending.done.is_set():
                    pending.error = closed
                    pending.done.set()
            receive.close()
            while True:
                try:
                    pending = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                pending.error = closed
                pending.done.set()

    def _commit_here(self, group: list[Pending[OpsT, object]]) -> None:
        """Commit ``group`` on the Trio thread (it blocks it for as long)."""
        try:
            self._commit_group(group)
        except Exception as exc:
            self._failed(group, exc)
        else:
            self._inline_commits += 1
            self._count_commit(group)

    def _count_commit(self, group: list[Pending[OpsT, object]]) -> None:
        self._commits += 1
        self._operations += len(group)
        self._committed(len(group))

    @staticmethod
    def _failed(group: list[Pending[OpsT, object]], exc: Exception) -> None:
        """The commit of ``group`` failed with ``exc``: each operation that has no error of
        its own fails with it (a :class:`StoreError` as it is, anything else wrapped)."""
        failed = (
            exc
            if isinstance(exc, StoreError)
            else StoreError(f"the store could not commit: {exc!r}; nothing of it was saved")
        )
        for pending in group:
            pending.error = pending.error or failed

    def _may_commit_now(self) -> bool:
        """Whether a light operation can be committed by its caller: the committer is idle,
        nothing is queued, the store is open and no such commit ended just now."""
        if not (self._commits_inline and self._committer_idle):
            return False
        queue = self._send.statistics()
        if queue.current_buffer_used or not queue.open_send_channels:
            return False
        return time.perf_counter() - self._last_direct_commit >= DIRECT_COMMIT_GAP

    def _read_beside(self, op: Callable[[OpsT], T]) -> T:
        """Run the read-only ``op`` on the store's reading connection (on a worker thread,
        one at a time); it must see every operation committed before it was called.

        Raises:
            StoreError: the database failed to read.
        """
        raise NotImplementedError

    async def _close_reader(self, close: Callable[[], None]) -> None:
        """Refuse further counts, then run ``close`` (on a worker thread) once a count under
        way has finished. Shielded: it runs whole in a cancelled scope."""
        with trio.CancelScope(shield=True):
            async with self._reader_lock:
                self._reader_closed = True
                await trio.to_thread.run_sync(close)

    async def _count(self, op: Callable[[OpsT], T]) -> T:
        """Run the read-only ``op`` beside the committer when the store can (it does not
        hold up commits), else queue it as any other operation.

        Raises:
            StoreError: the store is closed, or the database failed to read.
        """
        if not self._reads_beside:
            return await self._run(op)
        async with self._reader_lock:
            if self._reader_closed:
                raise StoreError("the store is closed")
            return await trio.to_thread.run_sync(self._read_beside, op)

    def _queue(self, op: Callable[[OpsT], T], *, light: bool = False) -> Pending[OpsT, T]:
        """Queue ``op`` for the next group commit; operations run in the order queued.
        ``light``: it touches at most a few rows (see :data:`LIGHT_ITEMS`)."""
        pending: Pending[OpsT, T] = Pending(op, light)
        if light and self._may_commit_now():
            # In order: nothing is queued or running. No hop to the committer and back.
            group: list[Pending[OpsT, object]] = [pending]  # type: ignore[list-item]
            self._commit_here(group)
            self._direct_commits += 1
            self._last_direct_commit = time.perf_counter()
            pending.finish()
            return pending
        try:
            self._send.send_nowait(pending)  # type: ignore[arg-type]
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise StoreError("the store is closed") from None
        return pending

    async def _run(self, op: Callable[[OpsT], T], *, light: bool = False) -> T:
        """Queue ``op`` for the next group commit and wait for its result.

        **Cancellation handling:** once queued, an operation always runs and its caller
        always sees the outcome (the wait is shielded; operations take milliseconds). That
        is what keeps memory and disk in step: a claim whose caller was cancelled still
        returns the runs it leased, so they can be handed back.
        """
        return await self._queue(op, light=light).result()

    # -- the Store interface
    async def create_runs(
        self,
        creates: Sequence[TaskRunCreate],
        *,
        now: float | None = None,
        leases: Mapping[int, str] | None = None,
    ) -> list[tuple[TaskRun, QueuedRun | None]]:
        clock_now = time.time() if now is None else now
        return await self._run(lambda ops: ops.create_runs(creates, clock_now, leases), light=_few(creates))

    async def settle_cached(self, run_ids: Sequence[uuid.UUID], *, now: float) -> list[Change]:
        return await self._run(lambda ops: ops.settle_cached(run_ids, now), light=_few(run_ids))

    async def read_run(self, run_id: uuid.UUID) -> TaskRun | None:
        runs = await self._run(lambda ops: ops.read_runs([run_id]), light=True)
        return runs[0] if runs else None

    async def read_runs(self, run_ids: Sequence[uuid.UUID]) -> list[TaskRun]:
        return await self._run(lambda ops: ops.read_runs(run_ids), light=_few(run_ids))

    async def list_runs(
        self,
        *,
        task_key: str | None = None,
        state: StateType | None = None,
        limit: int = 100,
        offset: int = 0,
        parent_task_run_id: uuid.UUID | None = None,
        newest_first: bool = False,
        tags: Sequence[str] = (),
        group_id: uuid.UUID | None = None,
    ) -> list[TaskRun]:
        key, parent, newest, group = task_key, parent_task_run_id, newest_first, group_id
        return await self._run(
            lambda ops: ops.list_runs(key, state, limit, offset, parent, newest, tags, group)
        )

    async def descendants(self, run_id: uuid.UUID, *, limit: int) -> list[TaskRun]:
        return await self._run(lambda ops: ops.descendants(run_id, limit))

    async def cancel_group(self, group_id: uuid.UUID, *, now: float) -> list[Change]:
        return await self._run(lambda ops: ops.cancel_group(group_id, now))

    async def delete_run_cascading(
        self, run_id: uuid.UUID, *, now: float
    ) -> tuple[TaskRun | None, list[Change]]:
        return await self._run(lambda ops: ops.delete_run_cascading(run_id, now))

    async def find_runs(self, id_prefix: str, *, limit: int) -> list[TaskRun]:
        return await self._run(lambda ops: ops.find_runs(id_prefix, limit))

    async def count_runs(self) -> list[RunCount]:
        return await self._count(lambda ops: ops.count_runs())

    async def count_ended(self, since: datetime, until: datetime | None = None) -> list[EndedCount]:
        return await self._count(lambda ops: ops.count_ended(since, until))

    async def oldest_waiting(self, now: datetime) -> list[TaskRun]:
        return await self._count(lambda ops: ops.oldest_waiting(now))

    async def history(self, run_id: uuid.UUID) -> list[StateChange] | None:
        return await self._run(lambda ops: ops.history(run_id), light=True)

    async def claim_runs(self, run_ids: Sequence[uuid.UUID], client_id: str) -> list[TaskRun]:
        now = utcnow()
        return await self._run(lambda ops: ops.claim_runs(run_ids, client_id, now), light=_few(run_ids))

    def claim_runs_soon(
        self, runs: Sequence[TaskRun], client_id: str, now: datetime
    ) -> QueuedOp[list[TaskRun]]:
        """Queue a claim of ``runs`` (as the store holds them) and return at once; later
        operations see it done."""
        ids = [run.id for run in runs]
        known = {run.id: run for run in runs}
        return self._queue(lambda ops: ops.claim_runs(ids, client_id, now, known), light=_few(ids))

    async def set_states(
        self,
        requests: Sequence[tuple[uuid.UUID, SetStateRequest]],
        *,
        now: float,
        holder: str | None = None,
    ) -> list[Change]:
        light = _few(requests) and not any(can_cascade(request) for _, request in requests)
        return await self._run(lambda ops: ops.set_states(requests, now, holder), light=light)

    async def requeue(
        self,
        run_ids: Sequence[uuid.UUID],
        *,
        reason: str,
        max_deliveries: int | None,
        holder: str | None = None,
    ) -> list[Requeued]:
        return await self._run(
            lambda ops: ops.requeue(run_ids, reason, max_deliveries, holder), light=_few(run_ids)
        )

    async def delete_run(self, run_id: uuid.UUID) -> TaskRun | None:
        return await self._run(lambda ops: ops.delete_run(run_id))

    async def purge_ended(
        self,
        before: datetime,
        *,
        task_key: str | None = None,
        state: StateType | None = None,
        limit: int = 1000,
    ) -> list[uuid.UUID]:
        return await self._run(lambda ops: ops.purge_ended(before, task_key, state, limit))

    async def oldest_end(self) -> datetime | None:
        return await self._count(lambda ops: ops.oldest_end())

    async def reclaim(
        self, run_ids: Sequence[uuid.UUID], client_id: str
    ) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
        return await self._run(lambda ops: ops.reclaim(run_ids, client_id), light=_few(run_ids))

    async def recover(self, max_deliveries: int) -> list[QueuedRun]:
        return await self._run(lambda ops: ops.recover(max_deliveries))

    async def states_of(self, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, StateType]:
        return await self._run(lambda ops: ops.states_of(run_ids), light=_few(run_ids))

    async def runs_by_idempotency_key(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], uuid.UUID]:
        return await self._run(lambda ops: ops.runs_by_idempotency_key(keys), light=_few(keys))

    async def read_ended(self, run_ids: Sequence[uuid.UUID]) -> tuple[list[TaskRun], set[uuid.UUID]]:
        return await self._run(lambda ops: ops.read_ended(run_ids), light=_few(run_ids))

    # -- schedules
    async def upsert_schedule(self, create: ScheduleCreate, now: datetime) -> tuple[Schedule, bool]:
        return await self._run(lambda ops: ops.upsert_schedule(create, now))

    async def read_schedules(self, name: str | None = None) -> list[Schedule]:
        return await self._run(lambda ops: ops.read_schedules(name))

    async def delete_schedule(self, name: str) -> Schedule | None:
        return await self._run(lambda ops: ops.delete_schedule(name))

    async def fire_schedules(self, now: float) -> Fired:
        return await self._run(lambda ops: ops.fire_schedules(now))


def _few(items: Sequence[object]) -> bool:
    """Whether an operation on ``items`` is light (see :data:`LIGHT_ITEMS`)."""
    return len(items) <= LIGHT_ITEMS


def can_cascade(request: SetStateRequest) -> bool:
    """Whether applying ``request`` may cancel a run's descendants (a tree of any size):
    a cancel, or an attempt that ran out of time (see
    :func:`~trioworker.server.store.runs.cancels_descendants`)."""
    state = request.state
    return state.type is StateType.CANCELLED or state.state_details.reason == TIMED_OUT
