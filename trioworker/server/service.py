"""The task-run service: every operation of the API, keeping the store and the dispatcher in step.

The store decides (atomically, in its database); the service then tells the dispatcher what
changed (runs to queue, leases to drop), wakes the clients waiting for runs to end, and
asks the connection that holds a cancelled run to stop it.

On a store several servers share (:class:`~trioworker.server.store.base.SharedStore`, with
a ``shared`` dispatcher), runs are claimed from the store's ready table, each only after its
claim commits, and what other servers change reaches this one as notices
(:meth:`TaskRunService.apply_notices`, from :mod:`trioworker.server.replicas`): this server
then reads the runs its waiters, dependents and sockets care about.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Final

import attrs
import trio

from trioworker._version import __version__
from trioworker.models import (
    ACTIVE_STATES,
    CancelResult,
    GroupCancelResult,
    Schedule,
    ScheduleCreate,
    SetStateRequest,
    SetStateResult,
    SetStateStatus,
    StateChange,
    StateType,
    TaskRun,
    TaskRunCreate,
    WaitResult,
    make_state,
    utcnow,
)
from trioworker.schedules import checked
from trioworker.server.fence import Fence
from trioworker.server.limits import QueueLimit
from trioworker.server.live import LiveFeed
from trioworker.server.metrics import ServerMetrics
from trioworker.server.overview import Overview, OverviewReader, connected_workers, workers_of
from trioworker.server.queue import Dispatcher, Subscription
from trioworker.server.sockets import Refusal
from trioworker.server.store.base import (
    LEASED_ELSEWHERE,
    Change,
    ConnectedWorker,
    Heartbeat,
    LiveServer,
    Notice,
    QueuedRun,
    Requeued,
    RunIdTaken,
    SharedStore,
    Store,
    StoreError,
)
from trioworker.server.store.runs import claimed_copy, default_name

log = logging.getLogger("trioworker.server")

#: Bounds of the fresh-run cache: entries, bytes in all, bytes of one run.
FRESH_MAX_RUNS: Final = 5_000
FRESH_MAX_BYTES: Final = 16 * 1024 * 1024
FRESH_MAX_RUN_BYTES: Final = 64 * 1024
#: Runs a purge deletes per store operation (other operations run between two).
PURGE_BATCH: Final = 500


@attrs.define(eq=False)
class FreshRuns:
    """Runs created here and queued since, as they are in the store: a claim of these
    can deliver them before it commits (the store need not be read first).

    Every change to a run through the service drops it, so what is here is what the store
    holds. It is bounded, and only runs that will be due at once get in.
    """

    _runs: dict[uuid.UUID, tuple[TaskRun, int]] = attrs.field(factory=dict)
    _bytes: int = 0

    def add(self, run: TaskRun, queued: QueuedRun) -> None:
        if (
            queued.scheduled_at is not None
            or queued.wait_for
            or queued.size == 0
            or queued.size > FRESH_MAX_RUN_BYTES
            or len(self._runs) >= FRESH_MAX_RUNS
            or self._bytes + queued.size > FRESH_MAX_BYTES
        ):
            return
        self._runs[run.id] = (run, queued.size)
        self._bytes += queued.size

    def pop(self, run_id: uuid.UUID) -> TaskRun | None:
        entry = self._runs.pop(run_id, None)
        if entry is None:
            return None
        self._bytes -= entry[1]
        return entry[0]

    def __len__(self) -> int:
        return len(self._runs)


async def _nothing() -> None:
    return None


@attrs.frozen
class Delivery:
    """Runs to send to a subscription, and what to await once they are sent."""

    runs: list[TaskRun]
    #: Waits until the claim is committed, and deals with runs it could not claim.
    confirm: Callable[[], Awaitable[None]] = _nothing


@attrs.define(eq=False)
class Waiter:
    """A client waiting for runs to end; the service hands it each run that does."""

    ended: list[TaskRun] = attrs.field(factory=list)
    deleted: list[uuid.UUID] = attrs.field(factory=list)
    changed: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class TaskRunService:
    store: Store
    dispatcher: Dispatcher
    #: A run delivered this many times without finishing becomes CRASHED.
    max_deliveries: int = 5
    #: The bound on runs queued per task key (``--max-queued``; none by default).
    queue_limit: QueueLimit = attrs.field(factory=QueueLimit)
    _waiters: dict[uuid.UUID, list[Waiter]] = attrs.field(factory=dict)
    fresh: FreshRuns = attrs.field(factory=FreshRuns)
    #: Runs held back until their ``wait_for`` runs complete: id -> (index entry, still pending).
    _blocked: dict[uuid.UUID, tuple[QueuedRun, set[uuid.UUID]]] = attrs.field(factory=dict)
    #: upstream id -> the blocked runs waiting for it
    _dependents: dict[uuid.UUID, set[uuid.UUID]] = attrs.field(factory=dict)
    #: Blocked runs to fail because an upstream did not complete: (id, why).
    _doomed: list[tuple[uuid.UUID, str]] = attrs.field(factory=list)
    #: Every change made here, for the dashboard's tabs.
    feed: LiveFeed[Overview] = attrs.field(factory=LiveFeed)
    #: This server's Prometheus metrics.
    metrics: ServerMetrics = attrs.field(factory=ServerMetrics)
    #: This server's id, as operators see it (among servers sharing a store, the one it
    #: registers with: see :mod:`~trioworker.server.replicas`).
    server_id: uuid.UUID = attrs.field(factory=uuid.uuid4)
    #: When it started (UTC).
    started: datetime = attrs.field(factory=utcnow)
    #: Its URL, once it listens.
    url: str | None = None
    #: Set when a worker subscribed or left; whoever waits for it puts a new event first.
    workers_changed: trio.Event = attrs.field(factory=trio.Event)
    _overview_reader: OverviewReader = attrs.field(
        default=attrs.Factory(
            lambda self: OverviewReader(self.store, self.dispatcher, self.here), takes_self=True
        )
    )
    #: Blocked runs whose upstreams all completed, to release in a shared store.
    _unblocked: list[QueuedRun] = attrs.field(factory=list)
    #: Runs that waited for the run computing their cache key, which ended: for the store
    #: to decide again (:meth:`~trioworker.server.store.base.Store.settle_cached`).
    _settle: list[uuid.UUID] = attrs.field(factory=list)
    #: This server's id among those sharing the store (None: it is alone).
    replica_id: uuid.UUID | None = None
    #: Raised, this server's sockets close (see :mod:`trioworker.server.fence`).
    fence: Fence = attrs.field(factory=Fence)
    #: Set when schedules may have changed (here, or on another server): the schedule timer
    #: (:mod:`~trioworker.server.schedules`) reads them again, and replaces it.
    schedules_changed: trio.Event = attrs.field(factory=trio.Event)
    _shared: SharedStore | None = attrs.field(init=False, default=None)
    #: Shared store: runs a connection held that could not be handed back (the database
    #: was away): (reason, holder) -> their ids, handed back after the next heartbeat.
    _unreturned: dict[tuple[str, str], set[uuid.UUID]] = attrs.field(factory=dict)
    #: One set per create under way that leases runs at create (by the set's ``id()``): the
    #: runs changed from outside meanwhile while nobody held them here (see :meth:`_create_runs`).
    _changed_while_leasing: dict[int, set[uuid.UUID]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.queue_limit.max_queued is not None:
            self.dispatcher.on_taken = self.queue_limit.taken
        if self.dispatcher.shared:
            if not isinstance(self.store, SharedStore):
                raise TypeError("a shared dispatcher needs a store that servers can share")
            self._shared = self.store

    async def recover(self) -> int:
        """Rebuild the dispatcher's queues from the store (at start); returns how many are queued."""
        queued = await self.store.recover(self.max_deliveries)
        await self._admit(queued)
        return len(queued)

    @property
    def blocked_count(self) -> int:
        return len(self._blocked)

    # -- REST operations
    async def create_runs(
        self, creates: Sequence[TaskRunCreate], *, partial: bool = False
    ) -> list[tuple[TaskRun, bool]]:
        """Create runs; returns each with whether it is new (False: the run an idempotency
        key or a given ``id`` already named, which no queue limit holds back).

        Args:
            partial: when a key's queue is full, make the creates that fit (the first
                ones) and refuse the rest, instead of refusing all.

        Raises:
            Refusal: 409 when a given ``id`` belongs to a run the create is not a repeat
                of (another task key or idempotency key); nothing is created then.
            QueueFullRefusal: 429 when they would take a key's queue past :attr:`queue_limit`
                (see :mod:`~trioworker.server.limits`): nothing is created then, or
                (``partial``) the first ``room`` creates, whose runs it carries (``created``).
        """
        async with self.queue_limit.admitting(
            creates, self.dispatcher, self.store, partial=partial
        ) as admission:
            results = await self._create_runs(creates[: admission.admitted]) if admission.admitted else []
        if admission.refusal is not None:
            admission.refusal.created = [run for run, _ in results]
            raise admission.refusal
        return results

    async def wait_room(self, task_key: str, wanted: int, *, seconds: float) -> int | None:
        """How many more runs of ``task_key`` fit in its queue, once at least ``wanted`` do
        or ``seconds`` passed (woken by workers taking runs, not by polling); None when the
        server has no queue limit. On a shared store it answers at once, from the store's
        count (takes through other servers wake nothing here)."""
        limit = self.queue_limit
        if limit.max_queued is None:
            return None
        if self._shared is not None:
            ready = await self._shared.count_ready([task_key], self.dispatcher.clock())
            return limit.room(task_key, ready.get(task_key, 0))
        with trio.move_on_after(seconds):
            await limit.wait_room(task_key, min(wanted, limit.max_queued), self.dispatcher)
        return limit.room(task_key, self.dispatcher.ready_count(task_key))

    async def _create_runs(self, creates: Sequence[TaskRunCreate]) -> list[tuple[TaskRun, bool]]:
        """Create runs; those a subscription has a free slot for are leased to it in the
        create's own transaction (:meth:`_reserve_leases`), and sent to it right after the
        commit: no claim of their own."""
        now = self.dispatcher.clock()
        leases, queued_keys = self._reserve_leases(creates, now)
        changed: set[uuid.UUID] = set()
        if leases:
            self._changed_while_leasing[id(changed)] = changed
        handback: dict[str, list[uuid.UUID]] | None = None
        try:
            try:
                results = await self.store.create_runs(
                    creates, now=now, leases={i: sub.client_id for i, sub in leases.items()} or None
                )
            except RunIdTaken as exc:
                raise Refusal(409, str(exc)) from None
            handback = self._settle_leases(leases, results, changed, now)
            await self._admit_created(results)
        finally:
            if leases:
                del self._changed_while_leasing[id(changed)]
                if handback is None:  # the store made nothing: the slots held are free again
                    for sub in leases.values():
                        self.dispatcher.unreserve(sub)
            self.dispatcher.creating(queued_keys, -1)
            if handback:
                with trio.CancelScope(shield=True):  # whatever ends this call, they go back
                    for holder, run_ids in handback.items():
                        await self._requeue(run_ids, reason="release", holder=holder)
        return [(run, queued is not None) for run, queued in results]

    def _reserve_leases(
        self, creates: Sequence[TaskRunCreate], now: float
    ) -> tuple[dict[int, Subscription], list[str]]:
        """Before a create: which of ``creates`` (by position) to lease to which subscription
        in the create's own transaction, a free slot held for each (:meth:`Dispatcher.reserve
        <trioworker.server.queue.Dispatcher.reserve>`); and the task keys of the others
        that will be queued when made (one per create), which meanwhile no create leases
        past. Runs that wait (for others, or until later) are neither. A shared store
        leases nothing at create: other servers claim its ready runs too."""
        leases: dict[int, Subscription] = {}
        queued_keys: list[str] = []
        if self._shared is not None:
            return leases, queued_keys
        for index, create in enumerate(creates):
            if create.wait_for or (
                create.scheduled_time is not None and create.scheduled_time.timestamp() > now
            ):
                continue
            sub = self.dispatcher.reserve(create.task_key)
            if sub is None:
                queued_keys.append(create.task_key)
                self.dispatcher.creating([create.task_key])
            else:
                leases[index] = sub
        return leases, queued_keys

    def _settle_leases(
        self,
        leases: Mapping[int, Subscription],
        results: Sequence[tuple[TaskRun, QueuedRun | None]],
        changed: set[uuid.UUID],
        now: float,
    ) -> dict[str, list[uuid.UUID]]:
        """After a create (before any checkpoint): the runs the store leased become held
        runs of their subscriptions, to send (:attr:`Subscription.unsent`); the other slots
        held are given back. Returns the runs to hand back (``holder -> ids``): leased to a
        subscription that quit or left meanwhile. A run changed from outside meanwhile
        (cancelled, deleted: ``changed``) is no longer leased: its slot is given back."""
        handback: dict[str, list[uuid.UUID]] = {}
        leased: list[TaskRun] = []
        for index, sub in leases.items():
            run, entry = results[index]
            if (
                entry is None
                or run.state.type is not StateType.PENDING
                or run.state.state_details.client_id != sub.client_id
                or run.id in changed
            ):
                self.dispatcher.unreserve(sub)
            elif self.dispatcher.lease_created(sub, run):
                leased.append(run)
            else:
                handback.setdefault(sub.client_id, []).append(run.id)
        if leased:
            self.metrics.runs_delivered(
                leased, dict.fromkeys((run.id for run in leased), now), self.dispatcher.clock()
            )
            if self.dispatcher.on_taken is not None:  # taken by workers, as from the queue
                self.dispatcher.on_taken(Counter(run.task_key for run in leased))
        return handback

    async def _admit_created(self, results: Sequence[tuple[TaskRun, QueuedRun | None]]) -> None:
        """Runs were created (those with a queue entry are new): queue them, tell the tabs."""
        created = [run for run, queued in results if queued is not None]
        # Only a SCHEDULED run is queued: one answered from the cache is created COMPLETED,
        # one whose group or parent was cancelled is created CANCELLED.
        queued = [(run, q) for run, q in results if q is not None and run.state.type is StateType.SCHEDULED]
        if self._shared is None:
            for run, entry in queued:
                self.fresh.add(run, entry)
        self.feed.runs_changed(created)
        self.metrics.runs_created(created)
        self.metrics.runs_changed(run for run in created if run.state.is_terminal)
        await self._admit(entry for _, entry in queued)

    async def read_run(self, run_id: uuid.UUID) -> TaskRun | None:
        return await self.store.read_run(run_id)

    async def list_runs(
        self,
        *,
        task_key: str | None,
        state: StateType | None,
        limit: int,
        offset: int,
        parent_task_run_id: uuid.UUID | None = None,
        newest_first: bool = False,
        tags: Sequence[str] = (),
        group_id: uuid.UUID | None = None,
    ) -> list[TaskRun]:
        return await self.store.list_runs(
            task_key=task_key,
            state=state,
            limit=limit,
            offset=offset,
            parent_task_run_id=parent_task_run_id,
            newest_first=newest_first,
            tags=tags,
            group_id=group_id,
        )

    async def descendants(self, run_id: uuid.UUID, *, limit: int) -> list[TaskRun] | None:
        """The runs submitted from inside ``run_id``, and from inside those, ... (see
        :meth:`Store.descendants <trioworker.server.store.base.Store.descendants>`); None
        when the run does not exist."""
        if await self.store.read_run(run_id) is None:
            return None
        return await self.store.descendants(run_id, limit=limit)

    async def find_runs(self, id_prefix: str, *, limit: int) -> list[TaskRun]:
        """The runs whose id starts with ``id_prefix`` (canonical: see
        :func:`trioworker.protocol.id_prefix`), in id order, at most ``limit``."""
        return await self.store.find_runs(id_prefix, limit=limit)

    async def overview(self, *, throttled: bool = False) -> Overview:
        """The operator's overview, shared by every caller while nothing changed;
        ``throttled`` for a tab's push (see :meth:`~trioworker.server.live.LiveFeed.overview`)."""
        return await self.feed.overview(self._overview_reader.read, throttled=throttled)

    def workers(self) -> list[ConnectedWorker]:
        """The workers connected to this server, longest connected first."""
        return connected_workers(self.dispatcher, self.server_id)

    def here(self) -> LiveServer:
        """This server as it is now, its workers included."""
        return LiveServer(self.server_id, __version__, self.started, self.url, None, self.workers())

    async def live_servers(self) -> list[LiveServer]:
        """Every live server using the store with its workers, this one first (see
        :meth:`~trioworker.server.store.base.Store.live_servers`)."""
        return await self.store.live_servers(self.here())

    async def task_workers(self, task_key: str | None = None) -> list[ConnectedWorker]:
        """The workers of every live server using the store (that take runs of
        ``task_key``, when given), longest connected first."""
        return workers_of(await self.live_servers(), task_key)

    async def retry(self, run_id: uuid.UUID) -> TaskRun:
        """A new run of the ended run ``run_id``, with the same task, parameters, tags,
        context, parent, ``wait_for`` and cache key; SCHEDULED (or answered from the cache,
        or leased at once to a worker with room, as a new submission would be; in no run
        group; detached when it was, or when its parent was cancelled). Its name is the one a new submission
        gets (``<task key>-<its id's first 8 hex digits>``) unless the old run's was given
        at submission (then that name again).

        Raises:
            Refusal: 404 when the run does not exist; 409 when it has not ended (cancel it
                first: two runs of one call would run at once).
        """
        run = await self.store.read_run(run_id)
        if run is None:
            raise Refusal(404, f"no task run {run_id}")
        if not run.state.is_terminal:
            raise Refusal(
                409,
                f"the run is {run.state.type.value}: only a run that ended can be retried (cancel it first)",
            )
        create = TaskRunCreate(
            task_key=run.task_key,
            name=None if run.name == default_name(run.task_key, run.id) else run.name,
            parameters=run.parameters,
            serializer=run.serializer,
            tags=list(run.tags),
            context=dict(run.context),
            parent_task_run_id=run.parent_task_run_id,
            wait_for=list(run.wait_for),
            cache_key=run.cache_key,
            cache_expiration=run.cache_expiration,
            refresh_cache=run.refresh_cache,
            # The operator's call: it joins no group (the group's block is over), and it
            # runs even when its parent was cancelled (then detached from it).
            detached=run.detached or await self._parent_cancelled(run),
        )
        [(new, _)] = await self.create_runs([create])
        return new

    async def _parent_cancelled(self, run: TaskRun) -> bool:
        if run.parent_task_run_id is None:
            return False
        states = await self.store.states_of([run.parent_task_run_id])
        return states.get(run.parent_task_run_id) is StateType.CANCELLED

    async def history(self, run_id: uuid.UUID) -> list[StateChange] | None:
        return await self.store.history(run_id)

    async def set_states(
        self,
        requests: Sequence[tuple[uuid.UUID, SetStateRequest]],
        *,
        reporter: Subscription | None = None,
    ) -> list[SetStateResult]:
        """Apply proposed states; ``reporter`` is the connection they came on, if any.

        A run that leaves PENDING/RUNNING loses its lease, which frees its holder's
        credit. When the change comes from elsewhere (REST) while a connection holds the
        run, that holder is told to stop it and keeps the lease until it answers, so
        its credit keeps counting the run it is still busy with.
        """
        results = await self._set_states(requests, reporter)
        await self._fail_doomed()
        return results

    async def _set_states(
        self, requests: Sequence[tuple[uuid.UUID, SetStateRequest]], reporter: Subscription | None
    ) -> list[SetStateResult]:
        holder = None if reporter is None else reporter.client_id
        changes = await self.store.set_states(requests, now=self.dispatcher.clock(), holder=holder)
        for (run_id, _), change in zip(requests, changes, strict=True):
            self._after_change(run_id, change, reporter)
        self._changed(changes)
        self._cascaded(changes)
        return [c.result for c in changes]

    def _changed(self, changes: Sequence[Change]) -> None:
        """Tell the tabs and the metrics of the runs these changes changed."""
        changed = [
            c.run
            for c in changes
            if c.run is not None and c.result.status is SetStateStatus.ACCEPT and c.result.details is None
        ]
        self.feed.runs_changed(changed)
        self.metrics.runs_changed(changed)

    def _cascaded(self, changes: Sequence[Change]) -> None:
        """The descendants these changes cancelled (see
        :func:`~trioworker.server.store.runs.cancels_descendants`): their holders stop them,
        their waiters and dependents learn they ended, as for any change from outside."""
        self._descendants_cancelled([d for c in changes for d in c.descendants])

    def _descendants_cancelled(self, descendants: Sequence[Change]) -> None:
        """Runs cancelled with another (:meth:`_cascaded`), handled as cancels from outside."""
        if not descendants:
            return
        for change in descendants:
            assert change.run is not None
            self._after_change(change.run.id, change, None)
        self._changed(descendants)

    async def cancel(self, run_id: uuid.UUID) -> CancelResult:
        """Cancel the run and, in the same transaction, its descendants that have not ended
        (detached ones and theirs left alone): the answer says which."""
        state = make_state(StateType.CANCELLED, message="cancelled on request")
        [change] = await self.store.set_states(
            [(run_id, SetStateRequest(state))], now=self.dispatcher.clock(), holder=None
        )
        self._after_change(run_id, change, None)
        self._changed([change])
        self._cascaded([change])
        await self._fail_doomed()
        result = change.result
        return CancelResult(
            result.status,
            result.state,
            result.details,
            [d.run.id for d in change.descendants if d.run is not None],
        )

    async def cancel_group(self, group_id: uuid.UUID) -> GroupCancelResult:
        """Cancel the run group ``group_id`` in one transaction (see
        :meth:`Store.cancel_group <trioworker.server.store.base.Store.cancel_group>`): its
        runs that have not ended and their descendants; a run created in it afterwards is
        created CANCELLED. A group with no runs (yet) is cancelled all the same."""
        changes = await self.store.cancel_group(group_id, now=self.dispatcher.clock())
        for change in changes:
            assert change.run is not None
            self._after_change(change.run.id, change, None)
        self._changed(changes)
        self._cascaded(changes)
        await self._fail_doomed()
        cancelled = [
            c.run.id
            for c in changes
            if c.run is not None and c.result.status is SetStateStatus.ACCEPT and c.result.details is None
        ]
        descendants = [d.run.id for c in changes for d in c.descendants if d.run is not None]
        return GroupCancelResult(group_id, cancelled + descendants)

    async def delete(self, run_id: uuid.UUID) -> TaskRun | None:
        """Delete the run and its history (its holder is told to stop it); a run that had
        not ended takes its descendants with it, cancelled in the same transaction."""
        run, descendants = await self.store.delete_run_cascading(run_id, now=self.dispatcher.clock())
        self.fresh.pop(run_id)
        if run is not None:
            self._deleted([run_id])
            self._descendants_cancelled(descendants)
            await self._fail_doomed()
        return run

    async def purge_ended(
        self, before: datetime, *, task_key: str | None = None, state: StateType | None = None
    ) -> int:
        """Delete the runs that ended before ``before``, with their history (of ``task_key``
        and in ``state``, a terminal state type, when given); returns how many.

        It deletes :data:`PURGE_BATCH` runs per store operation, so a big purge never holds
        the store for long: other operations run between its batches.
        """
        total = 0
        while True:
            ids = await self.store.purge_ended(before, task_key=task_key, state=state, limit=PURGE_BATCH)
            self._deleted(ids)
            total += len(ids)
            if len(ids) < PURGE_BATCH:
                break
        await self._fail_doomed()
        return total

    def _deleted(self, run_ids: Sequence[uuid.UUID]) -> None:
        """These runs were deleted: tell the tabs, stop their holders, wake their waiters."""
        if not run_ids:
            return
        self.feed.deleted(run_ids)
        self.metrics.forget(run_ids)
        self._overview_reader.forget()
        for run_id in run_ids:
            self.fresh.pop(run_id)
            holder = self.dispatcher.holder(run_id)
            if holder is None:
                self._not_held_any_more(run_id)
            else:
                unsent = run_id in holder.unsent
                self.dispatcher.release(run_id)
                if not unsent:
                    holder.request_cancel(run_id)
            self._notify_ended(run_id, None)

    async def watch(
        self, waiter: Waiter, run_ids: Sequence[uuid.UUID]
    ) -> tuple[list[TaskRun], list[uuid.UUID]]:
        """Hand ``waiter`` these runs when they end; returns ``(already ended, missing)``.

        Registered before the runs are read, so none can end unseen in between.
        """
        for run_id in run_ids:
            self._waiters.setdefault(run_id, []).append(waiter)
        ended, found = await self.store.read_ended(list(run_ids))
        missing = [i for i in run_ids if i not in found]
        for run_id in missing:
            self.unwatch(waiter, [run_id])
        return ended, missing

    def watch_unread(self, waiter: Waiter, run_ids: Iterable[uuid.UUID]) -> None:
        """Hand ``waiter`` these runs when they end, reading nothing: for the ids of runs
        about to be created, registered before their create, so that none can end unseen.
        Only where every end passes through this server (not on a shared store, where a
        resync would take a run not created yet for a deleted one): there use :meth:`watch`
        once they exist. The caller unwatches the ids that were not created."""
        for run_id in run_ids:
            self._waiters.setdefault(run_id, []).append(waiter)

    def unwatch(self, waiter: Waiter, run_ids: Iterable[uuid.UUID]) -> None:
        for run_id in run_ids:
            waiters = self._waiters.get(run_id)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[run_id]

    async def wait(
        self, run_ids: Sequence[uuid.UUID], *, seconds: float, wait_all: bool, linger: float = 0.0
    ) -> WaitResult:
        """Wait until one (or, with ``wait_all``, every) run has ended, or ``seconds`` pass.

        With ``linger``, once one run ended, keep collecting for that much longer: one
        answer then carries a burst of ends instead of one request per end.

        No polling: the waiter is registered before the runs are read, and every state
        change that ends a run hands it over.
        """
        ids = frozenset(run_ids)
        waiter = Waiter()
        for run_id in ids:
            self._waiters.setdefault(run_id, []).append(waiter)
        try:
            ended_runs, found = await self.store.read_ended(list(ids))
            ended = {r.id: r for r in ended_runs}
            missing = set(ids - found)
            left = set(ids - ended.keys() - missing)

            def collect() -> set[uuid.UUID]:
                # Incremental: each end costs O(1), so a wait on 10,000 runs stays linear.
                for run in waiter.ended:
                    if run.id in left:
                        ended[run.id] = run
                        left.discard(run.id)
                waiter.ended.clear()
                for run_id in waiter.deleted:
                    if run_id in left:
                        missing.add(run_id)
                        left.discard(run_id)
                waiter.deleted.clear()
                return left

            lingering = False
            with trio.move_on_after(seconds) as scope:
                while collect():
                    if (ended or missing) and not wait_all and not lingering:
                        if linger <= 0:
                            break
                        lingering = True
                        scope.deadline = min(scope.deadline, trio.current_time() + linger)
                    waiter.changed = trio.Event()
                    await waiter.changed.wait()
            collect()
            return WaitResult(list(ended.values()), sorted(missing), sorted(left))
        finally:
            for run_id in ids:
                waiters = self._waiters.get(run_id)
                if waiters is not None:
                    waiters.remove(waiter)
                    if not waiters:
                        del self._waiters[run_id]

    # -- subscription operations
    async def next_runs(self, sub: Subscription) -> Delivery:
        """Lease and claim the next runs for ``sub`` (none when it has no room or nothing is ready).

        When every run is fresh, the claim is only queued: the runs can be sent while it
        commits, since whatever the worker reports about them is applied after it. Send
        them, then await ``confirm``.

        From a shared store, runs are claimed from its ready table, and sent once the
        claim committed (another server may claim any run at any time).
        """
        if self._shared is not None:
            return await self._claim_shared(sub, self._shared)
        if sub.unsent:  # leased when they were created: claimed already
            runs = [run for run_id, run in sub.unsent.items() if self.dispatcher.holder(run_id) is sub]
            sub.unsent.clear()
            if runs:
                return Delivery(runs)
        while True:
            ready_since = self.dispatcher.take_timed(sub)
            ids = list(ready_since)
            if not ids:
                return Delivery([])
            fresh = [run for run_id in ids if (run := self.fresh.pop(run_id)) is not None]
            if len(fresh) == len(ids):
                break
            claimed = await self.store.claim_runs(ids, sub.client_id)
            self._release_unclaimed(ids, {run.id for run in claimed}, sub)
            if claimed:
                self.feed.runs_changed(claimed)
                self.metrics.runs_delivered(claimed, ready_since, self.dispatcher.clock())
                return Delivery(claimed)
            # Every run taken had changed since it was queued (cancelled, deleted): take the
            # next ones now; nothing else would wake this subscription for them.
        now = utcnow()
        claim = self.store.claim_runs_soon(fresh, sub.client_id, now)

        async def confirm() -> None:
            claimed = await claim.result()
            self._release_unclaimed(ids, {run.id for run in claimed}, sub, delivered=True)

        runs = [claimed_copy(run, sub.client_id, now) for run in fresh]
        self.feed.runs_changed(runs)
        self.metrics.runs_delivered(runs, ready_since, self.dispatcher.clock())
        return Delivery(runs, confirm)

    async def _claim_shared(self, sub: Subscription, shared: SharedStore) -> Delivery:
        """Claim from ``shared``'s ready runs what ``sub`` has room for, when it was hinted
        that runs of its keys may be ready (a claim that got all it asked for hints again;
        one that got fewer leaves a hint for the next delayed run's due time)."""
        limit, slots = self.dispatcher.claim_room(sub)
        if limit <= 0 or not sub.take_hint():
            return Delivery([])
        known = list(sub.held) if sub.claim_failed else None
        try:
            claimed = await shared.claim_ready(
                sub.keys, limit, sub.client_id, self.dispatcher.clock(), known=known
            )
        except StoreError as exc:
            # The socket stays: the next wake (a notice, the safety net) tries again.
            if not sub.claim_failed:
                log.warning("no runs claimed for %s (%s); trying again", sub.client_id, exc)
            sub.claim_failed = sub.hinted = True
            return Delivery([])
        sub.claim_failed = False
        self.dispatcher.lease_claimed(sub, ((run.id, run.task_key) for run in claimed.runs), slots)
        if len(claimed.runs) == limit:
            sub.hinted = True
        elif claimed.next_due is not None:
            self.dispatcher.hint_at(claimed.next_due, sub.keys)
        self.feed.runs_changed(claimed.runs)
        self.metrics.runs_delivered(claimed.runs, claimed.ready_since, self.dispatcher.clock())
        return Delivery(claimed.runs)

    def _release_unclaimed(
        self, ids: Sequence[uuid.UUID], claimed: set[uuid.UUID], sub: Subscription, *, delivered: bool = False
    ) -> None:
        """Drop the leases of runs the store would not claim (changed since they were queued)."""
        for run_id in ids:
            if run_id not in claimed:
                self.dispatcher.release(run_id)
                if delivered:
                    sub.request_cancel(run_id)  # it was sent before the claim failed

    async def reclaim(self, sub: Subscription, run_ids: Sequence[uuid.UUID]) -> None:
        """A reconnected client says it still works on ``run_ids``.

        What nobody else took is leased to ``sub`` again (so the run is not run twice);
        for the rest ``sub`` is told to cancel its copy.
        """
        if not run_ids:
            return
        kept, lost = await self.store.reclaim(run_ids, sub.client_id)
        for run_id in kept:
            self.dispatcher.lease(sub, run_id)
        self.feed.states_changed((run_id, None) for run_id in kept)
        for run_id in lost:
            sub.request_cancel(run_id)

    async def release(self, sub: Subscription, run_ids: Sequence[uuid.UUID]) -> None:
        """The worker hands back runs it will not run (stopping, or a key it lost)."""
        mine = [i for i in run_ids if self.dispatcher.holder(i) is sub]
        await self._requeue(mine, reason="release", holder=sub.client_id)

    def subscribe(self, sub: Subscription) -> None:
        """A worker's connection subscribed: runs of its keys may go to it."""
        self.dispatcher.subscribe(sub)
        self._workers_changed()

    async def disconnect(self, sub: Subscription, *, clean: bool = False) -> None:
        """A connection ended: every run it held and did not finish goes to another.

        Args:
            clean: the client quit first, so what it still held was handed back unopened
                and does not count as a failed delivery.
        """
        unsent = set(sub.unsent)
        held = self.dispatcher.unsubscribe(sub)
        self._workers_changed()
        # Runs leased at create and never sent go back unopened, whatever ended the connection.
        await self._requeue(sorted(held & unsent), reason="release", holder=sub.client_id)
        await self._requeue(
            sorted(held - unsent), reason="release" if clean else "redelivery", holder=sub.client_id
        )

    async def hand_back_unsent(self, sub: Subscription) -> None:
        """``sub`` quit: the runs leased to it at create and not sent yet go back, unopened."""
        await self._requeue(sorted(sub.unsent), reason="release", holder=sub.client_id)

    def _workers_changed(self) -> None:
        self.feed.workers_changed()
        self.workers_changed.set()

    async def _requeue(self, run_ids: Sequence[uuid.UUID], *, reason: str, holder: str) -> None:
        """Hand back ``run_ids``, which ``holder`` held through this server.

        Raises:
            StoreError: the store failed, and it is not shared: the next start hands them
                back. (A shared store's are handed back after the next heartbeat, see
                :meth:`reaped`, unless a connection of this server took them meanwhile.)
        """
        if not run_ids:
            return
        for run_id in run_ids:
            self.dispatcher.release(run_id)
        started = utcnow()
        try:
            outcomes = await self.store.requeue(
                run_ids, reason=reason, max_deliveries=self.max_deliveries, holder=holder
            )
        except StoreError as exc:
            if self._shared is None:
                raise
            log.warning(
                "%d run(s) of %s not handed back yet (%s); trying again after the next heartbeat",
                len(run_ids),
                holder,
                exc,
            )
            self._unreturned.setdefault((reason, holder), set()).update(run_ids)
            return
        await self._requeued(outcomes, started)

    async def _requeue_unreturned(self) -> None:
        """Hand back what could not be before (see :meth:`_requeue`), but for the runs a
        connection of this server took meanwhile (its worker came back with them)."""
        unreturned, self._unreturned = self._unreturned, {}
        for (reason, holder), run_ids in unreturned.items():
            await self._requeue(
                sorted(i for i in run_ids if self.dispatcher.holder(i) is None), reason=reason, holder=holder
            )

    async def _requeued(self, outcomes: Sequence[Requeued], started: datetime | None = None) -> None:
        """Runs went back to the queue (or CRASHED): queue them, wake their waiters.
        ``started``: when the requeue began (a CRASHED run updated before had crashed
        before, and is only reported); None: every CRASHED run crashed in it."""
        self.feed.states_changed((o.id, o.state_type) for o in outcomes if o.state_type is not None)
        self.metrics.forget(o.id for o in outcomes if o.state_type is not StateType.CRASHED)
        self.dispatcher.enqueue((o.queued for o in outcomes if o.queued is not None), front=True)
        crashed = [o.id for o in outcomes if o.state_type is StateType.CRASHED]
        if crashed:
            crashed_runs = await self.store.read_runs(crashed)
            # Only the runs this requeue crashed (one that had crashed before is only reported).
            self.metrics.runs_changed(
                run for run in crashed_runs if started is None or run.updated >= started
            )
            for run in crashed_runs:
                self._notify_ended(run.id, run)
            await self._fail_doomed()

    # -- wait_for: runs held back until others complete
    async def _admit(self, queued: Iterable[QueuedRun]) -> None:
        """Queue runs, holding back those whose ``wait_for`` runs have not all completed.

        The hold is registered before the upstream states are read, so an upstream that
        ends meanwhile releases its dependents through :meth:`_upstream_ended` either way.
        """
        ready: list[QueuedRun] = []
        gated: list[QueuedRun] = []
        for entry in queued:
            (gated if entry.wait_for else ready).append(entry)
        self.dispatcher.enqueue(ready)
        if not gated:
            return
        for entry in gated:
            self._blocked[entry.id] = (entry, set(entry.wait_for))
            for upstream in entry.wait_for:
                self._dependents.setdefault(upstream, set()).add(entry.id)
        upstreams = list({u for entry in gated for u in entry.wait_for})
        states = await self.store.states_of(upstreams)
        for upstream in upstreams:
            state = states.get(upstream)
            if state is None or state.is_terminal:
                self._upstream_ended(upstream, state)
        await self._fail_doomed()

    def _upstream_ended(self, upstream: uuid.UUID, state: StateType | None) -> None:
        for dependent in self._dependents.pop(upstream, ()):
            blocked = self._blocked.get(dependent)
            if blocked is None:
                continue
            entry, pending = blocked
            if entry.cache_owner == upstream:
                # It waited for the run computing its cache key: the store decides what
                # becomes of it (reused result, another run to wait for, or its own run).
                del self._blocked[dependent]
                self._settle.append(dependent)
                continue
            if state is not StateType.COMPLETED:
                del self._blocked[dependent]
                what = "does not exist" if state is None else f"ended {state.value}"
                self._doomed.append((dependent, f"a run it waits for ({upstream}) {what}"))
                continue
            pending.discard(upstream)
            if not pending:
                del self._blocked[dependent]
                if self._shared is None:
                    self.dispatcher.enqueue([entry])
                else:
                    self._unblocked.append(entry)

    async def _fail_doomed(self) -> None:
        """Release held-back runs whose upstreams completed (in a shared store: there they
        wait too), settle those whose cache key's run ended, and fail those whose upstream
        failed (and, in turn, their own dependents)."""
        while self._settle or self._doomed or (self._unblocked and self._shared is not None):
            if self._settle:
                await self._settle_cached()
            if self._unblocked and self._shared is not None:
                released, self._unblocked = self._unblocked, []
                try:
                    await self._shared.release_waiting([entry.id for entry in released])
                except StoreError:
                    self._unblocked = released + self._unblocked  # the next call tries again
                    raise
                self.dispatcher.enqueue(released)
            if self._doomed:
                doomed, self._doomed = self._doomed, []
                requests = [
                    (run_id, SetStateRequest(make_state(StateType.FAILED, message=f"not started: {why}")))
                    for run_id, why in doomed
                ]
                await self._set_states(requests, None)

    async def _settle_cached(self) -> None:
        """Have the store decide again the runs whose cache key's run ended: those answered
        from the cache end (their waiters and dependents hear of it), the others are held
        again (for the run that computes the key now, or their own ``wait_for``) or queued."""
        settle, self._settle = list(dict.fromkeys(self._settle)), []
        try:
            changes = await self.store.settle_cached(settle, now=self.dispatcher.clock())
        except StoreError:
            self._settle = settle + self._settle  # the next call tries again
            raise
        changed = [c.run for c in changes if c.run is not None and c.result.details is None]
        ended = [run for run in changed if run.state.is_terminal]
        self.feed.runs_changed(changed)
        self.metrics.runs_changed(ended)
        for run in ended:
            self._notify_ended(run.id, run)
        await self._admit(c.queued for c in changes if c.queued is not None)

    # -- bookkeeping
    def _after_change(self, run_id: uuid.UUID, change: Change, reporter: Subscription | None) -> None:
        self.fresh.pop(run_id)
        if change.result.details == LEASED_ELSEWHERE:
            if reporter is not None and self.dispatcher.holder(run_id) is reporter:
                self.dispatcher.release(run_id)  # its worker is told to stop (ABORT)
            return
        run = change.run
        if run is None:  # the run does not exist
            self._not_held_any_more(run_id)
            return
        if run.state.type in ACTIVE_STATES:
            return
        holder = self.dispatcher.holder(run_id)
        if holder is None:
            self._not_held_any_more(run_id)
        elif reporter is not None or run_id in holder.unsent:
            self.dispatcher.release(run_id)  # (an unsent run: its worker never heard of it)
        else:
            # Changed from outside: the holder must stop. It keeps the lease (and its
            # credit keeps counting the run) until it answers, unless the run is queued again.
            holder.request_cancel(run_id)
            if run.state.type is StateType.SCHEDULED:
                self.dispatcher.release(run_id)
        if change.queued is not None:
            self.dispatcher.enqueue([change.queued])
        if run.state.is_terminal and change.result.status is SetStateStatus.ACCEPT:
            self._notify_ended(run_id, run)

    def _not_held_any_more(self, run_id: uuid.UUID) -> None:
        """The run is no longer PENDING or RUNNING (or no longer exists): drop its lease. A
        create under way may have leased it a moment ago and not be told yet: it must not
        send it (see :meth:`_settle_leases`)."""
        self.dispatcher.release(run_id)
        for changed in self._changed_while_leasing.values():
            changed.add(run_id)

    def _notify_ended(self, run_id: uuid.UUID, run: TaskRun | None) -> None:
        if run_id in self._dependents:
            self._upstream_ended(run_id, None if run is None else run.state.type)
        for waiter in self._waiters.get(run_id, ()):
            if run is None:
                waiter.deleted.append(run_id)
            else:
                waiter.ended.append(run)
            waiter.changed.set()

    # -- schedules (periodic runs: trioworker.schedules, server/schedules.py)
    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.dispatcher.clock(), UTC)

    async def upsert_schedule(self, create: ScheduleCreate) -> tuple[Schedule, bool]:
        """Create the schedule ``create`` names, or change it (``(it, whether it is new)``);
        the schedule timer wakes, since its next fire time may be the earliest now.

        Raises:
            Refusal: 422 for a schedule that cannot work (a bad cron expression, an unknown
                time zone, ...), naming what is wrong in one line.
        """
        try:
            create = checked(create)
        except ValueError as exc:
            raise Refusal(422, f"invalid schedule: {exc}") from None
        schedule, new = await self.store.upsert_schedule(create, self._now())
        self.schedules_changed.set()
        self.feed.schedules_changed()
        return schedule, new

    async def schedules(self, name: str | None = None) -> list[Schedule]:
        """Every schedule, by name (``name``: that one, if it exists)."""
        return await self.store.read_schedules(name)

    async def delete_schedule(self, name: str) -> Schedule | None:
        """Delete the schedule ``name`` (no more runs from it); it, or None when there was none."""
        deleted = await self.store.delete_schedule(name)
        if deleted is not None:
            self.schedules_changed.set()
            self.feed.schedules_changed()
        return deleted

    async def fire_schedules(self) -> float | None:
        """Create the runs of the schedules due now (see :meth:`Store.fire_schedules`) and
        queue them; when to fire next (epoch seconds on the dispatcher's clock; None: there
        is no schedule)."""
        fired = await self.store.fire_schedules(self.dispatcher.clock())
        created = {run.id for run, _ in fired.runs}
        for schedule in fired.schedules:
            if schedule.last_run_id in created:
                log.info(
                    "schedule %s: run %s of %s for %s",
                    schedule.name,
                    schedule.last_run_id,
                    schedule.task_key,
                    schedule.last_fire_time,
                )
        if fired.schedules:
            self.feed.schedules_changed()
        await self._admit_created(fired.runs)
        return fired.next_due

    # -- servers sharing the store
    async def queue_counts(self) -> tuple[int, int]:
        """``(ready, delayed)``: runs queued (not held back for others) due now, and later."""
        if self._shared is not None:
            return await self._shared.count_queued(self.dispatcher.clock())
        return self.dispatcher.ready_count(), self.dispatcher.delayed_count

    async def apply_notices(self, notices: Sequence[Notice]) -> None:
        """Act on what other servers announced: hint the subscriptions of keys with ready
        runs, tell the tabs when another server's workers changed, and read the changed runs
        this server cares about (:meth:`changed_elsewhere`). This server's own notices are
        skipped (it acted when it made the changes)."""
        keys: set[str] = set()
        changed: dict[uuid.UUID, None] = {}
        workers = False
        for notice in notices:
            if notice.origin != self.replica_id:
                keys.update(notice.keys)
                changed.update(dict.fromkeys(notice.changed))
                if notice.schedules:
                    self.schedules_changed.set()
                    self.feed.schedules_changed()
                workers = workers or notice.workers
        if workers:
            self.feed.workers_changed()  # another server's workers: the overview shows them
        self.dispatcher.hint_keys(keys)
        await self.changed_elsewhere(changed)

    async def changed_elsewhere(self, run_ids: Iterable[uuid.UUID]) -> None:
        """Runs may have changed through another server: of those that local waiters wait
        for, local dependents wait for or local sockets hold, read what the store holds now
        and act as if the change had been made here. A socket holding a run that is no
        longer leased to it (through this server) is told to stop it."""
        shared = self._shared
        if shared is None:
            return
        ids = [
            run_id
            for run_id in run_ids
            if run_id in self._waiters or run_id in self._dependents or self.dispatcher.holder(run_id)
        ]
        if not ids:
            return
        leases = await shared.read_leases(ids)
        deleted: list[uuid.UUID] = []
        for run_id in ids:
            found = leases.get(run_id)
            if found is None:
                deleted.append(run_id)
                continue
            run, replica = found
            holder = self.dispatcher.holder(run_id)
            state = run.state
            if holder is not None:
                still_held = state.type in ACTIVE_STATES and replica == self.replica_id
                if not (still_held and state.state_details.client_id == holder.client_id):
                    holder.request_cancel(run_id)
                    if not state.is_terminal:
                        # Queued again, or held by another: the holder's credit is free at once.
                        # (An ended run keeps counting until its worker answers the cancel.)
                        self.dispatcher.release(run_id)
            if state.is_terminal:
                self._notify_ended(run_id, run)
        self._deleted(deleted)
        await self._fail_doomed()

    async def resync(self) -> None:
        """After a gap in the notices (the listening connection was lost): hint every
        subscription, and read every run this server cares about."""
        self.dispatcher.hint_all()
        self.schedules_changed.set()  # a schedule may have been changed unheard
        self.feed.schedules_changed()
        await self.changed_elsewhere({*self._waiters, *self._dependents, *self.dispatcher.leased})

    async def reaped(self, beat: Heartbeat) -> None:
        """A heartbeat handed back the runs of dead servers: queue them, wake their
        waiters; when servers died, tell the tabs (the overview no longer lists them) and
        track the runs that wait for others (a dead server may have been the one tracking
        them); hand back the runs that could not be handed back before."""
        if beat.dead:
            self.feed.workers_changed()
        await self._requeued(beat.reaped)
        await self._requeue_unreturned()
        if beat.dead and self._shared is not None:
            await self._admit(await self._shared.waiting_runs())
