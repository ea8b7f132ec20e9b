"""How a store changes a run, the same in every store: pure functions of
:class:`~trioworker.models.TaskRun` (no I/O), so that a store only reads and writes rows.

Times: ``now`` is a UTC datetime; ``clock_now`` and epoch values are seconds since the epoch.
"""

from __future__ import annotations

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
        tags=list(create.tags),
        context=dict(create.context),
        parent_task_run_id=create.parent_task_run_id,
        wait_for=list(create.wait_for),
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
    """The dispatcher's entry for the SCHEDULED ``run``, the ``seq``-th the store created."""
    return QueuedRun(
        seq,
        run.id,
        run.task_key,
        epoch(run.state.state_details.scheduled_time),
        tuple(run.wait_for),
        size,
    )


def claimed_copy(run: TaskRun, client_id: str, now: datetime) -> TaskRun:
    """``run`` as a claim leaves it: PENDING, leased to ``client_id``, one delivery more."""
    return attrs.evolve(
        run,
        state=make_state(StateType.PENDING, timestamp=now, details=StateDetails(client_id=client_id)),
        updated=now,
        delivery_count=run.delivery_count + 1,
    )


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
