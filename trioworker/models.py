"""The wire models of protocol v1 and the one converter that (un)structures them.

Every process (server, worker, submitter) speaks through :data:`converter`: times are
ISO 8601 in UTC, ids are UUIDs, states are enum names. Fields a newer peer adds are
ignored on the way in, so peers of different minor versions keep talking.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, TypeAlias, TypeVar

import attrs
import orjson
from cattrs.gen import make_dict_unstructure_fn, override
from cattrs.preconf.orjson import OrjsonConverter, make_converter

from trioworker.protocol import SERIALIZER_JSON

#: A JSON value as it appears on the wire (parameters, results, context).
JSON: TypeAlias = Any

T = TypeVar("T")


class StateType(enum.StrEnum):
    """Where a task run is in its life. See the README's *Lifecycle* section."""

    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES: Final = frozenset(
    {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
)
#: The states of a run leased to a worker (in flight): it holds a lease until it leaves them.
ACTIVE_STATES: Final = frozenset({StateType.PENDING, StateType.RUNNING})


#: ``StateDetails.reason`` of the state (FAILED, or SCHEDULED for a retry) that ends an
#: attempt which ran out of time: as with a cancel, the runs submitted from it are cancelled.
TIMED_OUT: Final = "timeout"


class SetStateStatus(enum.StrEnum):
    """The server's answer to a proposed state.

    ACCEPT: the state was set (or was already that state). REJECT: the transition is not
    allowed; the run keeps its current state. ABORT: the run is gone or cancelled and the
    proposer must stop working on it.
    """

    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    ABORT = "ABORT"


def utcnow() -> datetime:
    return datetime.now(UTC)


@attrs.frozen
class StateDetails:
    """Facts that belong to one state, not to the run."""

    #: When a SCHEDULED run becomes due (None: now).
    scheduled_time: datetime | None = None
    #: The connection (``client_id``) that holds a PENDING/RUNNING run.
    client_id: str | None = None
    #: Why a run is SCHEDULED again (``"retry"``, ``"redelivery"``, ``"release"``), or
    #: ``"timeout"`` (:data:`TIMED_OUT`) on the state that ends an attempt which ran out of time.
    reason: str | None = None
    #: In a proposed SCHEDULED state: due this many seconds after the server accepts it.
    #: (Relative, so that the worker's and the server's clocks need not agree.)
    delay_seconds: float | None = None
    #: On the COMPLETED state of a run with a cache key (its own result, or one from the
    #: cache: state name ``Cached``): that key.
    cache_key: str | None = None
    #: With ``cache_key``: when that result stops being reused (None: never).
    cache_expiration: datetime | None = None
    #: On a SCHEDULED state: the run that computes the same cache key right now; this run
    #: waits for it, then ends ``Cached`` with its result (or runs, if it failed).
    cache_owner: uuid.UUID | None = None


@attrs.frozen
class State:
    """One state of a run. ``data`` is the result (COMPLETED) or the error (FAILED)."""

    type: StateType
    name: str
    timestamp: datetime = attrs.field(factory=utcnow)
    message: str | None = None
    data: JSON = None
    state_details: StateDetails = attrs.field(factory=StateDetails)

    @property
    def is_terminal(self) -> bool:
        return self.type.is_terminal


_DEFAULT_NAMES: Final = {
    StateType.SCHEDULED: "Scheduled",
    StateType.PENDING: "Pending",
    StateType.RUNNING: "Running",
    StateType.COMPLETED: "Completed",
    StateType.FAILED: "Failed",
    StateType.CANCELLED: "Cancelled",
    StateType.CRASHED: "Crashed",
}


def make_state(
    type: StateType,
    name: str | None = None,
    *,
    message: str | None = None,
    data: JSON = None,
    details: StateDetails | None = None,
    timestamp: datetime | None = None,
) -> State:
    """Build a state with the default name of its type."""
    return State(
        type=type,
        name=name or _DEFAULT_NAMES[type],
        timestamp=timestamp or utcnow(),
        message=message,
        data=data,
        state_details=details or StateDetails(),
    )


@attrs.frozen
class TaskRun:
    """One run of a task: what to call, with what, and where it stands."""

    id: uuid.UUID
    task_key: str
    name: str
    state: State
    parameters: JSON = attrs.field(factory=dict)
    #: How ``parameters`` and the result are encoded: ``"json"`` or ``"pickle"``.
    serializer: str = SERIALIZER_JSON
    created: datetime = attrs.field(factory=utcnow)
    updated: datetime = attrs.field(factory=utcnow)
    #: Attempts that reached RUNNING.
    run_count: int = 0
    #: Deliveries since the last finished attempt (a crash guard).
    delivery_count: int = 0
    idempotency_key: str | None = None
    tags: list[str] = attrs.field(factory=list)
    context: dict[str, JSON] = attrs.field(factory=dict)
    parent_task_run_id: uuid.UUID | None = None
    wait_for: list[uuid.UUID] = attrs.field(factory=list)
    #: Runs of this task with the same cache key share one result (see ``TaskRunCreate``).
    cache_key: str | None = None
    #: Seconds a result stays in the cache once this run completed (None: no end).
    cache_expiration: float | None = None
    #: This run ignores the cache, runs, and its result replaces the cached one.
    refresh_cache: bool = False
    #: The run group it was submitted in (``trioworker.open_run_group``), if any.
    group_id: uuid.UUID | None = None
    #: Submitted with ``detached=True``: cancelling its parent run leaves it (and the runs
    #: submitted from it) alone.
    detached: bool = False

    @property
    def state_type(self) -> StateType:
        return self.state.type


@attrs.frozen
class WaitResult:
    """The answer of a wait for many runs (``POST /task_runs/wait``)."""

    ended: list[TaskRun]
    #: Ids that do not exist (never did, or were deleted while waited for).
    missing: list[uuid.UUID]
    #: Ids still not ended when the wait returned.
    pending: list[uuid.UUID]


@attrs.frozen
class TaskRunCreate:
    """The body of ``POST /api/task_runs``.

    ``id`` is the run's id, chosen by the client so that a create whose answer was lost can
    be sent again without making a second run: the server answers a known ``id`` with the
    run it already has (409 if that run has another task key or idempotency key). None:
    the server picks one.

    ``cache_key`` (computed by the submitter from the task's cache policy) makes the server
    reuse results: a run whose key has a completed, unexpired result ends COMPLETED at
    once (state name ``Cached``) with that result, and never reaches a worker; one created
    while another run of the key is in flight waits for it and then does the same (or
    runs, if that one did not complete). The server decides, so two runs with one key
    submitted at once run the function once, even through two servers.
    """

    task_key: str
    name: str | None = None
    parameters: JSON = attrs.field(factory=dict)
    serializer: str = SERIALIZER_JSON
    scheduled_time: datetime | None = None
    idempotency_key: str | None = None
    tags: list[str] = attrs.field(factory=list)
    context: dict[str, JSON] = attrs.field(factory=dict)
    parent_task_run_id: uuid.UUID | None = None
    wait_for: list[uuid.UUID] = attrs.field(factory=list)
    id: uuid.UUID | None = None
    #: Runs of one task key with the same cache key share one result (at most 1000
    #: characters; None: no caching).
    cache_key: str | None = None
    #: Seconds the result of this run stays in the cache once it completed (None: until
    #: the run is deleted; retention deletes it too).
    cache_expiration: float | None = None
    #: Ignore the cache: run, and make this run's result the cached one.
    refresh_cache: bool = False
    #: The run group it joins. A run created in a group that was cancelled is created
    #: CANCELLED (never delivered).
    group_id: uuid.UUID | None = None
    #: Left alone when its parent run is cancelled (fire and forget).
    detached: bool = False


@attrs.frozen
class SetStateRequest:
    state: State
    force: bool = False


@attrs.frozen
class SetStateResult:
    status: SetStateStatus
    state: State
    details: str | None = None


@attrs.frozen
class CancelResult:
    """The answer of ``POST /api/task_runs/{id}/cancel``: the set_state answer for the run,
    and the runs cancelled with it in the same transaction."""

    status: SetStateStatus
    state: State
    details: str | None = None
    #: The run's descendants (runs submitted from inside it, theirs, ...) that had not
    #: ended and were cancelled with it; detached runs and theirs are left alone.
    cancelled_descendants: list[uuid.UUID] = attrs.field(factory=list)


@attrs.frozen
class GroupCancelResult:
    """The answer of ``POST /api/task_run_groups/{id}/cancel``."""

    group_id: uuid.UUID
    #: The runs cancelled: the group's runs that had not ended, and their descendants.
    cancelled: list[uuid.UUID] = attrs.field(factory=list)


@attrs.frozen
class PurgeRequest:
    """The body of ``POST /api/task_runs/purge``: delete the runs that ended more than
    ``older_than`` seconds ago (with their history), of ``task_key`` and in ``state`` (a
    terminal state type) when given."""

    older_than: float
    task_key: str | None = None
    state: StateType | None = None


@attrs.frozen
class PurgeResult:
    """The answer of ``POST /api/task_runs/purge``."""

    #: How many runs were deleted.
    deleted: int


@attrs.frozen
class ScheduleCreate:
    """The body of ``POST /api/schedules``: a periodic run of a task (the server creates one
    run per tick), or a change to one (a schedule is known by its ``name``).

    Exactly one of ``cron`` and ``interval`` is given. See :mod:`trioworker.schedules` for
    when ticks fall.
    """

    #: What the schedule is known by (1 to 200 characters, no ``/``): sending a schedule of
    #: the same name again changes it, or leaves it as it is when nothing differs.
    name: str
    #: The task each tick creates a run of.
    task_key: str
    #: A cron expression of five fields (minute hour day-of-month month day-of-week), or
    #: ``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly``, read in ``timezone``.
    cron: str | None = None
    #: Seconds between two ticks (at least 1), counted from ``anchor_date``.
    interval: float | None = None
    #: The IANA time zone the cron expression is read in (``Europe/Paris``).
    timezone: str = "UTC"
    #: Where interval ticks are counted from (default: 2020-01-01 00:00 in ``timezone``).
    anchor_date: datetime | None = None
    #: The parameters of every run it creates, encoded as ``serializer`` says.
    parameters: JSON = attrs.field(factory=dict)
    serializer: str = SERIALIZER_JSON
    #: Ticks missed while no server ran: ``"skip"`` drops them (a tick less than a minute
    #: late still fires), ``"once"`` creates one run for all of them.
    catchup: str = "skip"


@attrs.frozen(kw_only=True)
class Schedule(ScheduleCreate):
    """A schedule as the server holds it: its definition, and where its ticks stand."""

    #: The next tick: when the server creates the next run (UTC).
    next_fire_time: datetime
    #: The tick the last run was created for (None: none yet).
    last_fire_time: datetime | None = None
    #: The run created at that tick.
    last_run_id: uuid.UUID | None = None
    created: datetime = attrs.field(factory=utcnow)
    updated: datetime = attrs.field(factory=utcnow)

    def definition(self) -> ScheduleCreate:
        """What was sent to make it (without the fire times)."""
        return ScheduleCreate(**{f.name: getattr(self, f.name) for f in attrs.fields(ScheduleCreate)})


@attrs.frozen
class StateChange:
    """One entry of a run's state history."""

    type: StateType
    name: str
    timestamp: datetime
    message: str | None = None


def _make_converter() -> OrjsonConverter:
    conv = make_converter(forbid_extra_keys=False)

    def structure_uuid(value: object, _: object) -> uuid.UUID:
        if isinstance(value, uuid.UUID):
            return value
        if not isinstance(value, str):  # uuid.UUID(5) fails with an AttributeError
            raise TypeError(f"expected a UUID string, got {type(value).__name__}")
        return uuid.UUID(value)

    conv.register_structure_hook(uuid.UUID, structure_uuid)
    conv.register_unstructure_hook(uuid.UUID, str)

    def structure_datetime(value: object, _: object) -> datetime:
        if isinstance(value, datetime):
            parsed = value
        elif isinstance(value, str):
            parsed = datetime.fromisoformat(value)
        else:
            raise TypeError(f"expected an ISO 8601 time, got {value!r}")
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)

    conv.register_structure_hook(datetime, structure_datetime)

    # Strict scalars: a peer that sends 5 where a string belongs made a mistake worth naming.
    def strict(cls: type[object]) -> None:
        def check(value: object, _: object) -> object:
            if type(value) is not cls and not (cls is float and type(value) is int):
                raise TypeError(f"expected {cls.__name__}, got {type(value).__name__}")
            return value

        conv.register_structure_hook(cls, check)

    for scalar in (str, int, float, bool):
        strict(scalar)
    # Decimals travel as strings, exactly (a float would round them).
    conv.register_unstructure_hook(Decimal, str)
    conv.register_structure_hook(Decimal, lambda v, _: Decimal(str(v)))
    # The str hook above would catch string enums (singledispatch sees their str base).
    for enum_cls in (StateType, SetStateStatus):
        conv.register_structure_hook(enum_cls, lambda v, t: t(v))
    # JSON values pass through untouched in both directions.
    conv.register_structure_hook(Any, lambda v, _: v)
    # The caching fields are left out while they hold their defaults: a run without a
    # cache key travels (and is stored) exactly as before they existed.
    for cls, fields in _OMITTED_WHEN_DEFAULT.items():
        omitted: dict[str, Any] = {name: override(omit_if_default=True) for name in fields}
        conv.register_unstructure_hook(cls, make_dict_unstructure_fn(cls, conv, **omitted))
    return conv


#: Fields that :data:`converter` leaves out of a model's JSON while they hold their default.
_OMITTED_WHEN_DEFAULT: Final[dict[type, tuple[str, ...]]] = {
    StateDetails: ("cache_key", "cache_expiration", "cache_owner"),
    TaskRun: ("cache_key", "cache_expiration", "refresh_cache"),
    TaskRunCreate: ("cache_key", "cache_expiration", "refresh_cache"),
}


#: The converter every trioworker process uses for the wire format.
converter: Final[OrjsonConverter] = _make_converter()


def dumps(obj: object) -> bytes:
    """Unstructure ``obj`` and encode it as JSON bytes."""
    return orjson.dumps(converter.unstructure(obj))


def loads(data: bytes | str, cls: type[T]) -> T:
    """Decode JSON and structure it as ``cls`` (raises cattrs errors on bad shapes)."""
    return converter.structure(orjson.loads(data), cls)
