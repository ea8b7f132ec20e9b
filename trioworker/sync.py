"""Blocking twins for plain synchronous code (scripts, threads, Flask or Django views).

Every async call of trioworker has a twin of the same name here or under ``Task.sync``;
they use ``httpx.Client`` and start no event loop::

    future = say.sync.delay("hi")          # await say.delay("hi")
    future.result(timeout=10)               # await future.result(timeout=10)
    trioworker.sync.wait_all(futures)       # await trioworker.wait_all(futures)
    with trioworker.sync.connect(): ...     # async with trioworker.connect(): ...
    trioworker.sync.schedule(say, cron=...) # await trioworker.schedule(say, cron=...)
    with trioworker.sync.open_run_group():  # async with trioworker.open_run_group():
        ...
"""

from __future__ import annotations

from trioworker.client.futures import SyncTaskRunFuture
from trioworker.client.futures import sync_as_completed as as_completed
from trioworker.client.futures import sync_wait_all as wait_all
from trioworker.client.groups import SyncRunGroup
from trioworker.client.groups import open_sync_run_group as open_run_group
from trioworker.client.rest import connect_sync as connect
from trioworker.client.schedules import schedule_sync as schedule

__all__ = [
    "SyncRunGroup",
    "SyncTaskRunFuture",
    "as_completed",
    "connect",
    "open_run_group",
    "schedule",
    "wait_all",
]
