"""Retention: a run that ended is deleted, with its result and history, once it ended longer
ago than the server's retention period (``trioworker server --retention``, 7 days by
default), so that a long-lived server does not grow forever.

:func:`keep_retention` runs in the server's nursery. It does not poll: after each purge it
reads when the run that ended first ended, and sleeps until that run is due (but at least
:data:`RETENTION_GRANULARITY` seconds, so a steady stream of ends costs one purge a
minute, not one per run). Runs that end later are due later still, so nothing is missed.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Final

import trio

from trioworker.server.service import TaskRunService
from trioworker.server.store.base import StoreError

log = logging.getLogger(__name__)

#: Most seconds a run may outlive its retention period; purges come at most this often
#: (or once per retention period, when that is shorter).
RETENTION_GRANULARITY: Final = 60.0


async def keep_retention(
    service: TaskRunService,
    retention: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Delete every run that ended more than ``retention`` seconds ago, as runs reach that
    age, until cancelled (start it with ``nursery.start``).

    Times are the dispatcher's clock (epoch seconds) against the times runs ended.

    **Error handling:** a purge the store refuses (:class:`StoreError`) is logged and
    tried again :data:`RETENTION_GRANULARITY` seconds later; the server keeps running.

    **Cancellation handling:** cancelling it stops it; a batch of deletes under way is
    one store operation, which finishes (the store's operations always do).

    Raises:
        ValueError: ``retention`` is not more than 0.
    """
    if not retention > 0:
        raise ValueError(f"retention must be more than 0 seconds, got {retention!r}")
    clock = service.dispatcher.clock
    pause = min(RETENTION_GRANULARITY, retention)
    task_status.started()
    while True:
        now = clock()
        try:
            deleted = await service.purge_ended(datetime.fromtimestamp(now - retention, UTC))
            oldest = await service.store.oldest_end()
        except StoreError as exc:
            log.warning("could not delete the runs past their retention, trying again later: %s", exc)
            await trio.sleep(pause)
            continue
        if deleted:
            log.info("deleted %d runs that ended more than %g seconds ago", deleted, retention)
        # A run that ends from now on is due a whole retention period from now, at least.
        due = now + retention if oldest is None else oldest.timestamp() + retention
        await trio.sleep(max(pause, due - clock()))
