"""How a store changes a run, the same in every store: pure functions of
:class:`~trioworker.models.TaskRun` (no I/O), so that a store only reads and writes rows.

Times: ``now`` is a UTC datetime; ``clock_now`` and epoch values are seconds since the epoch.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime

import attrs
import orjson

from trioworker.models import (
    ACTIVE_STATES,
    TIMED_OUT,
    SetStateRequest,
    SetStateResult,
    SetStateStatus,
    State,
    StateDetails,
    StateType,
    TaskRun,
    TaskRunCreate,
    converter,
    make_state,
    utcnow,
)
from trioworker.server.rules import decide
from trioworker.server.store.base import LEASED_ELSEWHERE, Change, QueuedRun, RunIdTaken


def run_body(run: TaskRun) -> bytes:
    """``run`` as a store keeps it, but its parameters (which never change): JSON bytes."""
    data = converter.unstructure(run)
    del data["parameters"]
    return orjson.dumps(data)


def run_from_row(parameters: bytes, body: bytes) -> TaskRun:
    """The run a store's ``parameters`` and :func:`run_body` bytes hold."""
    data = orjson.loads(body)
    data["parameters"] = orjson.loads(parameters)
    return converter.structure(data, TaskRun)


def epoch(when: datetime | None) -> float | None:
    """``when`` in epoch seconds (None stays None)."""
    return None if when is None else when.timestamp()


def default_name(task_key: str, run_id: uuid.UUID) -> str:
    """The name of a run submitted without one: ``<task key>-<its id's first 8 hex digits>``."""
    return f"{task_key}-{run_id.hex[:8]}"


def new_run(create: TaskRunCreate, now: datetime) -> TaskRun:
    """The SCHEDULED run ``create`` makes at ``now`` (a fresh id unless it gives one)."""
    run_id = uuid.uuid4() if create.id is None else create.id
    state = make_state(
        StateType.SCHEDULED,
        timestamp=now,
        details=StateDetails(scheduled_time=create.scheduled_time),
    )
    return TaskRun(
        id=run_id,
        task_key=create.task_key,
        name=create.name or default_name(create.task_key, run_id),
        state=state,
        parameters=create.parameters,
        serializer=create.serializer,
        created=now,
        updated=now,
        idempotency_key=create.idempotency_key,
        tags=list(dict.fromkeys(create.tags)),
        context=dict(create.context),
        parent_task_run_id=create.parent_task_run_id,
        wait_for=list(create.wait_for),
        cache_key=create.cache_key,
        cache_expiration=None if create.cache_key is None else create.cache_expiration,
        refresh_cache=create.cache_key is not None and create.refresh_cache,
        group_id=create.group_id,
        detached=create.detached,
    )


def same_run(run: TaskRun, create: TaskRunCreate) -> TaskRun:
    """``run``, the one ``create`` names by its id, if ``create`` is a repeat of it.

    Raises:
        RunIdTaken: ``create`` has another task key or idempotency key.
    """
    if run.task_key != create.task_key:
        raise RunIdTaken(
            f"task run id {run.id} is taken by a run of task {run.task_key!r}, not {create.task_key!r}"
        )
    if run.idempotency_key != create.idempotency_key:
        raise RunIdTaken(
            f"task run id {run.id} is taken by a run of task {run.task_key!r} with idempotency key "
            f"{run.idempotency_key!r}, not {create.idempotency_key!r}"
        )
    return run


def queued_run(run: TaskRun, seq: int, size: int = 0) -> QueuedRun:
    """The dispatcher's entry for the SCHEDULED ``run``, the ``seq``-th the store created:
    it waits for its ``wait_for`` runs, and for the run computing its cache key if any."""
    owner = run.state.state_details.cache_owner if run.state.type is StateType.SCHEDULED else None
    return QueuedRun(
        seq,
        run.id,
        run.task_key,
        epoch(run.state.state_details.scheduled_time),
        tuple(waits_for(run)),
        size,
        owner,
    )


def waits_for(run: TaskRun) -> list[uuid.UUID]:
    """What a store's index of waiting runs keeps for ``run``: its ``wait_for``, and the
    run computing its cache key while it waits for that one."""
    owner = run.state.state_details.cache_owner if run.state.type is StateType.SCHEDULED else None
    if owner is None or owner in run.wait_for:
        return list(run.wait_for)
    return [*run.wait_for, owner]


# -- caching: one result per (task key, cache key)


class CacheUse(enum.Enum):
    """What a run with a cache key does, by the store's entry for that key."""

    #: It computes the key: it runs, and its result becomes the cached one.
    COMPUTE = "compute"
    #: Another run computes it right now: this one waits for it.
    WAIT = "wait"
    #: A result is there: this one ends COMPLETED (``Cached``) with it, unrun.
    REUSE = "reuse"


def cache_use(run: TaskRun, owner: TaskRun | None, expires_at: float | None, clock_now: float) -> CacheUse:
    """What ``run`` does when the entry of its key names ``owner`` (None: no entry, or a
    run that no longer exists) with ``expires_at`` (epoch seconds; None: never, or not
    completed yet), at ``clock_now``.

    A completed result is reused while unexpired and made with the same serializer; a
    run in flight (not ended) is waited for; anything else (failed, cancelled, crashed,
    expired, or ``run`` itself) leaves the key to ``run``. ``refresh_cache`` computes it
    whatever the entry says.
    """
    if owner is None or run.refresh_cache or owner.id == run.id:
        return CacheUse.COMPUTE
    state = owner.state.type
    if state is StateType.COMPLETED:
        fresh = expires_at is None or expires_at > clock_now
        return CacheUse.REUSE if fresh and owner.serializer == run.serializer else CacheUse.COMPUTE
    if not state.is_terminal:
        return CacheUse.WAIT
    return CacheUse.COMPUTE


def reused_copy(run: TaskRun, owner: TaskRun, now: datetime) -> TaskRun:
    """``run`` answered from the cache: COMPLETED, state name ``Cached`` (Prefect's), with
    the result of ``owner`` and its key's expiry."""
    details = owner.state.state_details
    state = make_state(
        StateType.COMPLETED,
        "Cached",
        timestamp=now,
        message=f"the cached result of run {owner.id}",
        data=owner.state.data,
        details=StateDetails(cache_key=run.cache_key, cache_expiration=details.cache_expiration),
    )
    return attrs.evolve(run, state=state, updated=now)


def waiting_copy(run: TaskRun, owner: uuid.UUID, now: datetime) -> TaskRun:
    """``run`` SCHEDULED, waiting for ``owner``, which computes its cache key."""
    state = make_state(
        StateType.SCHEDULED,
        timestamp=now,
        message=f"waits for run {owner}, which computes the same cache key",
        details=StateDetails(scheduled_time=run.state.state_details.scheduled_time, cache_owner=owner),
    )
    return attrs.evolve(run, state=state, updated=now)


def computing_copy(run: TaskRun, now: datetime) -> TaskRun:
    """``run``, which waited for another run's result, SCHEDULED to compute its cache key
    itself (that run ended without one)."""
    state = make_state(
        StateType.SCHEDULED,
        timestamp=now,
        message="the run it waited for ended without a result: it computes the cache key itself",
        details=StateDetails(scheduled_time=run.state.state_details.scheduled_time),
    )
    return attrs.evolve(run, state=state, updated=now)


def cache_expires_at(run: TaskRun) -> float | None:
    """When the result of the COMPLETED ``run`` stops being reused (epoch seconds), as its
    state says; None: never."""
    return epoch(run.state.state_details.cache_expiration)


def waits_on_cache(run: TaskRun) -> bool:
    """``run`` is SCHEDULED and waits for the run computing its cache key."""
    return run.state.type is StateType.SCHEDULED and run.state.state_details.cache_owner is not None


def claimed_copy(run: TaskRun, client_id: str, now: datetime) -> TaskRun:
    """``run`` as a claim leaves it: PENDING, leased to ``client_id``, one delivery more."""
    return attrs.evolve(
        run,
        state=make_state(StateType.PENDING, timestamp=now, details=StateDetails(client_id=client_id)),
        updated=now,
        delivery_count=run.delivery_count + 1,
    )


def leased_at_create(run: TaskRun, client_id: str, now: datetime, clock_now: float) -> TaskRun | None:
    """The new ``run`` leased to ``client_id`` in the transaction that creates it, exactly as
    a claim at ``now`` leaves it (:func:`claimed_copy`); None when it is not to be leased: it
    is not SCHEDULED (answered from the cache), waits for other runs (its ``wait_for``, or
    the run computing its cache key), or is not due at ``clock_now`` (epoch seconds on the
    dispatcher's clock). (A run born CANCELLED is not leased either: the stores ask only
    for the others.)"""
    if run.state.type is not StateType.SCHEDULED or waits_for(run):
        return None
    due = epoch(run.state.state_details.scheduled_time)
    if due is not None and due > clock_now:
        return None
    return claimed_copy(run, client_id, now)


def missing_run_change() -> Change:
    """The answer to a state proposal for a run that does not exist."""
    missing = make_state(StateType.CANCELLED, message="the run does not exist")
    return Change(SetStateResult(SetStateStatus.ABORT, missing, "the run does not exist"), None)


def held_elsewhere(
    run: TaskRun, holder: str, *, replica: uuid.UUID | None = None, me: uuid.UUID | None = None
) -> bool:
    """A report from ``holder``'s connection (to the server ``me``) must not change ``run``
    (leased through the server ``replica``): it is SCHEDULED (handed back, for another
    worker), or PENDING/RUNNING under another client or through another server. An
    ended run is judged as usual (a repeat is accepted, anything else refused)."""
    state = run.state
    if state.type is StateType.SCHEDULED:
        return True
    if state.type in ACTIVE_STATES:
        return state.state_details.client_id != holder or replica != me
    return False


def leased_elsewhere_change(run: TaskRun) -> Change:
    """The answer to a report on a run :func:`held_elsewhere`: nothing changes."""
    return Change(SetStateResult(SetStateStatus.ABORT, run.state, LEASED_ELSEWHERE), run)


def judged(run: TaskRun, request: SetStateRequest, clock_now: float) -> tuple[SetStateResult, TaskRun | None]:
    """The answer to ``request`` for ``run`` (:func:`~trioworker.server.rules.decide`), and
    the run as the accepted state leaves it (None: nothing to write)."""
    status, why = decide(run.state, request.state, force=request.force)
    if status is not SetStateStatus.ACCEPT or why == "unchanged":
        return SetStateResult(status, run.state, why), None
    changed = with_state(run, request.state, clock_now)
    return SetStateResult(status, changed.state, None), changed


def with_state(run: TaskRun, state: State, clock_now: float) -> TaskRun:
    """``run`` in the accepted ``state``: stamped now, a relative delay made a due time
    (on the dispatcher's clock, ``clock_now``), the run and delivery counts kept up."""
    now = utcnow()
    details = state.state_details
    if state.type is StateType.SCHEDULED and details.delay_seconds is not None:
        due = datetime.fromtimestamp(clock_now + max(0.0, details.delay_seconds), UTC)
        details = attrs.evolve(details, scheduled_time=due, delay_seconds=None)
    if state.type is StateType.COMPLETED and run.cache_key is not None and details.cache_key is None:
        # The key and its expiry, as Prefect's COMPLETED states carry them.
        lasts = run.cache_expiration
        expires = None if lasts is None else datetime.fromtimestamp(clock_now + lasts, UTC)
        details = attrs.evolve(details, cache_key=run.cache_key, cache_expiration=expires)
    state = attrs.evolve(state, timestamp=now, state_details=details)
    run_count, delivery_count = run.run_count, run.delivery_count
    if state.type is StateType.RUNNING:
        run_count += 1
        if details.client_id is None and run.state.state_details.client_id is not None:
            state = attrs.evolve(
                state, state_details=attrs.evolve(details, client_id=run.state.state_details.client_id)
            )
    elif state.type is StateType.SCHEDULED:
        # A finished attempt (a retry) or a fresh schedule: the crash guard starts over.
        delivery_count = 0
    return attrs.evolve(run, state=state, updated=now, run_count=run_count, delivery_count=delivery_count)


def requeued(run: TaskRun, reason: str, max_deliveries: int | None, now: datetime) -> TaskRun:
    """The held ``run`` as its connection lets go of it: SCHEDULED ("Redelivered"), or
    CRASHED once delivered ``max_deliveries`` times. With ``reason`` ``"release"`` it was
    handed back unopened, which is not a failed delivery."""
    deliveries = run.delivery_count
    if reason == "release":
        deliveries = max(0, deliveries - 1)
    if max_deliveries is not None and deliveries >= max_deliveries:
        state = make_state(
            StateType.CRASHED,
            timestamp=now,
            message=f"delivered {deliveries} times without finishing",
        )
    else:
        state = make_state(
            StateType.SCHEDULED,
            "Redelivered",
            timestamp=now,
            details=StateDetails(reason=reason),
        )
    return attrs.evolve(run, state=state, updated=now, delivery_count=deliveries)


def reclaimed(run: TaskRun, client_id: str, now: datetime) -> TaskRun | None:
    """``run`` as the reconnected ``client_id``, which still works on it, gets it back.

    The same ``run`` when it is still held under ``client_id`` (the old connection is not
    cleaned up yet); RUNNING again under ``client_id`` when it was requeued and not
    delivered since; None (lost) when anything else became of it.
    """
    state = run.state
    if state.type in ACTIVE_STATES and state.state_details.client_id == client_id:
        return run
    if state.type is StateType.SCHEDULED and state.name == "Redelivered":
        resumed = make_state(
            StateType.RUNNING,
            timestamp=now,
            message="resumed by the same client after a reconnect",
            details=StateDetails(client_id=client_id),
        )
        return attrs.evolve(run, state=resumed, updated=now)
    return None


# --------------------------------------------------------------------------- cancellation reaching children


def cancels_descendants(before: TaskRun, after: TaskRun) -> str | None:
    """Why the change of a run from ``before`` to ``after`` cancels its descendants (the
    runs submitted from inside it, theirs, ...), as a clause for their message; None when
    it does not. It does when the run, not ended yet, was cancelled, or when an attempt of
    it ran out of time (its new state says :data:`~trioworker.models.TIMED_OUT`): the two
    ways its cancel scope is cancelled. A run that completes, fails or crashes leaves them."""
    if before.state.is_terminal:
        return None
    if after.state.type is StateType.CANCELLED:
        return f"run {after.id}, which was cancelled"
    if after.state.state_details.reason == TIMED_OUT and before.state.type in ACTIVE_STATES:
        return f"run {after.id}, which ran out of time"
    return None


def cancel_request(why: str) -> SetStateRequest:
    """The proposal that cancels a run with others: ``why`` names what it goes with
    (``run ..., which was cancelled``, ``its run group ...``)."""
    return SetStateRequest(make_state(StateType.CANCELLED, message=f"cancelled with {why}"))


def group_clause(group_id: uuid.UUID) -> str:
    """How the cancel of a run group is named in its runs' messages."""
    return f"its run group {group_id}"


def born_cancelled(create: TaskRunCreate, parent: StateType | None, group_cancelled: bool) -> str | None:
    """Why a run is created CANCELLED (None: it is not): its run group was cancelled, or it
    is not detached and its parent run (whose state type is ``parent``) was cancelled. So a
    run submitted in the instant its parent's or its group's cancel was decided still goes
    with it."""
    if create.group_id is not None and group_cancelled:
        return group_clause(create.group_id)
    if parent is StateType.CANCELLED and not create.detached:
        return f"run {create.parent_task_run_id}, which was cancelled"
    return None
