"""Turning a call into a run: binding arguments, futures as arguments, batches for ``map``.

Arguments are bound to the task's signature at submit time, so a missing, duplicate or
unexpected argument raises the same TypeError the call would, here and now, not on a
worker later. So does a value that would not arrive as it is (see
:func:`trioworker.serializers.dump_value`): the TypeError names the task and the
parameter. A future passed as an argument becomes a placeholder plus a ``wait_for``
entry: the server holds the run until that run completed, and the worker puts its result
in the placeholder's place.

Inside the block of a run group (:mod:`trioworker.client.groups`), a run records the
group's id and, once created, its future joins the group (:func:`join_group`); a
detached run joins no group.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Generic, Protocol, TypeVar

import attrs

from trioworker import serializers
from trioworker.client.futures import _FutureBase
from trioworker.context import current_run_group, submission_context
from trioworker.models import TaskRunCreate
from trioworker.protocol import SERIALIZER_PICKLE
from trioworker.serializers import FUTURE_KEY, FutureRef

T = TypeVar("T")

#: Runs per request when submitting many (one request per batch, not per run).
BATCH_SIZE: Final = 500

Parameter = inspect.Parameter


class TaskSpec(Protocol):
    """What a submission needs of a task (a :class:`trioworker.Task` is one)."""

    @property
    def fn(self) -> Callable[..., Any]:
        """The function: its signature binds the arguments, its annotations type them."""
        ...

    @property
    def key(self) -> str: ...

    @property
    def serializer(self) -> str: ...

    @property
    def tags(self) -> tuple[str, ...]:
        """Tags every run carries, after the submitter's."""
        ...

    @property
    def cache_expiration(self) -> float | None: ...

    @property
    def refresh_cache(self) -> bool: ...

    def run_name(self, parameters: Mapping[str, Any]) -> str | None:
        """The name of a run with these arguments, or None for the server's default."""
        ...

    def cache_key(self, parameters: Mapping[str, Any], sent: Mapping[str, Any]) -> str | None:
        """The cache key of a run with these arguments (sent as ``sent``), or None."""
        ...


@attrs.frozen
class unmapped(Generic[T]):
    """Pass a value whole to every run of a ``map`` (a list that is not to be mapped over)."""

    value: T


def _placeholder(value: Any, serializer: str, wait_for: list[uuid.UUID]) -> Any:
    if isinstance(value, _FutureBase):
        wait_for.append(value.task_run_id)
        if serializer == SERIALIZER_PICKLE:
            return FutureRef(value.task_run_id)
        return {FUTURE_KEY: str(value.task_run_id)}
    return value


def build_create(
    task: TaskSpec,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    wait_for: Iterable[_FutureBase[Any] | uuid.UUID] = (),
    scheduled_time: datetime | None = None,
    idempotency_key: str | None = None,
    name: str | None = None,
    detached: bool = False,
) -> TaskRunCreate:
    """The create request for one run of ``task`` with these arguments, with a fresh ``id``.

    Raises TypeError for arguments that do not fit the signature, for a value that would
    not arrive on the worker as it is (json), and for a ``scheduled_time`` that is not a
    datetime. A naive ``scheduled_time`` is local time, as ``datetime.timestamp()`` reads it.

    The run is named by ``name``, else by the task's ``task_run_name`` (a ValueError or
    TypeError naming the task when it cannot be made); its tags are the submitter's
    (``trioworker.tags()``) then the task's; its cache key is the task's cache policy's (a
    ValueError for a key the server would refuse).
    In the block of a run group, the run is the group's (unless ``detached``); a group
    whose block has ended raises RuntimeError.
    """
    if not isinstance(detached, bool):
        raise TypeError(f"detached must be True or False, got {detached!r}")
    if scheduled_time is not None:
        if not isinstance(scheduled_time, datetime):
            raise TypeError(f"scheduled_time must be a datetime, got {type(scheduled_time).__name__}")
        scheduled_time = scheduled_time.astimezone(UTC)  # naive: local time
    bound = serializers.bind(task.fn, tuple(args), dict(kwargs))
    arguments = dict(bound.arguments)  # as the call gave them (futures included)
    if name is None:
        name = task.run_name(arguments)
    deps: list[uuid.UUID] = [
        w.task_run_id if isinstance(w, _FutureBase) else uuid.UUID(str(w)) for w in wait_for
    ]
    params = bound.signature.parameters
    for key, value in list(bound.arguments.items()):
        kind = params[key].kind
        if kind is Parameter.VAR_POSITIONAL:
            bound.arguments[key] = tuple(_placeholder(v, task.serializer, deps) for v in value)
        elif kind is Parameter.VAR_KEYWORD:
            bound.arguments[key] = {k: _placeholder(v, task.serializer, deps) for k, v in value.items()}
        else:
            bound.arguments[key] = _placeholder(value, task.serializer, deps)
    if task.serializer == SERIALIZER_PICKLE:
        parameters: Any = _pickled(task, bound)
        sent: Mapping[str, Any] = bound.arguments
    else:
        parameters = sent = serializers.dump_bound(bound, serializers.hints(task.fn), task=task.key)
    cache_key = task.cache_key(arguments, sent)
    tags, context, parent = submission_context()
    group = None if detached else current_run_group()
    return TaskRunCreate(
        task_key=task.key,
        name=name,
        parameters=parameters,
        serializer=task.serializer,
        scheduled_time=scheduled_time,
        idempotency_key=idempotency_key,
        tags=list(dict.fromkeys((*tags, *task.tags))),
        context=context,
        parent_task_run_id=parent,
        wait_for=list(dict.fromkeys(deps)),
        id=uuid.uuid4(),  # chosen here, so that a create whose answer was lost can be sent again
        cache_key=cache_key,
        cache_expiration=None if cache_key is None else task.cache_expiration,
        refresh_cache=cache_key is not None and task.refresh_cache,
        group_id=None if group is None else group.admit(),
        detached=detached,
    )


def join_group(creates: Sequence[TaskRunCreate], futures: Sequence[_FutureBase[Any]]) -> None:
    """The runs of ``futures`` (made by ``creates``, in order) were created: those made in
    the current run group's block join it."""
    group = current_run_group()
    if group is None:
        return
    joined = [f for c, f in zip(creates, futures, strict=True) if c.group_id == group.id]
    if joined:
        group.joined(joined)


def _pickled(task: TaskSpec, bound: inspect.BoundArguments) -> str:
    """The pickled ``(args, kwargs)``; a TypeError naming the parameter that cannot be pickled."""
    try:
        return serializers.pickle_dumps((bound.args, bound.kwargs))
    except Exception as exc:
        for name, value in bound.arguments.items():
            try:
                serializers.pickle_dumps(value)
            except Exception as one:
                raise TypeError(
                    f"task {task.key}, parameter {name!r}: {serializers.short(value)} cannot be pickled "
                    f"({type(one).__name__}: {one})"
                ) from None
        raise TypeError(
            f"task {task.key}: the arguments cannot be pickled ({type(exc).__name__}: {exc})"
        ) from None


def _is_mapped(value: Any) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, str | bytes | bytearray | Mapping | unmapped)


def map_calls(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Iterator[tuple[list[Any], dict[str, Any]]]:
    """The ``(args, kwargs)`` of each run of a map.

    Iterable arguments (lists, tuples, ranges, generators; not strings, bytes or dicts)
    are mapped over, in step; anything else, and anything wrapped in :class:`unmapped`,
    is passed whole to every run.
    """
    mapped_args = [list(a) if _is_mapped(a) else None for a in args]
    mapped_kwargs = {k: list(v) for k, v in kwargs.items() if _is_mapped(v)}
    lengths = {len(a) for a in mapped_args if a is not None} | {len(v) for v in mapped_kwargs.values()}
    if not lengths:
        raise ValueError("map needs at least one iterable argument to map over")
    if len(lengths) > 1:
        raise ValueError(f"map's iterable arguments differ in length: {sorted(lengths)}")
    (count,) = lengths

    def whole(value: Any) -> Any:
        return value.value if isinstance(value, unmapped) else value

    for i in range(count):
        call_args = [whole(a) if m is None else m[i] for a, m in zip(args, mapped_args, strict=True)]
        call_kwargs = {k: mapped_kwargs[k][i] if k in mapped_kwargs else whole(v) for k, v in kwargs.items()}
        yield call_args, call_kwargs


def batches(items: Sequence[T], size: int = BATCH_SIZE) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
