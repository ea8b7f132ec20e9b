"""``@task`` and :class:`Task`: a function plus how its runs behave (key, retries, timeout).

A task is still its function: calling it calls the function. Workers run its runs;
submitting (``.delay()``, ``.map()``) sends runs of it to the server.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Final, Generic, ParamSpec, TypeVar, overload

import attrs

P = ParamSpec("P")
R = TypeVar("R")

SERIALIZER_NAMES: Final = ("json", "pickle")

#: Decides whether a failed attempt should be retried: ``(task, task_run, exception) -> bool``.
RetryCondition = Callable[["Task[..., Any]", Any, BaseException], bool]


def default_key(fn: Callable[..., object]) -> str:
    """``module.qualname``: stable across processes that import the same code."""
    return f"{fn.__module__}.{fn.__qualname__}"


def _check_delays(value: float | Sequence[float]) -> float | tuple[float, ...]:
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("retry_delay_seconds must be >= 0")
        return float(value)
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
        timeout_seconds: an attempt that runs longer fails with ``TimeoutError``.
        serializer: ``"json"`` (default; parameters and result structured by the
            annotations) or ``"pickle"`` (any Python objects; workers must opt in).
    """

    fn: Callable[P, R]
    key: str
    name: str
    retries: int = 0
    retry_delay_seconds: float | tuple[float, ...] = attrs.field(default=0.0, converter=_check_delays)
    retry_condition_fn: RetryCondition | None = None
    timeout_seconds: float | None = None
    serializer: str = "json"

    def __attrs_post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"@task needs a function, got {self.fn!r}")
        if not self.key:
            raise ValueError("a task key must be a non-empty string")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.timeout_seconds is not None and self.timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be > 0")
        if self.serializer not in SERIALIZER_NAMES:
            raise ValueError(f"serializer must be one of {SERIALIZER_NAMES}, got {self.serializer!r}")

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.fn)

    def retry_delay(self, retry_number: int) -> float:
        """Seconds to wait before retry ``retry_number`` (1-based)."""
        delays = self.retry_delay_seconds
        if isinstance(delays, float):
            return delays
        return delays[min(retry_number, len(delays)) - 1]

    def with_options(self, **options: Any) -> Task[P, R]:
        """A copy with some options changed, e.g. ``say.with_options(retries=3)``."""
        return attrs.evolve(self, **options)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.key!r}>"


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
    serializer: str = "json",
) -> Callable[[Callable[P, R]], Task[P, R]]: ...
def task(
    fn: Callable[P, R] | None = None,
    /,
    *,
    key: str | None = None,
    name: str | None = None,
    retries: int = 0,
    retry_delay_seconds: float | Sequence[float] = 0.0,
    retry_condition_fn: RetryCondition | None = None,
    timeout_seconds: float | None = None,
    serializer: str = "json",
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Mark a function (sync or async) as a task: ``@task`` or ``@task(retries=3, ...)``."""

    def wrap(f: Callable[P, R]) -> Task[P, R]:
        if isinstance(f, Task):
            raise TypeError(f"{f!r} is already a task")
        return Task(
            fn=f,
            key=key or default_key(f),
            name=name or str(getattr(f, "__name__", "task")),
            retries=retries,
            retry_delay_seconds=retry_delay_seconds,
            retry_condition_fn=retry_condition_fn,
            timeout_seconds=timeout_seconds,
            serializer=serializer,
        )

    return wrap if fn is None else wrap(fn)
