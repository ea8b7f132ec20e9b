"""``@task`` and :class:`Task`: a function plus how its runs behave (key, retries, timeout).

A task is still its function: calling it calls the function. Workers run its runs;
submitting (``.delay()``, ``.map()``) sends runs of it to the server.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import random
import string
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeAlias, TypeVar, overload

import attrs

from trioworker import serializers
from trioworker.cache_policies import NO_CACHE, CacheContext, CacheKeyFnPolicy, CachePolicy, check_key
from trioworker.client.futures import SyncTaskRunFuture, TaskRunFuture
from trioworker.client.rest import using_client, using_sync_client
from trioworker.client.submission import batches, build_create, join_group, map_calls
from trioworker.models import JSON
from trioworker.protocol import SERIALIZER_JSON, SERIALIZERS
from trioworker.schedules import Cron, Interval, ScheduleSpec, as_specs

if TYPE_CHECKING:
    from trioworker.models import State, TaskRun

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("trioworker.tasks")

#: Decides whether a failed attempt should be retried: ``(task, task_run, exception) -> bool``.
RetryCondition = Callable[["Task[..., Any]", Any, BaseException], bool]

#: A state hook: ``(task, task_run, state)``, a plain or an async function (Prefect's
#: ``StateHookCallable``); what it returns is ignored.
StateHook: TypeAlias = Callable[["Task[..., Any]", "TaskRun", "State"], "Awaitable[None] | None"]

#: How runs are named: a template over the parameters (``"{customer}-{day}"``), or a
#: function of no argument or of ``parameters`` (a dict by parameter name).
TaskRunName: TypeAlias = "str | Callable[..., str]"

#: A cache key function, Prefect's shape: ``(context, parameters) -> str | None``.
CacheKeyFn: TypeAlias = Callable[[CacheContext, dict[str, Any]], "str | None"]


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


def _check_tags(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"tags must be a list of strings, got {type(value).__name__}")
    tags = tuple(value)
    for tag in tags:
        if not isinstance(tag, str) or not tag or "\x00" in tag:
            raise TypeError(f"tags are non-empty strings without NUL, got {tag!r}")
    return tuple(dict.fromkeys(tags))


def _check_hooks(value: Iterable[StateHook] | None) -> tuple[StateHook, ...]:
    if value is None:
        return ()
    if callable(value) or not isinstance(value, Iterable):
        raise TypeError(f"state hooks are given as a list of functions, got {type(value).__name__}")
    hooks = tuple(value)
    for hook in hooks:
        if not callable(hook):
            raise TypeError(f"a state hook must be callable, got {hook!r}")
    return hooks


def _check_expiration(value: timedelta | float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"cache_expiration must be a timedelta or a number of seconds >= 0, got {value!r}")
    return float(value)


def _check_jitter(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"retry_jitter_factor must be a number >= 0, got {value!r}")
    return float(value)


def jittered(delay: float, factor: float | None, rng: random.Random | None = None) -> float:
    """``delay`` spread by ``factor`` as Prefect's ``retry_jitter_factor`` spreads a retry
    delay (``prefect.utilities.math.clamped_poisson_interval``): a draw from the
    exponential distribution whose mean is ``delay``, kept between ``delay * (1 + factor)``
    at most and a lower bound chosen so that the draws still average about ``delay``. A
    factor of 0 or None, or a delay of 0, leaves it as it is.
    """
    if not factor or delay <= 0:
        return delay
    high = 1.0 + factor
    # The lower bound that leaves as much of the distribution between it and the median
    # as between the median and the upper bound (0 once that is too small to matter).
    low = 0.0 if high >= 50 else math.log2(2**high / (2**high - 1))
    # Inverse CDF of the exponential distribution with mean 1, over [low, high] only.
    p = (rng or random).uniform(1 - math.exp(-low), 1 - math.exp(-high))
    return -delay * math.log(max(1 - p, 1e-10))


def _template_fields(template: str) -> list[str]:
    """The parameter names a run name template reads (``{customer.id}`` reads ``customer``).

    Raises ValueError for a template that ``str.format`` cannot parse, or with a
    positional field (``{}``, ``{0}``).
    """
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"task_run_name {template!r} is not a template str.format reads: {exc}") from None
    for _, field, _, _ in parsed:
        if field is None:
            continue
        root = field.split(".", 1)[0].split("[", 1)[0]
        if not root or root.isdigit():
            raise ValueError(f"task_run_name {template!r}: name the parameter in each field, as {{customer}}")
        names.append(root)
    return names


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
        tags: tags every run of the task carries, after those of ``trioworker.tags()``
            blocks around the submission (as Prefect combines them).
        task_run_name: how runs are named: a template over the parameters
            (``"{customer}-{day}"``, read by ``str.format``), or a function of no argument
            or of ``parameters`` (a dict by parameter name) returning a str. Checked at
            decoration (a field that names no parameter is a ValueError) and formatted at
            submit (an error there raises, nothing is submitted). Default
            ``<task key>-<id's first 8 hex digits>``.
        retry_jitter_factor: spreads each retry delay at random as Prefect does (see
            :func:`jittered`): at most ``delay * (1 + factor)``, about ``delay`` on average.
        cache_policy: how runs get a cache key (:mod:`trioworker.cache_policies`, e.g.
            ``INPUTS``); default no caching.
        cache_key_fn: ``(context, parameters) -> str | None``, the key of a run (it wins
            over ``cache_policy``).
        cache_expiration: how long a result is reused once its run completed (a timedelta
            or seconds; None: until that run is deleted).
        refresh_cache: runs ignore the cache: they run, and their result replaces it.
        on_completion, on_failure, on_cancellation: state hooks, ``(task, task_run,
            state)``, plain or async, called in order on the worker once the run's end is
            accepted by the server: COMPLETED, FAILED (not a retry), CANCELLED. A hook that
            raises is logged and changes nothing.
        schedule: periodic runs, registered by the workers that serve the task:
            :class:`~trioworker.Cron`, :class:`~trioworker.Interval`, a cron expression (UTC),
            a ``timedelta`` or seconds, or a list of them.
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
    tags: tuple[str, ...] = attrs.field(default=(), converter=_check_tags)
    task_run_name: TaskRunName | None = None
    retry_jitter_factor: float | None = attrs.field(default=None, converter=_check_jitter)
    cache_policy: CachePolicy = NO_CACHE
    cache_key_fn: CacheKeyFn | None = None
    cache_expiration: float | None = attrs.field(default=None, converter=_check_expiration)
    refresh_cache: bool = False
    on_completion: tuple[StateHook, ...] = attrs.field(default=(), converter=_check_hooks)
    on_failure: tuple[StateHook, ...] = attrs.field(default=(), converter=_check_hooks)
    on_cancellation: tuple[StateHook, ...] = attrs.field(default=(), converter=_check_hooks)
    #: Periodic runs (see :mod:`trioworker.schedules`): a worker that serves the task
    #: registers them with the server when it starts.
    schedule: tuple[Cron | Interval, ...] = attrs.field(default=(), converter=as_specs)

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
        self._check_run_name()
        if not isinstance(self.cache_policy, CachePolicy):
            raise TypeError(
                f"cache_policy must be a trioworker.cache_policies policy (such as INPUTS), "
                f"got {self.cache_policy!r}"
            )
        if self.cache_key_fn is not None and not callable(self.cache_key_fn):
            raise TypeError(f"cache_key_fn must be callable, got {type(self.cache_key_fn).__name__}")
        if self.cache_key_fn is not None and is_async_callable(self.cache_key_fn):
            raise TypeError("cache_key_fn must be a plain function returning a str or None, not async")
        if not isinstance(self.refresh_cache, bool):
            raise TypeError(f"refresh_cache must be a bool, got {type(self.refresh_cache).__name__}")
        for spec in self.schedule:  # (encoded when a worker registers them, annotations resolved)
            try:
                self.signature.bind(*spec.args, **spec.kwargs)
            except TypeError as exc:
                raise TypeError(f"task {self.key}: a schedule's arguments do not fit: {exc}") from None

    def _check_run_name(self) -> None:
        name = self.task_run_name
        if name is None or callable(name):
            return
        if not isinstance(name, str):
            raise TypeError(f"task_run_name must be a str or a function, got {type(name).__name__}")
        params = self.signature.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for field in _template_fields(name):
            if field not in params and not takes_any:
                raise ValueError(
                    f"task_run_name {name!r} of {self.name}: {{{field}}} is not a parameter "
                    f"(the parameters are {', '.join(params) or 'none'})"
                )

    @property
    def effective_cache_policy(self) -> CachePolicy:
        """The policy that keys runs: ``cache_key_fn``'s when there is one (Prefect does
        the same, with a warning, when both are given), else ``cache_policy``."""
        if self.cache_key_fn is not None:
            return CacheKeyFnPolicy(self.cache_key_fn)
        return self.cache_policy

    def cache_key(self, parameters: Mapping[str, Any], sent: Mapping[str, JSON]) -> str | None:
        """The cache key of a run with ``parameters`` (by name, defaults filled in) sent as
        ``sent`` (see :class:`~trioworker.cache_policies.CacheContext`), by
        :attr:`effective_cache_policy`; None: no caching.

        Raises:
            ValueError: the key is empty, longer than 1000 characters or holds NUL.
            TypeError: a ``cache_key_fn`` returned something else than a str or None.
        """
        if self.cache_key_fn is None and self.cache_policy is NO_CACHE:
            return None  # the default: no context to build, nothing to hash
        key = self.effective_cache_policy.compute_key(CacheContext(self, sent), parameters)
        return None if key is None else check_key(self.key, key)

    def run_name(self, parameters: Mapping[str, Any]) -> str | None:
        """The name of a run with ``parameters`` (by parameter name, defaults filled in)
        by :attr:`task_run_name`, or None when the task has none.

        Raises:
            ValueError: the template cannot be formatted with them (one line naming the
                task and the template).
            TypeError: the function returned something else than a non-empty str.
        """
        name = self.task_run_name
        if name is None:
            return None
        if isinstance(name, str):
            try:
                text = name.format(**parameters)
            except Exception as exc:
                raise ValueError(
                    f"task {self.key}: task_run_name {name!r} cannot be formatted with the "
                    f"arguments ({type(exc).__name__}: {exc})"
                ) from None
        else:
            takes_parameters = "parameters" in inspect.signature(name).parameters
            text = name(parameters=dict(parameters)) if takes_parameters else name()
        if not isinstance(text, str) or not text:
            raise TypeError(f"task {self.key}: task_run_name returned {text!r}, not a non-empty str")
        return text

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

    def retry_delay(self, retry_number: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry ``retry_number`` (1-based): by
        ``retry_delay_seconds``, spread by ``retry_jitter_factor`` (see :func:`jittered`)."""
        delays = self.retry_delay_seconds
        delay = delays if isinstance(delays, float) else delays[min(retry_number, len(delays)) - 1]
        return jittered(delay, self.retry_jitter_factor, rng)

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
    given = {
        name: value for name, value in options.items() if value is not None and name not in ("key", "name")
    }
    if options.get("cache_key_fn") is not None and options.get("cache_policy") is not None:
        log.warning(
            "both cache_policy and cache_key_fn are set on task %s: cache_key_fn is used", default_key(fn)
        )
    return Task(
        fn=fn,
        key=options.get("key") or default_key(fn),
        name=options.get("name") or str(getattr(fn, "__name__", "task")),
        **given,
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
    tags: Iterable[str] | None = None,
    task_run_name: TaskRunName | None = None,
    retry_jitter_factor: float | None = None,
    cache_policy: CachePolicy | None = None,
    cache_key_fn: CacheKeyFn | None = None,
    cache_expiration: timedelta | float | None = None,
    refresh_cache: bool | None = None,
    on_completion: Iterable[StateHook] | None = None,
    on_failure: Iterable[StateHook] | None = None,
    on_cancellation: Iterable[StateHook] | None = None,
    schedule: ScheduleSpec | Sequence[ScheduleSpec] | None = None,
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
    tags: Iterable[str] | None = None,
    task_run_name: TaskRunName | None = None,
    retry_jitter_factor: float | None = None,
    cache_policy: CachePolicy | None = None,
    cache_key_fn: CacheKeyFn | None = None,
    cache_expiration: timedelta | float | None = None,
    refresh_cache: bool | None = None,
    on_completion: Iterable[StateHook] | None = None,
    on_failure: Iterable[StateHook] | None = None,
    on_cancellation: Iterable[StateHook] | None = None,
    schedule: ScheduleSpec | Sequence[ScheduleSpec] | None = None,
) -> Task[..., Any] | TaskDecorator:
    """Mark a function (sync or async) as a task: ``@task`` or ``@task(retries=3, ...)``.

    The task's result type is what the function returns (for an async function, what
    its coroutine returns): ``await say.delay(...)`` gives a ``TaskRunFuture`` of it.
    The options are :class:`Task`'s attributes (Prefect's names and meanings).
    """
    options: dict[str, Any] = {
        "key": key,
        "name": name,
        "retries": retries,
        "retry_delay_seconds": retry_delay_seconds,
        "retry_condition_fn": retry_condition_fn,
        "timeout_seconds": timeout_seconds,
        "serializer": serializer,
        "tags": tags,
        "task_run_name": task_run_name,
        "retry_jitter_factor": retry_jitter_factor,
        "cache_policy": cache_policy,
        "cache_key_fn": cache_key_fn,
        "cache_expiration": cache_expiration,
        "refresh_cache": refresh_cache,
        "on_completion": on_completion,
        "on_failure": on_failure,
        "on_cancellation": on_cancellation,
        "schedule": schedule,
    }
    decorator = TaskDecorator(options)
    return decorator if fn is None else decorator(fn)
