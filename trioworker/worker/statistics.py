"""A worker's counters as one frozen snapshot: what :meth:`TaskWorker.statistics()
<trioworker.worker.TaskWorker.statistics>` returns and all the status server reads.

It lives apart from both so that the status server needs nothing of the worker (and the
worker imports the status server, with its web stack, only when given a status port).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime

import attrs


@attrs.frozen
class WorkerStatistics:
    """A worker's state at one moment; the mappings are copies, keyed by task key.

    Attributes:
        client_id: the worker's name on the server.
        started_at: when ``start()`` was called (UTC), None before.
        stopping: True once the worker stopped taking runs.
        connected: True while it holds a live subscription to the server.
        limit: the most runs at once (None: no limit).
        prefetch: runs it may buffer beyond its limit.
        current_tasks: runs executing right now.
        available_tasks: free slots (``math.inf`` without a limit).
        task_keys: the keys it serves, in order.
        in_flight_task_runs: per key, run id -> when it started running here (UTC).
        started_task_runs: per key, runs started here.
        finished_task_runs: per key, runs that ended here (completed, failed, retrying or
            cancelled).
        failed_task_runs: per key, runs that ended FAILED here.
    """

    client_id: str
    started_at: datetime | None
    stopping: bool
    connected: bool
    limit: int | None
    prefetch: int
    current_tasks: int
    available_tasks: float
    task_keys: tuple[str, ...]
    in_flight_task_runs: Mapping[str, Mapping[uuid.UUID, datetime]]
    started_task_runs: Mapping[str, int]
    finished_task_runs: Mapping[str, int]
    failed_task_runs: Mapping[str, int]
