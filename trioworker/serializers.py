"""How parameters and results travel: ``json`` (the default) and ``pickle`` (opt-in).

The json serializer dumps each argument by its parameter's annotation with
:data:`value_converter`, and checks at once that structuring the JSON by the same
annotation gives back the same value (:func:`dump_value`): a value that would arrive
changed (a timezone lost, a subclass cut to its base, a type with no JSON form) is refused
with a TypeError at submit, not discovered on the worker (plain JSON in the annotation's
JSON form is sent as it is when it reads as the annotation). The worker structures each value
back by the annotation; anything that cannot be read there becomes one error
(:class:`Unreadable`), which the worker turns into a FAILED run and ``result()`` into
:class:`~trioworker.ResultDecodeError`. A result is dumped and checked the same way, by
the return annotation, on the worker.

Pickle carries any object, and with it the power to run code on the worker: a worker
refuses it unless told otherwise.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import functools
import inspect
import math
import pickle
import re
import reprlib
import types
import typing
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import PurePath
from typing import Any, Final, TypeVar

import attrs
import cattrs
import orjson
from cattrs.cols import is_namedtuple
from cattrs.preconf.orjson import OrjsonConverter

from trioworker.errors import ParameterError
from trioworker.models import JSON, converter

Parameter = inspect.Parameter


class Unreadable(ValueError):
    """A JSON value cannot be read as the type its annotation names (the message says why)."""


# --------------------------------------------------------------------------- the converter


def _make_value_converter() -> OrjsonConverter:
    """The wire converter, with hooks that give back exactly what was dumped.

    It differs from :data:`trioworker.models.converter` (whose times are UTC by protocol):
    a naive datetime stays naive and an aware one keeps its offset; ``time``, ``timedelta``
    and every kind of path travel; an enum or a subclass of ``str``/``int``/``float``
    arrives as itself, not as its base; a NamedTuple's string annotations are resolved;
    ``None`` and an unbound TypeVar are readable annotations.
    """
    conv = converter.copy()

    def read_datetime(value: object, _: object) -> datetime:
        if isinstance(value, datetime):
            return value
        if not isinstance(value, str):
            raise TypeError(f"expected an ISO 8601 date and time, got {type(value).__name__}")
        return datetime.fromisoformat(value)  # naive stays naive, an offset stays as it was

    conv.register_structure_hook(datetime, read_datetime)

    def read_time(value: object, _: object) -> time:
        if isinstance(value, time):  # an upstream's pickled result
            return value
        if not isinstance(value, str):
            raise TypeError(f"expected an ISO 8601 time, got {type(value).__name__}")
        return time.fromisoformat(value)

    conv.register_structure_hook(time, read_time)
    conv.register_unstructure_hook(time, time.isoformat)  # orjson refuses an aware time
    conv.register_structure_hook(timedelta, _read_timedelta)
    conv.register_unstructure_hook(timedelta, _dump_timedelta)

    # Scalars stay strict (5 is not a str), but a subclass (a StrEnum, an IntEnum, a
    # ``class Name(str)``) arrives as itself: the base's hook would catch it otherwise.
    def strict(base: type[Any]) -> None:
        def read(value: object, cls: type[Any]) -> object:
            ok = type(value) is base or (base is float and type(value) is int)
            if not ok:
                raise TypeError(f"expected {cls.__name__}, got {type(value).__name__}")
            return value if cls is base else cls(value)

        conv.register_structure_hook(base, read)

    for scalar in (str, int, float, bool):
        strict(scalar)

    def read_path(value: object, cls: type[PurePath]) -> PurePath:
        if not isinstance(value, str):
            raise TypeError(f"expected a path string, got {type(value).__name__}")
        return cls(value)

    conv.register_structure_hook(PurePath, read_path)
    conv.register_unstructure_hook(PurePath, str)

    def read_enum(value: object, cls: type[enum.Enum]) -> enum.Enum:
        try:
            return cls(value)
        except ValueError:
            for member in cls:  # a value JSON changes (a tuple): match its JSON form
                if orjson.loads(orjson.dumps(conv.unstructure(member.value))) == value:
                    return member
            raise

    conv.register_structure_hook(enum.Enum, read_enum)
    conv.register_unstructure_hook(enum.Enum, lambda member: conv.unstructure(member.value))

    def read_none(value: object, _: object) -> None:
        if value is not None:
            raise TypeError(f"expected null, got {type(value).__name__}")

    conv.register_structure_hook(type(None), read_none)
    conv.register_structure_hook_func(lambda t: isinstance(t, TypeVar), lambda v, _: v)

    # cattrs reads a NamedTuple's raw annotations, which are strings under
    # ``from __future__ import annotations``: resolve them first.
    def namedtuple_hooks(cls: Any) -> tuple[Callable[[Any, Any], Any], Callable[[Any], Any]]:
        hints = typing.get_type_hints(cls)
        fields: tuple[str, ...] = cls._fields

        def read(value: object, _: object) -> Any:
            if not isinstance(value, list | tuple):
                raise TypeError(f"expected an array for {cls.__name__}, got {type(value).__name__}")
            if len(value) > len(fields):
                raise ValueError(f"{cls.__name__} has {len(fields)} fields, got {len(value)} values")
            return cls(*(conv.structure(v, hints.get(f, Any)) for f, v in zip(fields, value, strict=False)))

        def dump(value: Any) -> list[Any]:
            return [conv.unstructure(getattr(value, f), hints.get(f, Any)) for f in fields]

        return read, dump

    conv.register_structure_hook_factory(is_namedtuple, lambda cls: namedtuple_hooks(cls)[0])
    conv.register_unstructure_hook_factory(is_namedtuple, lambda cls: namedtuple_hooks(cls)[1])
    return conv


_TIMEDELTA: Final = re.compile(r"P(-?\d+)DT(\d+)(?:\.(\d{6}))?S")


def _dump_timedelta(value: timedelta) -> str:
    """ISO 8601 duration: ``P<days>DT<seconds>.<microseconds>S`` (days may be negative)."""
    return f"P{value.days}DT{value.seconds}.{value.microseconds:06d}S"


def _read_timedelta(value: object, _: object) -> timedelta:
    if type(value) in (int, float):
        return timedelta(seconds=typing.cast(float, value))
    match = _TIMEDELTA.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"expected a duration like 'P1DT30.000000S' or seconds, got {value!r}")
    days, seconds, micros = match.groups()
    return timedelta(days=int(days), seconds=int(seconds), microseconds=int(micros or 0))


#: (Un)structures parameters and results (see :func:`_make_value_converter`).
value_converter: Final[OrjsonConverter] = _make_value_converter()


# --------------------------------------------------------------------------- annotations


@attrs.frozen
class Unresolved:
    """An annotation that names something not defined where the function lives."""

    annotation: object
    error: str

    def __str__(self) -> str:
        return f"its annotation {self.annotation!r} cannot be resolved ({self.error})"


#: Neither an annotation nor Any: the value must be JSON as it is.
NO_ANNOTATION: Final[Any] = Parameter.empty


@functools.lru_cache(maxsize=1024)
def _signature(fn: Callable[..., object]) -> inspect.Signature:
    """Cached: reading a signature per run cost a worker ~6% of its time."""
    return inspect.signature(fn)


@functools.lru_cache(maxsize=1024)
def hints(fn: Callable[..., object]) -> Mapping[str, Any]:
    """``{parameter name or "return": type}``; an annotation that cannot be resolved (a
    typo, a name imported only under ``TYPE_CHECKING``) is an :class:`Unresolved`, so that
    only the values of that parameter are refused. Cached: resolving costs ~11% of a run.
    """
    try:
        return typing.get_type_hints(fn)
    except Exception:  # resolved one by one below, each failure kept
        pass
    raw: dict[str, object] = dict(getattr(fn, "__annotations__", None) or {})
    namespace = getattr(inspect.unwrap(fn), "__globals__", {})
    out: dict[str, Any] = {}
    for name, annotation in raw.items():
        holder = types.SimpleNamespace(__annotations__={name: annotation})
        try:
            out[name] = typing.get_type_hints(holder, globalns=namespace)[name]
        except Exception as exc:
            out[name] = Unresolved(annotation, f"{type(exc).__name__}: {exc}")
    return out


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "None"
    return hint.__qualname__ if isinstance(hint, type) else repr(hint).replace("typing.", "")


def _is_any(hint: Any) -> bool:
    return hint is NO_ANNOTATION or hint is Any or isinstance(hint, TypeVar)


_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60


def short(value: object) -> str:
    """A repr that fits in an error message."""
    try:
        return _short.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


# --------------------------------------------------------------------------- reading and dumping


def read_value(data: JSON, hint: Any) -> Any:
    """``data`` structured as ``hint``; raises :class:`Unreadable` for whatever cannot be.

    The one place where reading fails: cattrs' validation errors, a type it has no hook
    for, a hook's own ValueError/TypeError/KeyError, a NameError from an annotation,
    a RecursionError from deep nesting all become Unreadable (never Cancelled: this code
    does not await).
    """
    if isinstance(hint, Unresolved):
        raise Unreadable(str(hint))
    if _is_any(hint) or hint is None:
        return data
    try:
        return value_converter.structure(data, hint)
    except Exception as exc:
        raise Unreadable(f"cannot read {short(data)} as {_type_name(hint)}: {_explain(exc)}") from None


def _explain(exc: Exception) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        try:
            return "; ".join(cattrs.transform_error(exc, format_exception=lambda e, _: _explain_leaf(e)))
        except Exception:  # an odd group: say what it is
            pass
    return _explain_leaf(exc)


def _explain_leaf(exc: BaseException) -> str:
    if isinstance(exc, cattrs.StructureHandlerNotFoundError):
        return f"trioworker has no JSON form for {_type_name(exc.type_)}"
    if isinstance(exc, KeyError):
        return f"missing {exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


_INT_RANGE: Final = range(-(2**63), 2**64)

#: Times are written by Python, not orjson: orjson 3.13 writes ``time(0, 0, 0, 10000)``
#: as "00:00:00.10000" (ten times the microseconds when they are 10000-99999).
_OWN_TIMES: Final = orjson.OPT_PASSTHROUGH_DATETIME


def _isoformat(value: object) -> str:
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def dump_value(value: object, hint: Any) -> JSON:
    """JSON for ``value`` that :func:`read_value` reads back by ``hint`` as the same value.

    Raises TypeError with a sentence when it would not: the annotation cannot be resolved,
    the value has no JSON form (a complex, an int beyond 64 bits, a NaN), it does not fit
    the annotation, or it would arrive changed (a naive datetime for an aware one, a
    subclass as its base). "The same" means equal and of the same type, recursively;
    only list and tuple (both a JSON array) and set and frozenset may stand for each
    other, and which one arrives is the annotation's choice (a list where there is none).

    A value given in its JSON form (plain JSON: ``{"width": 4, "height": 3}`` for an attrs
    class, ``"09:30"`` for a ``time``, as a web app receives it) is sent as it is when it
    reads as the annotation: the worker gets what it reads as.
    """
    try:
        return _dump_checked(value, hint)
    except TypeError:
        if _is_any(hint) or isinstance(hint, Unresolved) or not _is_plain_json(value):
            raise
    try:
        read_value(value, hint)
    except Unreadable as exc:
        raise TypeError(f"{short(value)} does not fit the annotation {_type_name(hint)}: {exc}") from None
    return value


def _is_plain_json(value: object) -> bool:
    """Whether ``value`` is JSON as orjson writes and reads it (lists, not tuples)."""
    try:
        return _plain(value)
    except RecursionError:
        return False


def _plain(value: object) -> bool:
    kind = type(value)
    if kind is str:
        return _utf8(typing.cast(str, value))
    if kind is bool or value is None:
        return True
    if kind is int:
        return value in _INT_RANGE
    if kind is float:
        return math.isfinite(typing.cast(float, value))
    if kind is list:
        return all(_plain(item) for item in typing.cast(list[object], value))
    if kind is dict:
        items = typing.cast(dict[object, object], value).items()
        return all(type(key) is str and _utf8(key) and _plain(item) for key, item in items)
    return False


def _utf8(text: str) -> bool:
    """Whether ``text`` can travel as JSON (no lone surrogates, as an undecodable file name has)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _dump_checked(value: object, hint: Any) -> JSON:
    kind = type(value)
    plain = _is_any(hint) or hint is kind
    if plain and (
        (kind is str and _utf8(typing.cast(str, value)))
        or kind is bool
        or value is None
        or (kind is int and value in _INT_RANGE)
        or (kind is float and math.isfinite(typing.cast(float, value)))
    ):
        return value  # fast path: JSON as it is
    if isinstance(hint, Unresolved):
        raise TypeError(str(hint))
    as_type = None if _is_any(hint) else hint
    if _not_a(value, as_type):
        raise TypeError(
            f"{short(value)} ({kind.__qualname__}) does not fit the annotation {_type_name(hint)}"
        )
    try:
        unstructured = value_converter.unstructure(value, unstructure_as=as_type)
        data = orjson.loads(orjson.dumps(unstructured, default=_isoformat, option=_OWN_TIMES))
    except Exception as exc:
        raise TypeError(f"{short(value)} has no JSON form ({_explain_leaf(exc)})") from None
    try:
        back = read_value(data, hint)
    except Unreadable as exc:
        raise TypeError(f"{short(value)} does not fit the annotation {_type_name(hint)}: {exc}") from None
    try:
        same = _same(value, back)
    except Exception:  # a RecursionError, an __eq__ that raises
        same = False
    if not same:
        raise TypeError(
            f"{short(value)} would arrive as {short(back)}"
            + ("" if type(back) is kind else f" ({type(back).__qualname__})")
            + ("; say its type in an annotation" if _is_any(hint) else "")
        )
    return data


def _not_a(value: object, hint: Any) -> bool:
    """Whether ``value`` is plainly not an instance of the class ``hint`` (an int is a float)."""
    if not isinstance(hint, type) or (hint is float and type(value) is int):
        return False
    try:
        return not isinstance(value, hint)
    except TypeError:  # a TypedDict, a protocol: cattrs decides
        return False


_ARRAYS: Final = frozenset({list, tuple})
_SETS: Final = frozenset({set, frozenset})
_MISSING: Final = object()


#: Types whose ``==`` says all once the types match.
_PLAIN: Final = frozenset({str, int, bool, type(None), bytes, uuid.UUID, date, timedelta})


def _field_names(kind: type[object]) -> Iterable[str] | None:
    """The fields an attrs class or a dataclass is compared by; None for other types."""
    attrs_fields: tuple[attrs.Attribute[Any], ...] | None = getattr(kind, "__attrs_attrs__", None)
    if attrs_fields is not None:  # what attrs.fields() returns, without its checks
        return (f.name for f in attrs_fields)
    if dataclasses.is_dataclass(kind):
        return (f.name for f in dataclasses.fields(kind) if f.compare)
    return None


def _same(sent: Any, got: Any) -> bool:
    kind = type(sent)
    if kind is not type(got) and not ({kind, type(got)} <= _ARRAYS or {kind, type(got)} <= _SETS):
        return False
    if kind in _PLAIN:
        return bool(sent == got)
    if kind in _ARRAYS or isinstance(sent, tuple):  # a NamedTuple's type matched above
        return len(sent) == len(got) and all(_same(a, b) for a, b in zip(sent, got, strict=True))
    if kind in _SETS:
        found = {item: item for item in got}
        return len(sent) == len(got) and all(_same(item, found.get(item, _MISSING)) for item in sent)
    if kind is dict:
        keys = {key: key for key in got}
        return len(sent) == len(got) and all(
            _same(key, keys.get(key, _MISSING)) and _same(value, got[key]) for key, value in sent.items()
        )
    names = _field_names(kind)
    if names is not None:
        return all(_same(getattr(sent, n, _MISSING), getattr(got, n, _MISSING)) for n in names)
    if kind is Decimal:
        return str(sent) == str(got)
    if kind is float:
        return bool(sent == got) and math.copysign(1, sent) == math.copysign(1, got)
    if isinstance(sent, datetime | time):
        return bool(sent == got) and sent.utcoffset() == got.utcoffset()
    return bool(sent == got)


# --------------------------------------------------------------------------- parameters


def bind(fn: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.BoundArguments:
    """Bind like a call would (raising the same TypeError), with defaults filled in."""
    bound = _signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound


def dump_parameters(
    fn: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any], *, task: str = ""
) -> dict[str, JSON]:
    """``{parameter name: JSON value}``; ``*args`` is a list, ``**kwargs`` an object."""
    return dump_bound(bind(fn, args, kwargs), hints(fn), task=task or fn.__qualname__)


def dump_bound(
    bound: inspect.BoundArguments, annotations: Mapping[str, Any], *, task: str
) -> dict[str, JSON]:
    """The arguments as JSON, each checked by :func:`dump_value` against its annotation.

    Future placeholders (``{FUTURE_KEY: id}``) pass as they are. Raises TypeError naming
    ``task`` and the parameter for a value that would not arrive as it is.
    """
    params = bound.signature.parameters
    out: dict[str, JSON] = {}

    def dump(value: object, hint: Any, where: str) -> JSON:
        if future_ref_id(value) is not None:
            return value
        try:
            return dump_value(value, hint)
        except TypeError as exc:
            raise TypeError(f"task {task}, parameter {where}: {exc}") from None

    for name, value in bound.arguments.items():
        kind = params[name].kind
        hint = annotations.get(name, NO_ANNOTATION)
        if kind is Parameter.VAR_POSITIONAL:
            out[name] = [dump(v, hint, f"*{name}[{i}]") for i, v in enumerate(value)]
        elif kind is Parameter.VAR_KEYWORD:
            out[name] = {k: dump(v, hint, f"**{name}[{k!r}]") for k, v in value.items()}
        else:
            out[name] = dump(value, hint, repr(name))
    return out


def load_parameters(fn: Callable[..., object], data: JSON) -> tuple[list[Any], dict[str, Any]]:
    """Rebuild ``(args, kwargs)`` for calling ``fn`` from :func:`dump_parameters` output.

    Raises ParameterError (one sentence) for anything that does not fit.
    """
    if not isinstance(data, dict):
        raise ParameterError(f"parameters must be a JSON object, got {type(data).__name__}")
    annotations = hints(fn)
    params = _signature(fn).parameters
    unknown = set(data) - set(params)
    if unknown:
        raise ParameterError(f"unexpected parameter(s) {', '.join(sorted(unknown))} for {fn.__qualname__}")

    def read(value: JSON, hint: Any, where: str) -> Any:
        try:
            return read_value(value, hint)
        except Unreadable as exc:
            raise ParameterError(f"parameter {where}: {exc}") from None

    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    positional_ok = True
    for name, param in params.items():
        hint = annotations.get(name, NO_ANNOTATION)
        if name not in data:
            if param.default is Parameter.empty and param.kind not in (
                Parameter.VAR_POSITIONAL,
                Parameter.VAR_KEYWORD,
            ):
                raise ParameterError(f"missing parameter {name!r} for {fn.__qualname__}")
            positional_ok = positional_ok and param.kind is not Parameter.POSITIONAL_OR_KEYWORD
            continue
        value = data[name]
        if param.kind is Parameter.VAR_POSITIONAL:
            if not isinstance(value, list):
                raise ParameterError(f"*{name} must be a JSON array")
            args.extend(read(v, hint, f"*{name}[{i}]") for i, v in enumerate(value))
        elif param.kind is Parameter.VAR_KEYWORD:
            if not isinstance(value, dict):
                raise ParameterError(f"**{name} must be a JSON object")
            kwargs.update({k: read(v, hint, f"**{name}[{k!r}]") for k, v in value.items()})
        elif param.kind is Parameter.KEYWORD_ONLY or (
            param.kind is Parameter.POSITIONAL_OR_KEYWORD and not positional_ok
        ):
            kwargs[name] = read(value, hint, repr(name))
        else:
            args.append(read(value, hint, repr(name)))
    return args, kwargs


def read_arguments(
    fn: Callable[..., object], args: list[JSON], kwargs: dict[str, JSON]
) -> tuple[list[Any], dict[str, Any]]:
    """JSON arguments (the command line's) read by ``fn``'s annotations, as a worker would.

    Raises TypeError for arguments that do not fit the signature and ParameterError for a
    value that cannot be read as its annotation.
    """
    bound = _signature(fn).bind(*args, **kwargs)
    params = bound.signature.parameters
    data = {
        name: list(value) if params[name].kind is Parameter.VAR_POSITIONAL else value
        for name, value in bound.arguments.items()
    }
    return load_parameters(fn, data)


# --------------------------------------------------------------------------- results


def dump_result(fn: Callable[..., object], value: object) -> JSON:
    """The result as JSON, checked by :func:`dump_value` against the return annotation.

    Raises TypeError with a sentence when it would not reach ``result()`` as it is.
    """
    return dump_value(value, hints(fn).get("return", NO_ANNOTATION))


def load_result(fn: Callable[..., object], data: JSON) -> Any:
    """The result structured by ``fn``'s return annotation; raises :class:`Unreadable`."""
    return read_value(data, hints(fn).get("return", NO_ANNOTATION))


# --------------------------------------------------------------------------- pickle


def pickle_dumps(value: object) -> str:
    return base64.b64encode(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).decode()


def pickle_loads(data: JSON) -> Any:
    if not isinstance(data, str):
        raise ParameterError("pickled data must be a base64 string")
    try:
        return pickle.loads(base64.b64decode(data))
    except Exception as exc:
        raise ParameterError(f"cannot unpickle: {exc!r}") from None


#: In json parameters, ``{FUTURE_KEY: "<run id>"}`` stands for that run's result.
FUTURE_KEY: Final = "__trioworker_future__"


@attrs.frozen
class FutureRef:
    """In pickled parameters, stands for the result of the run ``task_run_id``."""

    task_run_id: uuid.UUID


def future_ref_id(value: object) -> uuid.UUID | None:
    """The run id a parameter value stands for, if it is a future placeholder."""
    if isinstance(value, FutureRef):
        return value.task_run_id
    if isinstance(value, dict) and len(value) == 1 and FUTURE_KEY in value:
        try:
            return uuid.UUID(str(value[FUTURE_KEY]))
        except ValueError:
            return None
    return None
