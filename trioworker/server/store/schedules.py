"""What firing does to schedules, the same in every store: which schedules fire, the run each
one creates, and how a schedule's row is written and read. The stores only select the rows
due (and lock them) and write them back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

import attrs
import orjson

from trioworker.models import Schedule, TaskRun, TaskRunCreate, converter
from trioworker.schedules import fire, idempotency_key
from trioworker.server.store.base import QueuedRun

log = logging.getLogger("trioworker.server")

#: Most schedules one firing takes (the rest fire right after, in the next one).
FIRE_BATCH: Final = 100
#: A schedule whose ticks cannot be computed any more (its time zone left the database) is
#: tried again this much later.
UNREADABLE_RETRY: Final = timedelta(hours=1)

CreateRuns = Callable[[Sequence[TaskRunCreate]], list[tuple[TaskRun, QueuedRun | None]]]


def schedule_body(schedule: Schedule) -> bytes:
    """A schedule as its row's body: JSON, as the API gives it."""
    return orjson.dumps(converter.unstructure(schedule))


def schedule_from_body(body: bytes | memoryview) -> Schedule:
    return converter.structure(orjson.loads(bytes(body)), Schedule)


def fire_due(
    due: Sequence[Schedule], now: float, create_runs: CreateRuns
) -> tuple[list[Schedule], list[tuple[TaskRun, QueuedRun]]]:
    """Fire the schedules ``due`` at ``now`` (epoch seconds), creating their runs through
    ``create_runs`` (the store's, in the same transaction; one call for all of them):
    ``(the schedules to write, the runs created)``. A run that already existed (the tick was
    fired elsewhere) is not returned again."""
    moment = datetime.fromtimestamp(now, UTC)
    written: list[Schedule] = []
    ticked: list[tuple[Schedule, datetime]] = []
    for schedule in due:
        try:
            tick, after = fire(schedule, moment)
        except ValueError as exc:
            log.warning("schedule %r cannot fire (%s); trying again in an hour", schedule.name, exc)
            written.append(attrs.evolve(schedule, next_fire_time=moment + UNREADABLE_RETRY))
            continue
        if tick is None:
            written.append(after)
        else:
            ticked.append((after, tick))
    creates = [
        TaskRunCreate(
            task_key=schedule.task_key,
            parameters=schedule.parameters,
            serializer=schedule.serializer,
            scheduled_time=tick,
            idempotency_key=idempotency_key(schedule, tick),
        )
        for schedule, tick in ticked
    ]
    created: list[tuple[TaskRun, QueuedRun]] = []
    for (schedule, tick), (run, queued) in zip(ticked, create_runs(creates) if creates else [], strict=True):
        written.append(attrs.evolve(schedule, last_fire_time=tick, last_run_id=run.id))
        if queued is not None:
            created.append((run, queued))
    return written, created
