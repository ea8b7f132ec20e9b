"""Cache policies: how a task's runs get the cache key that lets them share one result.

A task that asks for caching (``@task(cache_policy=INPUTS)``, or ``cache_key_fn=...``)
gets a cache key for each run when it is submitted; the server then gives a run whose key
already has a completed, unexpired result that result at once (state ``Cached``, the
function not called), and holds a run whose key is being computed by another run until
that one ends. The names and the algebra are Prefect's (``prefect.cache_policies``):

- :data:`INPUTS`: the run's arguments (by parameter name, as they are sent), so that the
  same task called with the same arguments shares a result. ``INPUTS - "verbose"`` leaves
  a parameter out.
- :data:`TASK_SOURCE`: the task function's source code, so that a changed function does
  not reuse the results of the old one.
- :data:`NO_CACHE` (also :data:`NONE`): no key, no caching (the default).
- ``INPUTS + TASK_SOURCE``: both; a policy made of several keys on all that each gives.
- :class:`CacheKeyFnPolicy`: a function of yours, ``(context, parameters) -> str | None``
  (what ``cache_key_fn=`` builds).

Unlike Prefect, no policy is on unless the task asks for one: Prefect's ``DEFAULT`` also
keys on the flow or task run, which a served task run never shares with another.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import attrs
import orjson

from trioworker import serializers
from trioworker.models import JSON
from trioworker.protocol import MAX_CACHE_KEY_LENGTH, SERIALIZER_PICKLE


class KeyedTask(Protocol):
    """What a policy reads of a task (a :class:`trioworker.Task` is one)."""

    @property
    def fn(self) -> Callable[..., Any]: ...

    @property
    def key(self) -> str: ...

    @property
    def serializer(self) -> str: ...


@attrs.frozen
class CacheContext:
    """What a cache policy knows when it computes a key: the task being submitted (the
    counterpart of Prefect's ``TaskRunContext``, of which a key function reads ``task``)."""

    task: KeyedTask
    #: The arguments by parameter name as they are sent: JSON values for a json task,
    #: Python values for a pickle task; a future passed as an argument stands there as a
    #: reference to its run.
    sent: Mapping[str, JSON] = attrs.field(factory=dict)


def _digest(*parts: bytes) -> str:
    """A stable key of ``parts``: the hex SHA-256 of their lengths and bytes."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def _check_parameter(parameter: object) -> None:
    if not isinstance(parameter, str):
        raise TypeError(f"only a parameter's name can be left out of a cache policy, got {parameter!r}")


class CachePolicy:
    """How a run's cache key is made. Subclasses implement :meth:`compute_key`; ``+``
    combines policies and ``- "name"`` leaves a parameter out of :data:`INPUTS`."""

    def compute_key(self, context: CacheContext, parameters: Mapping[str, Any]) -> str | None:
        """The cache key of a run of ``context.task`` with ``parameters`` (its arguments by
        parameter name, defaults filled in, as the call gave them), or None for no caching."""
        raise NotImplementedError

    def __add__(self, other: CachePolicy) -> CachePolicy:
        if not isinstance(other, CachePolicy):
            return NotImplemented
        if isinstance(other, _NoCache):
            return self
        if isinstance(self, _NoCache):
            return other
        mine = self.policies if isinstance(self, CompoundCachePolicy) else (self,)
        theirs = other.policies if isinstance(other, CompoundCachePolicy) else (other,)
        return CompoundCachePolicy((*mine, *theirs))

    def __sub__(self, parameter: str) -> CachePolicy:
        """This policy with ``parameter`` left out of its inputs (no change for a policy
        that does not read them)."""
        _check_parameter(parameter)
        return self


@attrs.frozen
class Inputs(CachePolicy):
    """The key of the run's arguments, but those named in ``exclude``. A task without
    arguments (all excluded) gets no key, as in Prefect."""

    exclude: tuple[str, ...] = ()

    def compute_key(self, context: CacheContext, parameters: Mapping[str, Any]) -> str | None:
        kept = {name: value for name, value in parameters.items() if name not in self.exclude}
        if not kept:
            return None
        parts = [(name.encode(), _value_bytes(context, name, kept[name])) for name in sorted(kept)]
        return _digest(*(part for pair in parts for part in pair))

    def __sub__(self, parameter: str) -> CachePolicy:
        _check_parameter(parameter)
        return Inputs((*self.exclude, parameter))


def _value_bytes(context: CacheContext, name: str, value: Any) -> bytes:
    """One argument as bytes that are equal for equal arguments: its JSON as sent, with
    sorted keys (a future passed as an argument counts by its run id), or for a pickle
    task its pickle."""
    sent = context.sent.get(name, value)
    if context.task.serializer == SERIALIZER_PICKLE:
        return serializers.pickle_dumps(sent).encode()
    return orjson.dumps(sent, option=orjson.OPT_SORT_KEYS)


@attrs.frozen
class TaskSource(CachePolicy):
    """The key of the task function's source code (its bytecode when the source cannot be
    read), so that changing the function starts a new cache."""

    def compute_key(self, context: CacheContext, parameters: Mapping[str, Any]) -> str | None:
        fn = context.task.fn
        try:
            source = inspect.getsource(fn).encode()
        except (OSError, TypeError):
            code = getattr(fn, "__code__", None)
            if code is None:
                return None
            source = code.co_code
        return _digest(source)


@attrs.frozen
class CacheKeyFnPolicy(CachePolicy):
    """The key a function of yours gives: ``cache_key_fn(context, parameters)``, a string,
    or None for no caching (Prefect's signature; ``context.task`` is the task)."""

    cache_key_fn: Callable[[CacheContext, dict[str, Any]], str | None]

    def compute_key(self, context: CacheContext, parameters: Mapping[str, Any]) -> str | None:
        key = self.cache_key_fn(context, dict(parameters))
        if key is not None and not isinstance(key, str):
            raise TypeError(
                f"cache_key_fn of {context.task.key} returned {type(key).__name__}, not a str or None"
            )
        return key


@attrs.frozen
class CompoundCachePolicy(CachePolicy):
    """Several policies: the key of the keys they give (None when none gives one)."""

    policies: tuple[CachePolicy, ...]

    def compute_key(self, context: CacheContext, parameters: Mapping[str, Any]) -> str | None:
        keys = [
            key for policy in self.policies if (key := policy.compute_key(context, parameters)) is not None
        ]
        if not keys:
            return None
        return _digest(*(key.encode() for key in keys))

    def __sub__(self, parameter: str) -> CachePolicy:
        _check_parameter(parameter)
        return CompoundCachePolicy(tuple(policy - parameter for policy in self.policies))


@attrs.frozen
class _NoCache(CachePolicy):
    """No key: runs never share a result."""

    def compute_key(self, context: CacheContext, parameters: Mapping[str, Any]) -> str | None:
        return None


#: Same task, same arguments: one result.
INPUTS: Final = Inputs()
#: Same task source code: one result (combine with INPUTS for "same code, same arguments").
TASK_SOURCE: Final = TaskSource()
#: No caching.
NO_CACHE: Final = _NoCache()
#: No caching (Prefect's other name for it).
NONE: Final = NO_CACHE


def check_key(task_key: str, key: str) -> str:
    """``key`` if the server will take it as a cache key, else a ValueError naming the task."""
    if not key or len(key) > MAX_CACHE_KEY_LENGTH or "\x00" in key:
        raise ValueError(
            f"task {task_key}: a cache key must be a non-empty string of at most "
            f"{MAX_CACHE_KEY_LENGTH} characters without NUL, got {key[:50]!r}"
        )
    return key
