"""The exceptions trioworker raises.

::

    TrioworkerError
    ├── ParameterError        a run's parameters cannot be read for its task
    ├── ResultDecodeError     a completed run's result cannot be read as its return annotation
    ├── ApiError              the server refused a request (status code and detail)
    │   ├── NotFound          no such task run
    │   └── QueueFull         a task key's queue stayed full (429) for the client's timeout
    ├── ServerUnavailable     the server cannot be reached
    ├── SubscriptionRefused   the server refused the worker's API key (close 1008)
    └── TaskRunFailed         a run ended FAILED, CRASHED or CANCELLED (type, message, traceback)
    StopTaskWorker            raise it in a task, or call TaskWorker.stop(), to stop a worker
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trioworker.models import TaskRun, converter


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


class QueueFull(ApiError):
    """The server's queue of ``task_key`` is full (its ``--max-queued``): 429.

    A client waits and sends the create again (after ``retry_after`` seconds, as the server
    judged from how fast its workers take runs, or once the server says there is room) as
    long as its timeout allows; this is raised once that ran out. ``room`` is how many of
    the request's first creates fit; ``created`` the runs this call did create before it
    gave up (a ``map`` sends what fits first). ``max_queued`` is the server's bound.

    Of one answer of the server (before a client acts on it): ``partial`` is True when the
    server made those first ``room`` creates (trioworker's clients ask it to), and then
    ``created`` holds their runs; ``room_announced`` when the client channel will say
    when there is room again.
    """

    def __init__(
        self,
        detail: str,
        *,
        task_key: str | None = None,
        room: int = 0,
        retry_after: float = 1.0,
        created: Sequence[Any] = (),
        max_queued: int | None = None,
        partial: bool = False,
        room_announced: bool = False,
    ) -> None:
        super().__init__(429, detail)
        self.task_key = task_key
        self.room = room
        self.retry_after = retry_after
        self.created = list(created)
        self.max_queued = max_queued
        self.partial = partial
        self.room_announced = room_announced


def api_error(status_code: int, detail: str, fields: Mapping[str, object] | None = None) -> ApiError:
    """The error for an error answer of the server: :class:`NotFound` for 404,
    :class:`QueueFull` for 429 (``fields``: the answer's other fields, ``task_key``,
    ``room``, ``retry_after``, ``max_queued``, ``created`` and ``room_announced``; a field
    that is not of its type is left at its default, but ``created`` must be a list of
    task runs), else :class:`ApiError`.

    Raises:
        cattrs.BaseValidationError: ``created`` is there but is not a list of task runs.
    """
    if status_code == 404:
        return NotFound(status_code, detail)
    if status_code == 429:
        fields = fields or {}
        task_key = fields.get("task_key")
        bound = _number(fields.get("max_queued"), 0, 1, 2**62)
        created = fields.get("created")
        return QueueFull(
            detail,
            task_key=task_key if isinstance(task_key, str) else None,
            room=int(_number(fields.get("room"), 0, 0, 2**31)),
            retry_after=_number(fields.get("retry_after"), 1.0, 0, 60),
            created=() if created is None else converter.structure(created, list[TaskRun]),
            max_queued=int(bound) if bound else None,
            partial=created is not None,
            room_announced=fields.get("room_announced") is True,
        )
    return ApiError(status_code, detail)


def _number(value: object, default: float, low: float, high: float) -> float:
    """``value`` when it is a number in [low, high] (not a bool), else ``default``."""
    if isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high:
        return value
    return default


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
