"""What a run knows about itself, and what a submitter attaches to the runs it submits.

Both live in ``contextvars``, so they follow Trio tasks and ``trio.to_thread`` calls
without any global state:

- ``with trioworker.tags("billing", "nightly"):`` tags every run submitted inside;
- ``with trioworker.user_context(user="ann"):`` attaches a small JSON object to them;
- inside a running task, :func:`current_run` says which run it is, with those tags and
  that context, and a ``.delay()`` made there records it as the parent run;
- inside ``async with trioworker.open_run_group() as group:`` (or its blocking twin), every
  run submitted joins ``group`` (:func:`current_run_group`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Final, Protocol

import attrs

from trioworker.models import JSON, TaskRun

_tags: Final[ContextVar[tuple[str, ...]]] = ContextVar("trioworker_tags", default=())
_user_context: Final[ContextVar[dict[str, JSON]]] = ContextVar("trioworker_user_context", default={})  # noqa: B039 - never mutated
_current_run: Final[ContextVar[RunContext | None]] = ContextVar("trioworker_current_run", default=None)
_run_group: Final[ContextVar[RunGroupScope | None]] = ContextVar("trioworker_run_group", default=None)


class RunGroupScope(Protocol):
    """What the block of a run group offers the submissions made inside it (the groups of
    :mod:`trioworker.client.groups` are such scopes)."""

    @property
    def id(self) -> uuid.UUID:
        """The group's id: the runs submitted in the block carry it."""
        ...

    def admit(self) -> uuid.UUID:
        """The group's id for a run about to be submitted.

        Raises:
            RuntimeError: the block has ended (a group takes no runs after its block, as a
                Trio nursery takes no tasks once closed).
        """
        ...

    def joined(self, futures: Sequence[object]) -> None:
        """The runs of these futures were created in the group (futures of either kind,
        ``TaskRunFuture`` or ``SyncTaskRunFuture``, from any thread)."""
        ...


@attrs.frozen
class RunContext:
    """The run a task is executing right now (see :func:`current_run`)."""

    task_run_id: uuid.UUID
    task_key: str
    name: str
    #: 1 for the first attempt, 2 for the first retry, ...
    attempt: int
    tags: tuple[str, ...]
    context: dict[str, JSON]
    parent_task_run_id: uuid.UUID | None

    @classmethod
    def of(cls, run: TaskRun) -> RunContext:
        return cls(
            task_run_id=run.id,
            task_key=run.task_key,
            name=run.name,
            attempt=run.run_count + 1,
            tags=tuple(run.tags),
            context=dict(run.context),
            parent_task_run_id=run.parent_task_run_id,
        )


def current_run() -> RunContext | None:
    """The run being executed by the calling code, or None outside a task run."""
    return _current_run.get()


@contextmanager
def running(run: TaskRun) -> Iterator[RunContext]:
    """Mark the calling context as executing ``run`` (the engine does this)."""
    ctx = RunContext.of(run)
    token = _current_run.set(ctx)
    tags_token = _tags.set(ctx.tags)
    context_token = _user_context.set(ctx.context)
    try:
        yield ctx
    finally:
        _user_context.reset(context_token)
        _tags.reset(tags_token)
        _current_run.reset(token)


@contextmanager
def tags(*names: str) -> Iterator[tuple[str, ...]]:
    """Tag the runs submitted inside the block (added to any tags already in effect)."""
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"tags are non-empty strings, got {name!r}")
    combined = tuple(dict.fromkeys((*_tags.get(), *names)))
    token = _tags.set(combined)
    try:
        yield combined
    finally:
        _tags.reset(token)


@contextmanager
def user_context(**values: JSON) -> Iterator[dict[str, JSON]]:
    """Attach ``values`` (JSON) to the runs submitted inside the block; runs read them back
    as ``current_run().context``. Nested blocks merge, the inner value winning."""
    merged = {**_user_context.get(), **values}
    token = _user_context.set(merged)
    try:
        yield merged
    finally:
        _user_context.reset(token)


def submission_context() -> tuple[list[str], dict[str, JSON], uuid.UUID | None]:
    """``(tags, user context, parent run id)`` for a run submitted from here."""
    run = _current_run.get()
    return list(_tags.get()), dict(_user_context.get()), None if run is None else run.task_run_id


def current_run_group() -> RunGroupScope | None:
    """The run group whose block the calling code is in (None: none)."""
    return _run_group.get()


@contextmanager
def in_run_group(group: RunGroupScope) -> Iterator[RunGroupScope]:
    """Make ``group`` the one the runs submitted inside the block join (the groups do this)."""
    token = _run_group.set(group)
    try:
        yield group
    finally:
        _run_group.reset(token)
