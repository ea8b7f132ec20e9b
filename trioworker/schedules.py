"""Periodic runs: what a schedule says (:class:`Cron`, :class:`Interval`), when its ticks
fall, and what firing a tick does to it. The clients check a schedule with these functions
before they send it; the server's stores call them to fire ticks.

**Cron** expressions are croniter's: five fields (minute, hour, day of month, month, day of
week; a day of month and a day of week both given match either, as in cron) or a
``@daily``-style name, read in the schedule's IANA time zone (zoneinfo's database). When
the clocks go forward, a tick in the skipped hour fires at the change (``30 2 * * *`` in
``Europe/Paris`` fires at 03:00 that day); when they go back, the repeated hour's ticks fire
in both passes (``*/30 * * * *`` keeps its pace; ``30 2 * * *`` fires twice that night).

**Intervals** are elapsed seconds from an anchor (``anchor_date``, by default 2020-01-01
00:00 in the schedule's time zone): ``interval=3600`` ticks on the anchor's minute and
second of every hour, daylight saving time or not. For a wall-clock time of day, use cron.

**Firing** (:func:`fire`): a schedule whose next fire time has come creates one run, for
its latest tick, and its next fire time moves to the first tick after now. Ticks that were
missed (no server ran) follow the schedule's ``catchup``: ``"skip"`` drops a latest tick
found more than :data:`MISSED_AFTER` seconds late, ``"once"`` fires it (one run for all
the ticks missed). Either way a schedule creates at most one run per firing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Final, TypeAlias
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs

from trioworker.models import Schedule, ScheduleCreate
from trioworker.protocol import SERIALIZERS

#: The catch-up policies: missed ticks are dropped, or fire one run.
CATCHUP_SKIP: Final = "skip"
CATCHUP_ONCE: Final = "once"
CATCHUPS: Final = (CATCHUP_SKIP, CATCHUP_ONCE)
#: Seconds after which a tick that has not fired counts as missed (for ``catchup="skip"``).
MISSED_AFTER: Final = 60.0
#: The shortest interval, in seconds.
MIN_INTERVAL: Final = 1.0
#: The longest interval: 100 years, in seconds.
MAX_INTERVAL: Final = 100 * 365.25 * 86400
#: The longest schedule name.
MAX_NAME: Final = 200
#: The names croniter gives a meaning (``@daily`` is ``0 0 * * *``).
_NAMED: Final = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
_ONE_MICROSECOND: Final = timedelta(microseconds=1)


@lru_cache(maxsize=256)
def time_zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` (``"Europe/Paris"``, ``"UTC"``).

    Raises:
        ValueError: no such time zone (one line naming it).
    """
    try:
        if not name or name != name.strip() or name.startswith(("/", ".")) or ".." in name:
            raise ValueError
        return ZoneInfo(name)
    except (ValueError, ZoneInfoNotFoundError, OSError):
        raise ValueError(
            f"unknown time zone {name!r}: give an IANA name such as 'Europe/Paris' or 'UTC'"
        ) from None


def check_cron(expression: str) -> str:
    """``expression`` with its fields separated by one space, once croniter reads it as five
    fields (or a ``@daily``-style name) that match at least one time.

    Raises:
        ValueError: one line saying what is wrong with it.
    """
    from croniter import croniter  # only where schedules are read: the import costs

    if not isinstance(expression, str):
        raise ValueError(f"a cron expression is a string, got {type(expression).__name__}")
    text = " ".join(expression.split())
    fields = text.split(" ")
    if len(fields) == 1 and text.lower() in _NAMED:
        text = text.lower()
    elif len(fields) != 5:
        raise ValueError(
            f"cron expression {expression!r} has {len(fields)} field(s), not 5: minute hour "
            "day-of-month month day-of-week (or @hourly, @daily, @weekly, @monthly, @yearly)"
        )
    try:
        croniter(text, datetime(2020, 1, 1, tzinfo=UTC)).get_next(datetime)
    except Exception as exc:  # croniter's errors are ValueErrors, and a few others
        why = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        why = why.removeprefix("is not acceptable").removeprefix(",").strip()
        if type(exc).__name__ == "CroniterBadDateError":
            why = "it matches no date"
        elif not why:
            why = "a field holds what cron does not take"
        raise ValueError(
            f"cron expression {expression!r} is not valid: {why or type(exc).__name__}"
        ) from None
    return text


def check_interval(seconds: object) -> float:
    """``seconds`` (a number, or a ``timedelta``) as a float between :data:`MIN_INTERVAL`
    and :data:`MAX_INTERVAL`.

    Raises:
        ValueError: not a number of seconds in that range.
    """
    value = seconds.total_seconds() if isinstance(seconds, timedelta) else seconds
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"an interval is a number of seconds or a timedelta, got {seconds!r}")
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:
        raise ValueError(f"an interval must be between {MIN_INTERVAL:g} s and 100 years, got {value:g} s")
    return float(value)


def check_name(name: object, what: str = "a schedule's name") -> str:
    """``name`` when it can name a schedule: 1 to :data:`MAX_NAME` characters, no ``/``
    and no control character.

    Raises:
        ValueError: it cannot.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME or "/" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"{what} must be at most {MAX_NAME} characters without '/' or control characters")
    return name


def checked(create: ScheduleCreate) -> ScheduleCreate:
    """``create`` once every field is checked, its cron expression in its one spelling and
    a naive ``anchor_date`` read in its time zone.

    Raises:
        ValueError: one line naming what is wrong (a cron expression, a time zone, both or
            neither of cron and interval, ...).
    """
    check_name(create.name)
    if not create.task_key:
        raise ValueError("a schedule needs the task_key of the task it runs")
    zone = time_zone(create.timezone)
    if (create.cron is None) == (create.interval is None):
        raise ValueError("a schedule has either a cron expression or an interval (not both, not neither)")
    if create.catchup not in CATCHUPS:
        raise ValueError(f"catchup must be one of {', '.join(CATCHUPS)}, got {create.catchup!r}")
    if create.serializer not in SERIALIZERS:
        raise ValueError(f"serializer must be one of {', '.join(SERIALIZERS)}, got {create.serializer!r}")
    cron = None if create.cron is None else check_cron(create.cron)
    interval = None if create.interval is None else check_interval(create.interval)
    anchor = create.anchor_date
    if anchor is not None and anchor.tzinfo is None:
        anchor = anchor.replace(tzinfo=zone)
    if anchor is not None:
        anchor = anchor.astimezone(UTC)
    return attrs.evolve(create, cron=cron, interval=interval, anchor_date=anchor)


def _anchor(schedule: ScheduleCreate) -> datetime:
    if schedule.anchor_date is not None:
        return schedule.anchor_date
    return datetime(2020, 1, 1, tzinfo=time_zone(schedule.timezone))


def _croniter(schedule: ScheduleCreate, start: datetime) -> Any:
    from croniter import croniter

    assert schedule.cron is not None
    return croniter(schedule.cron, start.astimezone(time_zone(schedule.timezone)))


def next_fire_time(schedule: ScheduleCreate, after: datetime) -> datetime:
    """The first tick of ``schedule`` (a checked one) strictly after ``after``, in UTC."""
    if schedule.cron is not None:
        tick: datetime = _croniter(schedule, after).get_next(datetime)
        return tick.astimezone(UTC)
    step = timedelta(seconds=schedule.interval or MIN_INTERVAL)
    anchor = _anchor(schedule)
    return (anchor + ((after - anchor) // step + 1) * step).astimezone(UTC)


def latest_tick(schedule: ScheduleCreate, now: datetime) -> datetime:
    """The last tick of ``schedule`` at ``now`` or before it, in UTC."""
    if schedule.cron is not None:
        tick: datetime = _croniter(schedule, now + _ONE_MICROSECOND).get_prev(datetime)
        return tick.astimezone(UTC)
    step = timedelta(seconds=schedule.interval or MIN_INTERVAL)
    anchor = _anchor(schedule)
    return (anchor + ((now - anchor) // step) * step).astimezone(UTC)


def new_schedule(create: ScheduleCreate, now: datetime, existing: Schedule | None) -> Schedule | None:
    """The schedule ``create`` (a checked one) makes at ``now``: None when ``existing``
    already is that schedule (nothing to write); else ``existing`` changed (its fire times
    start again from ``now``, its ``created`` kept), or a new one."""
    if existing is not None and existing.definition() == create:
        return None
    fields = attrs.asdict(create, recurse=False)
    return Schedule(
        **fields,
        next_fire_time=next_fire_time(create, now),
        last_fire_time=None if existing is None else existing.last_fire_time,
        last_run_id=None if existing is None else existing.last_run_id,
        created=now if existing is None else existing.created,
        updated=now,
    )


def fire(schedule: Schedule, now: datetime) -> tuple[datetime | None, Schedule]:
    """Fire ``schedule`` at ``now``: ``(the tick to create a run for, or None, the schedule
    with its next fire time after now)``. Nothing is due: ``(None, schedule)`` unchanged.

    The tick is the latest one due; earlier ones due too were missed and get no run of their
    own. With ``catchup="skip"``, a latest tick more than :data:`MISSED_AFTER` seconds late
    gets none either. The caller records the run with :func:`fired`.
    """
    if schedule.next_fire_time > now:
        return None, schedule
    tick: datetime | None = max(latest_tick(schedule, now), schedule.next_fire_time)
    assert tick is not None
    if schedule.catchup == CATCHUP_SKIP and (now - tick).total_seconds() > MISSED_AFTER:
        tick = None
    return tick, attrs.evolve(schedule, next_fire_time=next_fire_time(schedule, now), updated=now)


def idempotency_key(schedule: ScheduleCreate, tick: datetime) -> str:
    """The idempotency key of the run of ``schedule`` for ``tick``: one run per tick, even
    if two servers fired it."""
    return f"schedule/{schedule.name}/{tick.astimezone(UTC).isoformat()}"


# --------------------------------------------------------------------------- what a task declares


@attrs.frozen
class _Spec:
    """What :class:`Cron` and :class:`Interval` share: the arguments of the runs, the name,
    the catch-up policy and the time zone."""

    #: The IANA time zone (``"Europe/Paris"``; default UTC).
    timezone: str = attrs.field(default="UTC", kw_only=True)
    #: Positional arguments of every run (default: none, the function's defaults apply).
    args: Sequence[Any] = attrs.field(default=(), kw_only=True, converter=tuple)
    #: Keyword arguments of every run.
    kwargs: Mapping[str, Any] = attrs.field(factory=dict, kw_only=True, converter=dict)
    #: What the schedule is known by on the server (default: the task's key).
    name: str | None = attrs.field(default=None, kw_only=True)
    #: ``"skip"`` or ``"once"``: what a server that was down does with the ticks it missed.
    catchup: str = attrs.field(default=CATCHUP_SKIP, kw_only=True)

    def __attrs_post_init__(self) -> None:
        time_zone(self.timezone)
        if self.name is not None:
            check_name(self.name)
        if self.catchup not in CATCHUPS:
            raise ValueError(f"catchup must be one of {', '.join(CATCHUPS)}, got {self.catchup!r}")

    def create(self, name: str, task_key: str, parameters: Any, serializer: str) -> ScheduleCreate:
        """The create this declares for a task, checked."""
        raise NotImplementedError


@attrs.frozen
class Cron(_Spec):
    """A run at every time a cron expression matches, in a time zone:
    ``Cron("0 9 * * 1-5", timezone="Europe/Paris")`` (weekdays at 9:00 in Paris).

    Raises:
        ValueError: a cron expression croniter cannot read (or that matches no date), an
            unknown time zone, a bad name or catch-up policy (one line).
    """

    expression: str = attrs.field(converter=check_cron)

    def create(self, name: str, task_key: str, parameters: Any, serializer: str) -> ScheduleCreate:
        return checked(
            ScheduleCreate(
                name=name,
                task_key=task_key,
                cron=self.expression,
                timezone=self.timezone,
                parameters=parameters,
                serializer=serializer,
                catchup=self.catchup,
            )
        )


@attrs.frozen
class Interval(_Spec):
    """A run every ``every`` (seconds, or a ``timedelta``; at least a second), counted from
    ``anchor_date`` (default 2020-01-01 00:00 in ``timezone``; a naive one is read there).

    Raises:
        ValueError: an interval out of range, an unknown time zone, a bad name or catch-up
            policy (one line).
    """

    every: float = attrs.field(converter=check_interval)
    anchor_date: datetime | None = attrs.field(default=None, kw_only=True)

    def create(self, name: str, task_key: str, parameters: Any, serializer: str) -> ScheduleCreate:
        return checked(
            ScheduleCreate(
                name=name,
                task_key=task_key,
                interval=self.every,
                timezone=self.timezone,
                anchor_date=self.anchor_date,
                parameters=parameters,
                serializer=serializer,
                catchup=self.catchup,
            )
        )


#: What ``@task(schedule=...)`` takes: a spec, a cron expression (a string, read in UTC), an
#: interval (a ``timedelta`` or a number of seconds), or a list of them.
ScheduleSpec: TypeAlias = Cron | Interval | str | timedelta | float


def as_specs(value: ScheduleSpec | Sequence[ScheduleSpec] | None) -> tuple[Cron | Interval, ...]:
    """``@task(schedule=...)``'s value as specs, each checked; names default to the task's
    key for the first, ``key#2``, ``key#3`` ... for the others (see :func:`spec_names`).

    Raises:
        ValueError: a spec that cannot work (a bad cron expression, time zone, interval).
        TypeError: a value of another type.
    """
    if value is None:
        return ()
    items: Sequence[object] = (
        value if isinstance(value, Sequence) and not isinstance(value, str) else (value,)
    )
    specs: list[Cron | Interval] = []
    for item in items:
        if isinstance(item, Cron | Interval):
            specs.append(item)
        elif isinstance(item, str):
            specs.append(Cron(item))
        elif isinstance(item, timedelta) or (isinstance(item, int | float) and not isinstance(item, bool)):
            specs.append(Interval(item))
        else:
            raise TypeError(
                "schedule= takes trioworker.Cron(...), trioworker.Interval(...), a cron expression, "
                f"a timedelta or seconds (or a list of them), got {type(item).__name__}"
            )
    names = spec_names("", specs)
    if len(set(names)) != len(names):
        raise ValueError("two schedules of one task have the same name: name them (name=...)")
    return tuple(specs)


def spec_names(task_key: str, specs: Sequence[Cron | Interval]) -> list[str]:
    """The name of each spec of a task: its own, else the task key (``key#2`` and on for
    the second and later specs without a name)."""
    return [
        spec.name if spec.name is not None else (task_key if n == 0 else f"{task_key}#{n + 1}")
        for n, spec in enumerate(specs)
    ]
