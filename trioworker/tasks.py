"""``@task`` and :class:`Task`: a function plus how its runs behave (key, retries, timeout).

A task is still its function: calling it calls the function. Workers run its runs;
submitting (``.delay()``, ``.map()``) sends runs of it to the server.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, ParamSpec, TypeVar, overload

import attrs

from trioworker import serializers
from trioworker.client.futures import SyncTaskRunFuture, TaskRunFuture
from trioworker.client.rest import using_client, using_sync_client
from trioworker.client.submission import batches, build_create, join_group, map_calls
from trioworker.models import JSON
from trioworker.protocol import SERIALIZER_JSON, SERIALIZERS

P = ParamSpec("P")
R = TypeVar("R")


#: Decides whether a failed attempt should be retried: ``(task, task_run, exception) -> bool``.
RetryCondition = Callable[["Task[..., Any]", Any, BaseException], bool]


def default_key(fn: Callable[..., object]) -> str:
    """``module.qualname``: stable across processes that import the same code.

    A script run as ``python app.py`` is the module ``__main__`` there, but ``app`` in a
    worker that loads ``app.py:say``: the script's file name stands in for ``__main__``.
    """
    module = fn.__module__
    if module == "__main__":
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if main_file:
            module = Path(main_file).stem
    return f"{module}.{fn.__qualname__}"


def is_async_callable(fn: object) -> bool:
    """``fn`` returns a coroutine when called: an ``async def`` function, a partial of one,
    or an object whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = None if inspect.isroutine(fn) else inspect.getattr_static(type(fn), "__call__", None)
    return inspect.iscoroutinefunction(call)


def _check_delays(value: float | Sequence[float]) -> float | tuple[float, ...]:
    if (
        callable(value)
        or isinstance(value, str | bytes | bool)
        or not isinstance(value, int | float | Iterable)
    ):
        raise TypeError(
            f"retry_delay_seconds must be a number or a list of numbers, got {type(value).__name__}"
        )
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("retry_delay_seconds must be >= 0")
        return float(value)
    if any(isinstance(v, str | bytes | bool) or not isinstance(v, int | float) for v in value):
        raise TypeError("retry_delay_seconds must be a number or a list of numbers")
    delays = tuple(float(v) for v in value)
    if not delays or any(d < 0 for d in delays):
        raise ValueError("retry_delay_seconds must be a number or a non-empty list of numbers >= 0")
    return delays


@attrs.frozen(eq=False)
class Task(Generic[P, R]):
    """A function that trioworker can run in the background.

    Build it with :func:`task`. Its options:

    Attributes:
        fn: the function (sync or async).
        key: what workers subscribe to; runs carry it. Default ``module.qualname``.
        name: a readable name for runs (default the function's name).
        retries: how many times a failed attempt is tried again.
        retry_delay_seconds: the wait before each retry: a number, or a list (one per
            retry; the last repeats).
        retry_condition_fn: ``(task, task_run, exception) -> bool``; False means fail now.
            A plain function: an async one is refused (TypeError).
        timeout_seconds: an attempt that runs longer fails with ``TimeoutError``.
        serializer: ``"json"`` (default; parameters and result structured by the
            annotations) or ``"pickle"`` (any Python objects; workers must opt in).
    """

    #: Typed loosely: for an async function R is what its coroutine returns.
    fn: Callable[P, Any]
    key: str
    name: str
    retries: int = 0
    retry_delay_seconds: float | tuple[float, ...] = attrs.field(default=0.0, converter=_check_delays)
    retry_condition_fn: RetryCondition | None = None
    timeout_seconds: float | None = None
    serializer: str = SERIALIZER_JSON

    def __attrs_post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"@task needs a function, got {self.fn!r}")
        if not self.key:
            raise ValueError("a task key must be a non-empty string")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.timeout_seconds is not None and self.timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be > 0")
        if self.serializer not in SERIALIZERS:
            raise ValueError(f"serializer must be one of {SERIALIZERS}, got {self.serializer!r}")
        if inspect.isasyncgenfunction(self.fn) or inspect.isgeneratorfunction(self.fn):
            raise TypeError(f"@task needs a function that returns its result, not a generator: {self.name}")
        if self.retry_condition_fn is not None:
            if not callable(self.retry_condition_fn):
                raise TypeError(
                    f"retry_condition_fn must be callable, got {type(self.retry_condition_fn).__name__}"
                )
            if is_async_callable(self.retry_condition_fn):
                raise TypeError(
                    "retry_condition_fn must be a plain function returning a bool, not async: "
                    "it is called in the worker's event loop and must not wait"
                )

    @property
    def task_key(self) -> str:
        """The task key, by Prefect's name for it (``Task.task_key`` there); the same as
        :attr:`key`, read-only."""
        return self.key

    @property
    def is_async(self) -> bool:
        return is_async_callable(self.fn)

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.fn)

    def retry_delay(self, retry_number: int) -> float:
        """Seconds to wait before retry ``retry_number`` (1-based)."""
        delays = self.retry_delay_seconds
        if isinstance(delays, float):
            return delays
        return delays[min(retry_number, len(delays)) - 1]

    def load_result(self, data: JSON) -> R:
        """A json result structured by the return annotation (what a future gives back).

        Raises :class:`trioworker.serializers.Unreadable` when ``data`` does not fit it.
        """
        return serializers.load_result(self.fn, data)  # type: ignore[no-any-return]

    def with_options(self, **options: Any) -> Task[P, R]:
        """A copy with some options changed, e.g. ``say.with_options(retries=3)``."""
        return attrs.evolve(self, **options)

    # -- submitting from Trio
    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskRunFuture[R]:
        """Submit a run with these arguments; returns its future at once.

        Raises the call's own TypeError for arguments that do not fit the signature, and a
        TypeError naming the parameter for a value that would not arrive as it is (see the
        README's *Parameters and results*).
        """
        return await self.apply_async(args, kwargs)

    async def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        wait_for: Iterable[Any] = (),
        scheduled_time: datetime | None = None,
        idempotency_key: str | None = None,
        name: str | None = None,
        detached: bool = False,
    ) -> TaskRunFuture[R]:
        """Submit a run, with everything :meth:`delay` cannot say.

        Args:
            wait_for: futures (or run ids) that must complete before this run starts; if
                one fails, this run fails without starting. Futures among the arguments
                are waited for too, and replaced by their results.
            scheduled_time: not delivered before this time (a naive one is local time).
            idempotency_key: a second submission with the same key gives the same run.
            detached: fire and forget: submitted from inside a task, the run is still that
                run's child, but cancelling the parent leaves it (and its own children)
                alone; in a run group's block, it joins no group.
        """
        create = build_create(
            self,
            args,
            kwargs or {},
            wait_for=wait_for,
            scheduled_time=scheduled_time,
            idempotency_key=idempotency_key,
            name=name,
            detached=detached,
        )
        async with using_client() as client:
            run = await client.create_task_run(create)
        future = TaskRunFuture(run.id, self, run)
        join_group([create], [future])
        return future

    async def map(self, *args: Any, **kwargs: Any) -> list[TaskRunFuture[R]]:
        """Submit one run per item of the iterable arguments, in batches; futures in order.

        ``say.map(["a", "b"], loud=True)`` submits ``say("a", loud=True)`` and
        ``say("b", loud=True)``. Wrap a list in :class:`~trioworker.unmapped` to pass it whole.
        """
        creates = [build_create(self, a, k) for a, k in map_calls(args, kwargs)]
        futures: list[TaskRunFuture[R]] = []
        async with using_client() as client:
            for batch in batches(creates):
                made = [TaskRunFuture(run.id, self, run) for run in await client.create_task_runs(batch)]
                join_group(batch, made)
                futures += made
        return futures

    @property
    def sync(self) -> SyncSubmitter[P, R]:
        """The blocking twins, for plain code: ``say.sync.delay("hi").result()``."""
        return SyncSubmitter(self)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Call the function itself, here (for an async task: a coroutine to await)."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.key!r}>"


@attrs.frozen
class SyncSubmitter(Generic[P, R]):
    """Blocking twins of :meth:`Task.delay`, :meth:`Task.apply_async` and :meth:`Task.map`.

    They use ``httpx.Client`` and start no event loop: call them from scripts, threads,
    Flask or Django views. They return :class:`~trioworker.SyncTaskRunFuture` objects.
    """

    task: Task[P, R]

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> SyncTaskRunFuture[R]:
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        wait_for: Iterable[Any] = (),
        scheduled_time: datetime | None = None,
        idempotency_key: str | None = None,
        name: str | None = None,
        detached: bool = False,
    ) -> SyncTaskRunFuture[R]:
        create = build_create(
            self.task,
            args,
            kwargs or {},
            wait_for=wait_for,
            scheduled_time=scheduled_time,
            idempotency_key=idempotency_key,
            name=name,
            detached=detached,
        )
        with using_sync_client() as client:
            run = client.create_task_run(create)
        future = SyncTaskRunFuture(run.id, self.task, run)
        join_group([create], [future])
        return future

    def map(self, *args: Any, **kwargs: Any) -> list[SyncTaskRunFuture[R]]:
        creates = [build_create(self.task, a, k) for a, k in map_calls(args, kwargs)]
        futures: list[SyncTaskRunFuture[R]] = []
        with using_sync_client() as client:
            for batch in batches(creates):
                made = [SyncTaskRunFuture(run.id, self.task, run) for run in client.create_task_runs(batch)]
                join_group(batch, made)
                futures += made
        return futures


def _make_task(fn: Callable[..., Any], options: dict[str, Any]) -> Task[..., Any]:
    if isinstance(fn, Task):
        raise TypeError(f"{fn!r} is already a task")
    if not callable(fn):
        raise TypeError(f"@task needs a function, got {fn!r}")
    return Task(
        fn=fn,
        key=options.get("key") or default_key(fn),
        name=options.get("name") or str(getattr(fn, "__name__", "task")),
        retries=options.get("retries", 0),
        retry_delay_seconds=options.get("retry_delay_seconds", 0.0),
        retry_condition_fn=options.get("retry_condition_fn"),
        timeout_seconds=options.get("timeout_seconds"),
        serializer=options.get("serializer", SERIALIZER_JSON),
    )


@attrs.frozen
class TaskDecorator:
    """What ``@task(...)`` with options returns: apply it to a sync or async function."""

    options: dict[str, Any]

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    def __call__(self, fn: Callable[..., Any], /) -> Task[..., Any]:
        return _make_task(fn, self.options)


@overload
def task(fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...
@overload
def task(
    *,
    key: str | None = None,
    name: str | None = None,
    retries: int = 0,
    retry_delay_seconds: float | Sequence[float] = 0.0,
    retry_condition_fn: RetryCondition | None = None,
    timeout_seconds: float | None = None,
    serializer: str = SERIALIZER_JSON,
) -> TaskDecorator: ...
def task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    key: str | None = None,
    name: str | None = None,
    retries: int = 0,
    retry_delay_seconds: float | Sequence[float] = 0.0,
    retry_condition_fn: RetryCondition | None = None,
    timeout_seconds: float | None = None,
    serializer: str = SERIALIZER_JSON,
) -> Task[..., Any] | TaskDecorator:
    """Mark a function (sync or async) as a task: ``@task`` or ``@task(retries=3, ...)``.

    The task's result type is what the function returns (for an async function, what
    its coroutine returns): ``await say.delay(...)`` gives a ``TaskRunFuture`` of it.
    """
    options: dict[str, Any] = {
        "key": key,
        "name": name,
        "retries": retries,
        "retry_delay_seconds": retry_delay_seconds,
        "retry_condition_fn": retry_condition_fn,
        "timeout_seconds": timeout_seconds,
        "serializer": serializer,
    }
    decorator = TaskDecorator(options)
    return decorator if fn is None else decorator(fn)
