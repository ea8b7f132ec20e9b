"""The exceptions trioworker raises.

::

    TrioworkerError
    ├── ParameterError        a run's parameters cannot be read for its task
    ├── ResultDecodeError     a completed run's result cannot be read as its return annotation
    ├── ApiError              the server refused a request (status code and detail)
    │   └── NotFound          no such task run
    ├── ServerUnavailable     the server cannot be reached
    ├── SubscriptionRefused   the server refused the worker's API key (close 1008)
    └── TaskRunFailed         a run ended FAILED, CRASHED or CANCELLED (type, message, traceback)
    StopTaskWorker            raise it in a task, or call TaskWorker.stop(), to stop a worker
"""

from __future__ import annotations

from typing import Any


class TrioworkerError(Exception):
    """The root of trioworker's own errors."""


class ParameterError(TrioworkerError):
    """A run's parameters do not fit its task (missing, unexpected, or of the wrong type)."""


class ResultDecodeError(TrioworkerError):
    """``result()`` cannot read a COMPLETED run's result as the task's return annotation.

    The annotation cannot be resolved in this process, or the JSON does not fit it (a
    worker running other code than the submitter, a result written through the API).
    Nothing is lost: ``data`` is the result as the server keeps it (JSON, or the base64
    pickle), ``task_run`` the run.
    """

    def __init__(self, message: str, *, data: Any = None, task_run: Any = None) -> None:
        super().__init__(message)
        self.data = data
        self.task_run = task_run


class ApiError(TrioworkerError):
    """The server answered with an error status."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class NotFound(ApiError):
    """The task run does not exist (never did, or was deleted)."""


class ServerUnavailable(TrioworkerError):
    """The server cannot be reached (refused, reset, timed out)."""


class SubscriptionRefused(TrioworkerError):
    """The server refused the subscription (a missing or wrong API key)."""


class TaskRunFailed(TrioworkerError):
    """A run did not complete. Carries the remote exception's type, message and traceback."""

    def __init__(
        self,
        message: str,
        *,
        state_type: str,
        exc_type: str | None = None,
        remote_traceback: str | None = None,
        task_run: Any = None,
    ) -> None:
        super().__init__(message)
        self.state_type = state_type
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback
        self.task_run = task_run


class StopTaskWorker(Exception):
    """Stops a worker cleanly: ``serve()`` returns instead of raising."""
