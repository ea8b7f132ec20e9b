"""Periodic runs from the client's side: :func:`schedule` registers one with the server now
(``trioworker.sync.schedule`` is its blocking twin), and :func:`declared_schedules` gives what
a task declares (``@task(schedule=...)``), which a worker registers when it starts serving
it. The server fires them (see :mod:`trioworker.schedules` for when).

A schedule's arguments are bound and encoded as a submission's are
(:func:`~trioworker.client.submission.build_create`), once, when it is made: every run it
creates gets them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from trioworker.client.rest import using_client, using_sync_client
from trioworker.client.submission import TaskSpec, build_create
from trioworker.models import Schedule, ScheduleCreate
from trioworker.schedules import CATCHUP_SKIP, Cron, Interval, spec_names


def schedule_create(task: TaskSpec, spec: Cron | Interval, name: str) -> ScheduleCreate:
    """What registers ``spec`` of ``task`` under ``name``, checked.

    Raises:
        TypeError: its arguments do not fit the task's signature (or cannot be sent as
            they are), or one is a future.
        ValueError: it cannot work (see :func:`trioworker.schedules.checked`).
    """
    create = build_create(task, spec.args, spec.kwargs)
    if create.wait_for:
        raise TypeError(f"task {task.key}: a schedule's arguments cannot be futures of other runs")
    return spec.create(name, task.key, create.parameters, create.serializer)


def declared_schedules(task: TaskSpec, specs: Sequence[Cron | Interval]) -> list[ScheduleCreate]:
    """What ``task`` declares with ``schedule=`` (``specs``), named as
    :func:`~trioworker.schedules.spec_names` says, ready to register."""
    return [
        schedule_create(task, spec, name)
        for spec, name in zip(specs, spec_names(task.key, specs), strict=True)
    ]


def _spec(
    cron: str | None,
    interval: float | timedelta | None,
    *,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    timezone: str,
    anchor_date: datetime | None,
    catchup: str,
) -> Cron | Interval:
    options: dict[str, Any] = {"args": args, "kwargs": kwargs or {}, "timezone": timezone, "catchup": catchup}
    if (cron is None) == (interval is None):
        raise ValueError("give a schedule either cron= or interval= (not both, not neither)")
    if cron is not None:
        if anchor_date is not None:
            raise ValueError("anchor_date= goes with interval=, not with cron=")
        return Cron(cron, **options)
    assert interval is not None
    return Interval(interval, anchor_date=anchor_date, **options)


async def schedule(
    task: TaskSpec,
    *,
    cron: str | None = None,
    interval: float | timedelta | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    timezone: str = "UTC",
    anchor_date: datetime | None = None,
    name: str | None = None,
    catchup: str = CATCHUP_SKIP,
) -> Schedule:
    """Register a periodic run of ``task`` with the server: ``await trioworker.schedule(report,
    cron="0 9 * * 1-5", kwargs={"region": "eu"}, timezone="Europe/Paris")``. The server
    creates one run per tick from then on, until the schedule is deleted.

    Args:
        cron: a cron expression (five fields, or ``@daily`` and the like), read in ``timezone``.
        interval: or the seconds (or a ``timedelta``, at least a second) between two ticks,
            counted from ``anchor_date`` (default 2020-01-01 00:00 in ``timezone``).
        args, kwargs: the arguments of every run, checked and encoded now as ``delay``'s are.
        timezone: an IANA time zone name (``"Europe/Paris"``).
        name: what the schedule is known by (default: the task's key); registering a
            schedule of the same name again changes it (or nothing, when it is the same).
        catchup: ``"skip"`` (ticks missed while no server ran are dropped) or ``"once"``
            (one run for all of them).

    Returns:
        The schedule as the server holds it (``next_fire_time`` says when it fires next).

    Raises:
        ValueError: a bad cron expression, an unknown time zone, an interval out of range,
            both or neither of cron and interval (one line, before anything is sent).
        TypeError: arguments that do not fit the task (as ``delay`` raises them).
        ApiError: the server refused it; ServerUnavailable: no server answered.
    """
    spec = _spec(
        cron, interval, args=args, kwargs=kwargs, timezone=timezone, anchor_date=anchor_date, catchup=catchup
    )
    create = schedule_create(task, spec, task.key if name is None else name)
    async with using_client() as client:
        return await client.upsert_schedule(create)


def schedule_sync(
    task: TaskSpec,
    *,
    cron: str | None = None,
    interval: float | timedelta | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    timezone: str = "UTC",
    anchor_date: datetime | None = None,
    name: str | None = None,
    catchup: str = CATCHUP_SKIP,
) -> Schedule:
    """The blocking twin of :func:`schedule` (``trioworker.sync.schedule``)."""
    spec = _spec(
        cron, interval, args=args, kwargs=kwargs, timezone=timezone, anchor_date=anchor_date, catchup=catchup
    )
    create = schedule_create(task, spec, task.key if name is None else name)
    with using_sync_client() as client:
        return client.upsert_schedule(create)
