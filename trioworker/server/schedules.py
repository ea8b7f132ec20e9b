"""Periodic runs on the server: the schedule timer, which fires each schedule as its ticks
come (what a schedule is and when it ticks: :mod:`trioworker.schedules`).

:func:`keep_schedules` runs in the server's nursery. It does not poll: after each firing it
sleeps until the earliest next fire time of every schedule in the store, or until schedules
change (``service.schedules_changed``: a schedule created, changed or deleted through this
server, or, on a database several servers share, announced by another one, or possibly
missed while the notices were not heard). Of several servers on one database, each sleeps
until that earliest time; the one that locks a schedule's row first fires it, and the
others find it fired (see :meth:`~trioworker.server.store.base.Store.fire_schedules`).
"""

from __future__ import annotations

import logging
import math
from typing import Final

import trio

from trioworker.server.service import TaskRunService
from trioworker.server.store.base import StoreError

log = logging.getLogger(__name__)

#: Seconds before a firing the store refused is tried again.
RETRY_SECONDS: Final = 5.0


async def keep_schedules(
    service: TaskRunService, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Fire the store's schedules as their ticks come, until cancelled (start it with
    ``nursery.start``). Times are the dispatcher's clock (epoch seconds).

    **Error handling:** a firing the store refuses (:class:`StoreError`) is logged and tried
    again :data:`RETRY_SECONDS` later; nothing of it was saved, so no tick is lost or made
    twice.

    **Cancellation handling:** cancelling it stops it; a firing under way is one store
    operation, which finishes (the store's operations always do).
    """
    clock = service.dispatcher.clock
    failing = False
    task_status.started()
    while True:
        changed = service.schedules_changed = trio.Event()  # a change from now on wakes us
        try:
            due = await service.fire_schedules()
        except StoreError as exc:
            if not failing:
                log.warning("could not fire the schedules, trying again every %g s: %s", RETRY_SECONDS, exc)
            failing = True
            due = clock() + RETRY_SECONDS
        else:
            if failing:
                log.info("the schedules fire again")
            failing = False
        with trio.move_on_after(math.inf if due is None else max(0.0, due - clock())):
            await changed.wait()
