"""The worker wing: :class:`TaskWorker` and :func:`serve` run task runs delivered over the
subscription websocket (see ``docs/architecture.md`` for the nursery tree).

A worker process imports this wing and the shared core, never :mod:`trioworker.server`.

Modules: ``task_worker`` (TaskWorker, serve: the nursery tree), ``engine`` (one run's
attempts, retries and timeout), ``subscription`` (the websocket to the server),
``status`` (the optional status server), ``statistics`` (the frozen snapshot it reads),
``entrypoints`` (``MODULE:TASK`` specs), ``_threads`` (worker threads for sync tasks).
"""

from trioworker.worker.task_worker import TaskWorker as TaskWorker
from trioworker.worker.task_worker import WorkerState as WorkerState
from trioworker.worker.task_worker import serve as serve

__all__ = ["TaskWorker", "WorkerState", "serve"]
