"""trioworker: background task runs for Trio, with a durable queue and structured concurrency.

The public API is what this module exports; everything else is an implementation detail.
Blocking twins of the async calls live in :mod:`trioworker.sync`.

``TaskWorker`` and ``serve`` are imported on first use (``trioworker.TaskWorker`` or
``from trioworker import TaskWorker``), so a process that only submits runs never imports
the worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trioworker import cache_policies as cache_policies
from trioworker import sync as sync
from trioworker._version import __version__ as __version__
from trioworker.client.futures import SyncTaskRunFuture as SyncTaskRunFuture
from trioworker.client.futures import TaskRunFuture as TaskRunFuture
from trioworker.client.futures import as_completed as as_completed
from trioworker.client.futures import wait_all as wait_all
from trioworker.client.groups import RunGroup as RunGroup
from trioworker.client.groups import open_run_group as open_run_group
from trioworker.client.rest import SyncTaskRunClient as SyncTaskRunClient
from trioworker.client.rest import TaskRunClient as TaskRunClient
from trioworker.client.rest import connect as connect
from trioworker.client.schedules import schedule as schedule
from trioworker.client.submission import unmapped as unmapped
from trioworker.context import RunContext as RunContext
from trioworker.context import current_run as current_run
from trioworker.context import tags as tags
from trioworker.context import user_context as user_context
from trioworker.errors import ApiError as ApiError
from trioworker.errors import NotFound as NotFound
from trioworker.errors import ParameterError as ParameterError
from trioworker.errors import QueueFull as QueueFull
from trioworker.errors import ResultDecodeError as ResultDecodeError
from trioworker.errors import ServerUnavailable as ServerUnavailable
from trioworker.errors import StopTaskWorker as StopTaskWorker
from trioworker.errors import SubscriptionRefused as SubscriptionRefused
from trioworker.errors import TaskRunFailed as TaskRunFailed
from trioworker.errors import TrioworkerError as TrioworkerError
from trioworker.models import Schedule as Schedule
from trioworker.models import State as State
from trioworker.models import StateType as StateType
from trioworker.models import TaskRun as TaskRun
from trioworker.schedules import Cron as Cron
from trioworker.schedules import Interval as Interval
from trioworker.tasks import Task as Task
from trioworker.tasks import task as task

if TYPE_CHECKING:
    from trioworker.worker.task_worker import TaskWorker as TaskWorker
    from trioworker.worker.task_worker import serve as serve

__all__ = [
    "ApiError",
    "Cron",
    "Interval",
    "NotFound",
    "ParameterError",
    "QueueFull",
    "ResultDecodeError",
    "RunContext",
    "RunGroup",
    "Schedule",
    "ServerUnavailable",
    "State",
    "StateType",
    "StopTaskWorker",
    "SubscriptionRefused",
    "SyncTaskRunClient",
    "SyncTaskRunFuture",
    "Task",
    "TaskRun",
    "TaskRunClient",
    "TaskRunFailed",
    "TaskRunFuture",
    "TaskWorker",
    "TrioworkerError",
    "__version__",
    "as_completed",
    "cache_policies",
    "connect",
    "current_run",
    "open_run_group",
    "schedule",
    "serve",
    "sync",
    "tags",
    "task",
    "unmapped",
    "user_context",
    "wait_all",
]


def __getattr__(name: str) -> object:
    """``TaskWorker`` and ``serve``, imported when first asked for (see the module docstring)."""
    if name in ("TaskWorker", "serve"):
        from trioworker import worker

        value = getattr(worker, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
