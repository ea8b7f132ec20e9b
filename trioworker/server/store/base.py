"""What every store shares: the :class:`Store` protocol the service calls, the records it
answers with, and its errors.

A store is the single source of truth about task runs: each operation is atomic and reads
what it changes in the same transaction, so state checks and updates cannot interleave; the
dispatcher's memory is only an index over it. :class:`~trioworker.server.store.sqlite.SQLiteStore`
is the embedded one; another store implements the same protocol and applies the same rules
(:mod:`trioworker.server.store.runs`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Final, Protocol, TypeVar, runtime_checkable

import attrs

from trioworker.models import (
    Schedule,
    ScheduleCreate,
    SetStateRequest,
    SetStateResult,
    StateChange,
    StateType,
    TaskRun,
    TaskRunCreate,
)

T_co = TypeVar("T_co", covariant=True)

#: The ``details`` of the answer to a report on a run that another connection holds now.
LEASED_ELSEWHERE: Final = "the run is leased elsewhere"


class StoreError(Exception):
    """The store cannot do what was asked (closed, failed to commit, or a newer schema
    than this code knows); the API answers 503."""


class RunIdTaken(Exception):
    """A create gives the id of a run it cannot be a repeat of (another task key or
    idempotency key); the API answers 409."""


@attrs.frozen
class QueuedRun:
    """What the dispatcher needs to index a SCHEDULED run: no parameters, no result."""

    #: The store's order of creation (increasing): runs of one key are delivered in it.
    seq: int
    id: uuid.UUID
    task_key: str
    #: Epoch seconds when it becomes due; None means now.
    scheduled_at: float | None
    #: Runs that must complete first.
    wait_for: tuple[uuid.UUID, ...] = ()
    #: Bytes the run takes in the store (0 when not known).
    size: int = 0
    #: The run of ``wait_for`` that computes this run's cache key (see
    #: :meth:`Store.settle_cached`): when it ends, the store decides what becomes of this one.
    cache_owner: uuid.UUID | None = None


@attrs.frozen
class Change:
    """The outcome of one state change, for the dispatcher and for waiters."""

    result: SetStateResult
    run: TaskRun | None
    #: Set when the run became SCHEDULED (again): it goes back into the ready queues.
    queued: QueuedRun | None = None
    #: The change cancelled the run's scope (:func:`~.runs.cancels_descendants`): the
    #: changes of its descendants, cancelled with it in the same transaction.
    descendants: tuple[Change, ...] = ()


@attrs.frozen
class RunCount:
    """How many runs of one task key are in one state type (:meth:`Store.count_runs`)."""

    task_key: str
    state_type: StateType
    count: int


@attrs.frozen
class EndedCount:
    """How many runs of one task key ended in one state type within one minute
    (:meth:`Store.count_ended`)."""

    #: The minute's start, UTC (seconds and below are zero).
    minute: datetime
    task_key: str
    state_type: StateType
    count: int


@attrs.frozen
class ConnectedWorker:
    """One worker's subscription to a server (``GET /api/task_workers``)."""

    client_id: str
    task_keys: list[str]
    #: How many runs it may hold unfinished at once (its credit).
    limit: int
    #: How many more it may hold waiting in its buffer.
    prefetch: int
    #: Runs it holds now (delivered and not finished, buffered ones included); on another
    #: server than the one answering, as of that server's last heartbeat.
    runs_in_flight: int
    connected_since: datetime
    #: The id of the server it is connected to (:attr:`LiveServer.id`).
    server: uuid.UUID


@attrs.frozen
class LiveServer:
    """One server using a store, with the workers connected to it (:meth:`Store.live_servers`)."""

    id: uuid.UUID
    #: The trioworker version it runs.
    version: str
    #: When it started (UTC).
    started: datetime
    #: Its URL, as it listens (None until it does).
    url: str | None
    #: When its last heartbeat reached the store (None: a server alone on its store, which
    #: sends none).
    heartbeat: datetime | None
    #: Its workers, longest connected first.
    workers: list[ConnectedWorker]


@attrs.frozen
class Requeued:
    """What became of one held run when its connection let go of it."""

    id: uuid.UUID
    state_type: StateType | None
    queued: QueuedRun | None


@attrs.frozen
class Claimed:
    """What a claim from a shared store's ready runs got (:meth:`SharedStore.claim_ready`)."""

    #: The runs leased, oldest first.
    runs: list[TaskRun]
    #: When fewer than asked were claimed: the due time of the next delayed run of those
    #: keys (epoch seconds), or None when there is none.
    next_due: float | None = None
    #: Per run claimed from the ready runs: since when it was ready (epoch seconds: its
    #: scheduled time, or when it last became SCHEDULED if later). Runs the claim adopted
    #: (claimed before) have none.
    ready_since: dict[uuid.UUID, float] = attrs.field(factory=dict)


@attrs.frozen
class Heartbeat:
    """What one heartbeat of a server sharing a store found (:meth:`SharedStore.heartbeat`)."""

    #: The server's row was there. False: another server found it dead and handed back
    #: its runs; its sockets must close (see :mod:`trioworker.server.replicas`).
    alive: bool
    #: Runs of dead servers this heartbeat handed back (SCHEDULED again, or CRASHED).
    reaped: list[Requeued] = attrs.field(factory=list)
    #: The dead servers whose rows it deleted.
    dead: list[uuid.UUID] = attrs.field(factory=list)


@attrs.frozen
class Fired:
    """What a firing of the schedules due found and did (:meth:`Store.fire_schedules`)."""

    #: The runs created, one per schedule that fired a tick, with their queue entries.
    runs: list[tuple[TaskRun, QueuedRun]] = attrs.field(factory=list)
    #: The schedules that fired, as they are now (their next fire time moved on).
    schedules: list[Schedule] = attrs.field(factory=list)
    #: When to fire again (epoch seconds): the earliest next fire time of all schedules
    #: (sooner when some were left for later); None when there is no schedule.
    next_due: float | None = None


@attrs.frozen
class Notice:
    """What another server sharing the store announced after a commit (a wake-up only:
    the tables say what is true)."""

    #: The server that made the changes.
    origin: uuid.UUID
    #: Task keys with runs that became ready to claim (or delayed runs queued).
    keys: tuple[str, ...] = ()
    #: Runs that ended, went back to the queue, were cancelled or deleted.
    changed: tuple[uuid.UUID, ...] = ()
    #: The servers' workers changed: that server's (one came or went, or the runs they
    #: hold changed), or those of dead servers it reaped. Their rows say what is true now.
    workers: bool = False
    #: Schedules were created, changed or deleted (the next fire time may be sooner).
    schedules: bool = False


class QueuedOp(Protocol[T_co]):
    """An operation queued in the store, not yet known to be done."""

    async def result(self) -> T_co:
        """Wait until it ran; its value, or the error it raised (:class:`StoreError` when
        the store could not run or commit it)."""
        ...


class Store(Protocol):
    """What the server needs from storage: every read and change of task runs.

    Every method raises :class:`StoreError` when the store is closed or fails to commit
    (then nothing of that operation was saved). Once called, an operation runs to its end
    even when its caller is cancelled, so memory and disk stay in step.
    """

    @property
    def location(self) -> str:
        """Where the runs are kept, fit for a log line (no password)."""
        ...

    @property
    def kind(self) -> str:
        """What keeps the runs: ``"sqlite"`` or ``"postgresql"`` (the dashboard shows it)."""
        ...

    async def create_runs(
        self,
        creates: Sequence[TaskRunCreate],
        *,
        now: float | None = None,
        leases: Mapping[int, str] | None = None,
    ) -> list[tuple[TaskRun, QueuedRun | None]]:
        """Create runs, SCHEDULED, in order; each with its queue entry, or with None when
        it is the run a known idempotency key (of the same task key) or ``id`` names.

        ``leases`` maps positions in ``creates`` to client ids: the run such a create makes
        is leased to that client in the same transaction, exactly as :meth:`claim_runs`
        would lease it (PENDING, one delivery; its history has SCHEDULED, then PENDING), when
        it is new, SCHEDULED, due at ``now`` and waits for no other run
        (:func:`~.runs.leased_at_create`); it is given back so, with its entry, and is not
        to be queued. Any other (a repeat, one answered from the cache or born CANCELLED,
        one that waits or is due later) is made as without a lease.

        A create with a ``cache_key`` (and no ``refresh_cache``) whose key of its task key
        has a completed result, unexpired at ``now`` (epoch seconds on the dispatcher's
        clock; None: the wall clock) of the same serializer, makes a run that is COMPLETED
        at once (name ``Cached``, that result): it still gets its entry, but is not
        queued. One whose key another run computes right now waits for that run (its
        SCHEDULED state names it in ``cache_owner``, its entry's ``wait_for`` holds it).
        Any other makes its run the one that computes the key. The database decides:
        creates of one key on several servers at once get one run that computes it.

        A new run is created CANCELLED instead (:func:`~.runs.born_cancelled`; it still has
        its entry, but is never to be queued) when its run group was cancelled, or when its
        parent run was cancelled and it is not detached. A run naming a group records the
        group (the first run of a group creates it).

        Raises:
            RunIdTaken: a given ``id`` belongs to a run the create is not a repeat of;
                nothing of the batch is written.
        """
        ...

    async def settle_cached(self, run_ids: Sequence[uuid.UUID], *, now: float) -> list[Change]:
        """The runs that computed the cache keys these runs wait for have ended: decide
        each again, oldest first, at ``now`` (epoch seconds on the dispatcher's clock), as a
        create would: COMPLETED ``Cached`` with the result, waiting for the run that
        computes the key now, or SCHEDULED to compute it itself (the first of them, when
        the result was not made). One :class:`Change` per run, in order: with its queue
        entry while it is SCHEDULED; a run that no longer waits on a cache key (settled
        already, cancelled, deleted) is reported as it is."""
        ...

    async def read_run(self, run_id: uuid.UUID) -> TaskRun | None: ...

    async def read_runs(self, run_ids: Sequence[uuid.UUID]) -> list[TaskRun]:
        """The runs that exist, in the order asked."""
        ...

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
        """Runs in the order they were created (``newest_first``: the reverse), filtered by
        key, state type, parent run (the runs submitted from inside that run), tags (runs
        that carry every one of ``tags``, found by an index of tags) and run group;
        ``offset`` runs of that order are skipped, at most ``limit`` returned."""
        ...

    async def descendants(self, run_id: uuid.UUID, *, limit: int) -> list[TaskRun]:
        """The runs submitted from inside the run ``run_id``, from inside those, and so on
        (detached ones too), in the order they were created (a run after its parent). The
        walk goes level by level through the index of parent ids and stops at ``limit`` runs:
        the nearest levels are the ones given."""
        ...

    async def cancel_group(self, group_id: uuid.UUID, *, now: float) -> list[Change]:
        """Cancel the run group ``group_id``, in one transaction: mark it cancelled (a run
        created in it later is created CANCELLED), cancel its runs that have not ended, and
        with each its descendants (:func:`~.runs.cancels_descendants`). One change per run
        of the group cancelled, its descendants' in :attr:`Change.descendants`; ``now`` as
        for :meth:`set_states`."""
        ...

    async def delete_run_cascading(
        self, run_id: uuid.UUID, *, now: float
    ) -> tuple[TaskRun | None, list[Change]]:
        """:meth:`delete_run`, and, when the run had not ended, cancel its descendants in the
        same transaction (deleting a run stops it, as a cancel does): the run as it was (None:
        there was none) and the changes of the descendants cancelled."""
        ...

    async def find_runs(self, id_prefix: str, *, limit: int) -> list[TaskRun]:
        """The runs whose id's text (``str(uuid)``) starts with ``id_prefix`` (lower case,
        with its dashes where a run id has them: :func:`trioworker.protocol.id_prefix`), in
        the order of their ids, at most ``limit``; found by the index on ids, not by a scan."""
        ...

    async def count_runs(self) -> list[RunCount]:
        """How many runs there are of each task key in each state type (pairs with no run
        are left out), in no particular order."""
        ...

    async def count_ended(self, since: datetime, until: datetime | None = None) -> list[EndedCount]:
        """How many runs ended (reached a terminal state) at ``since`` or later (and before
        ``until``, when given), by minute, task key and terminal state type, oldest minute
        first. A run that ended twice (set back to SCHEDULED by force, then ended again)
        counts twice; a deleted run not at all."""
        ...

    async def oldest_waiting(self, now: datetime) -> list[TaskRun]:
        """Per task key, the run first in line: of the SCHEDULED runs due at ``now`` (no
        scheduled time, or one not after ``now``), the one created first. Ordered by task key."""
        ...

    async def history(self, run_id: uuid.UUID) -> list[StateChange] | None:
        """Every state the run had, oldest first; None when the run does not exist."""
        ...

    async def claim_runs(self, run_ids: Sequence[uuid.UUID], client_id: str) -> list[TaskRun]:
        """Lease the runs still SCHEDULED to ``client_id`` (see :func:`~.runs.claimed_copy`);
        the others are skipped."""
        ...

    def claim_runs_soon(
        self, runs: Sequence[TaskRun], client_id: str, now: datetime
    ) -> QueuedOp[list[TaskRun]]:
        """Queue a claim of ``runs`` (as the store holds them, claimed at ``now``) and
        return at once; every operation called later sees it done."""
        ...

    async def set_states(
        self,
        requests: Sequence[tuple[uuid.UUID, SetStateRequest]],
        *,
        now: float,
        holder: str | None = None,
    ) -> list[Change]:
        """Judge and apply proposed states (:func:`~.runs.judged`), one :class:`Change` per
        request, in order; ``now`` is the dispatcher's clock (epoch seconds), for relative
        delays.

        ``holder`` is the client whose connection reports (None: the change comes from
        elsewhere, e.g. REST). Its report on a run that is SCHEDULED, or PENDING/RUNNING
        under another holder (:func:`~.runs.held_elsewhere`), changes nothing and is
        answered ABORT with :data:`LEASED_ELSEWHERE`.
        """
        ...

    async def requeue(
        self,
        run_ids: Sequence[uuid.UUID],
        *,
        reason: str,
        max_deliveries: int | None,
        holder: str | None = None,
    ) -> list[Requeued]:
        """Hand held runs back from their holder (:func:`~.runs.requeued`): SCHEDULED
        again, or CRASHED after ``max_deliveries`` deliveries; ``reason`` is
        ``"release"`` (handed back unopened) or ``"redelivery"``. A run that is no longer
        held (by ``holder``, when given) is only reported (and indexed again when
        SCHEDULED)."""
        ...

    async def delete_run(self, run_id: uuid.UUID) -> TaskRun | None:
        """Delete the run and its history (its tags, the cache entry it made); the run as
        it was, or None when it did not exist."""
        ...

    async def purge_ended(
        self,
        before: datetime,
        *,
        task_key: str | None = None,
        state: StateType | None = None,
        limit: int = 1000,
    ) -> list[uuid.UUID]:
        """Delete, with their history, at most ``limit`` runs that ended before ``before``
        (their state is terminal, and its time is earlier), those that ended first first;
        their ids. ``task_key`` and ``state`` (a terminal state type) narrow them down.

        One call is one operation of the store: callers purge in batches of ``limit``, so
        that other operations run between them.
        """
        ...

    async def oldest_end(self) -> datetime | None:
        """When the run that ended first (of those that exist and have ended) ended: the
        time :meth:`purge_ended` compares; None when no run has ended."""
        ...

    async def reclaim(
        self, run_ids: Sequence[uuid.UUID], client_id: str
    ) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
        """A reconnected client still works on these runs: ``(kept, lost)``. What nobody
        else took is kept, leased to ``client_id`` again (:func:`~.runs.reclaimed`)."""
        ...

    async def recover(self, max_deliveries: int) -> list[QueuedRun]:
        """At start: requeue every held run, and return every SCHEDULED run in order."""
        ...

    async def states_of(self, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, StateType]:
        """The state types of the runs that exist."""
        ...

    async def runs_by_idempotency_key(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], uuid.UUID]:
        """Of ``keys``, ``(task key, idempotency key)`` pairs, those a run was created with:
        each with that run's id (found by the index on the pair, not by a scan). A key is
        scoped to its task key: ``("a", "k")`` and ``("b", "k")`` name two runs."""
        ...

    async def read_ended(self, run_ids: Sequence[uuid.UUID]) -> tuple[list[TaskRun], set[uuid.UUID]]:
        """The runs that ended, and the ids that exist."""
        ...

    async def live_servers(self, here: LiveServer) -> list[LiveServer]:
        """The servers using this store that are alive: ``here`` (the caller's own, as it
        is now) first, then the others, oldest first, each as its last heartbeat (or its
        last notice of a worker that came or went) left it in the store; a server silent
        for longer than its timeout is left out, dead or not. A store that one server has
        to itself (SQLite) answers ``[here]``."""
        ...

    # -- schedules (periodic runs, see trioworker.schedules)
    async def upsert_schedule(self, create: ScheduleCreate, now: datetime) -> tuple[Schedule, bool]:
        """Create the schedule ``create`` (checked: :func:`trioworker.schedules.checked`)
        names, or change the one of that name (:func:`trioworker.schedules.new_schedule`;
        unchanged when it is the same); ``(the schedule, whether it is new)``."""
        ...

    async def read_schedules(self, name: str | None = None) -> list[Schedule]:
        """Every schedule, by name (``name``: only that one, if it exists)."""
        ...

    async def delete_schedule(self, name: str) -> Schedule | None:
        """Delete the schedule ``name``; it as it was, or None when there was none."""
        ...

    async def fire_schedules(self, now: float) -> Fired:
        """Fire the schedules whose next fire time is at ``now`` (epoch seconds) or before
        (:func:`trioworker.schedules.fire`): in one transaction, each creates the run of its
        tick (idempotency key: the schedule and the tick, so a tick never makes two runs)
        and moves its next fire time on. A schedule another server is firing at that moment
        is left to it."""
        ...


class NoticeListener(Protocol):
    """A connection that hears what the servers sharing a store announce."""

    async def connect(self) -> None:
        """Connect (again) and start listening; what was announced before is not heard.

        Raises:
            StoreError: the database cannot be reached.
        """
        ...

    async def receive(self) -> list[Notice]:
        """Wait for the next announcements (at least one), and return them.

        Raises:
            StoreError: the connection was lost (connect again, then re-read what matters).
        """
        ...

    def close(self) -> None: ...


@runtime_checkable
class SharedStore(Store, Protocol):
    """A store that several servers (replicas) share: the PostgreSQL store. Each server
    registers a row, heartbeats it, hands back the runs of dead servers, claims runs from
    the store's table of ready runs, and hears through a :class:`NoticeListener` what the
    others changed. Every method raises :class:`StoreError` as :class:`Store`'s do."""

    async def register_replica(self, replica_id: uuid.UUID, silent_for: float, address: str | None) -> None:
        """Register the server ``replica_id`` (every lease taken through this store from
        now on is held through it), silent for ``silent_for`` seconds at most before the
        others call it dead; ``address`` is shown to operators. Again (after it was found
        dead): renew the row."""
        ...

    async def unregister_replica(self) -> None:
        """The server stops: delete its row."""
        ...

    async def heartbeat(self, max_deliveries: int, workers: Sequence[ConnectedWorker]) -> Heartbeat:
        """Renew this server's row with the ``workers`` connected to it now (see
        :meth:`publish_workers`), and hand back the runs held through dead servers."""
        ...

    async def publish_workers(self, workers: Sequence[ConnectedWorker]) -> None:
        """Write the ``workers`` connected to this server now in its row, where
        :meth:`~Store.live_servers` of every server reads them; when they differ from what
        was written last, the others hear of it (a :class:`Notice` with ``workers``)."""
        ...

    async def claim_ready(
        self,
        keys: Sequence[str],
        limit: int,
        client_id: str,
        now: float,
        *,
        known: Sequence[uuid.UUID] | None = None,
    ) -> Claimed:
        """Lease up to ``limit`` runs of ``keys``, due at ``now`` (epoch seconds), oldest
        first, to ``client_id`` through this server. With ``known`` (the runs the caller
        knows it holds), first the PENDING runs leased to ``client_id`` here that are not
        among them: a claim whose outcome the caller did not learn may have leased them."""
        ...

    async def release_waiting(self, run_ids: Sequence[uuid.UUID]) -> None:
        """These runs no longer wait for others (created with ``wait_for``): claim them."""
        ...

    async def waiting_runs(self) -> list[QueuedRun]:
        """The runs that wait for others, with their ``wait_for``."""
        ...

    async def read_leases(
        self, run_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, tuple[TaskRun, uuid.UUID | None]]:
        """The runs that exist, each with the server it is leased through (None: none)."""
        ...

    async def count_queued(self, now: float) -> tuple[int, int]:
        """``(ready, delayed)`` SCHEDULED runs at ``now`` (epoch seconds), waiting ones not counted."""
        ...

    async def count_ready(self, task_keys: Sequence[str], now: float) -> dict[str, int]:
        """Per task key of ``task_keys``: its SCHEDULED runs due at ``now`` (epoch seconds)
        and waiting for no other run; a key with none is left out."""
        ...

    def listener(self) -> NoticeListener:
        """A new listener (not connected yet) on what the servers of this store announce."""
        ...
