"""How parameters and results travel: ``json`` (the default) and ``pickle`` (opt-in).

The json serializer binds arguments to the task's signature and unstructures each with
the wire converter; the worker structures each back by the parameter's annotation, so an
attrs instance, a datetime or a UUID arrives as itself. Pickle carries any object, and
with it the power to run code on the worker: a worker refuses it unless told otherwise.
"""

from __future__ import annotations

import base64
import functools
import inspect
import pickle
import traceback
import typing
import uuid
from collections.abc import Callable
from typing import Any, Final

import attrs
import cattrs
import orjson

from trioworker._util import raise_passing
from trioworker.errors import ParameterError
from trioworker.models import JSON, converter

Parameter = inspect.Parameter


@functools.lru_cache(maxsize=1024)
def _signature(fn: Callable[..., object]) -> inspect.Signature:
    """Cached: reading a signature per run cost a worker ~6% of its time."""
    return inspect.signature(fn)


@functools.lru_cache(maxsize=1024)
def _hints(fn: Callable[..., object]) -> dict[str, Any]:
    """Cached: resolving annotations per run cost a worker ~11% of its time."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to no structuring
        return {}


def _structure(value: JSON, hint: Any, where: str) -> Any:
    if hint is None or hint is Any or hint is type(None) or hint is inspect.Parameter.empty:
        return value
    try:
        return converter.structure(value, hint)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError, AttributeError) as exc:
        detail = (
            "; ".join(cattrs.transform_error(exc)) if isinstance(exc, cattrs.BaseValidationError) else exc
        )
        raise ParameterError(
            f"{where}: cannot read {value!r} as {getattr(hint, '__name__', hint)}: {detail}"
        ) from None


def bind(fn: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.BoundArguments:
    """Bind like a call would (raising the same TypeError), with defaults filled in."""
    bound = _signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound


def dump_parameters(
    fn: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, JSON]:
    """``{parameter name: JSON value}``; ``*args`` is a list, ``**kwargs`` an object."""
    return dump_bound(bind(fn, args, kwargs))


def dump_bound(bound: inspect.BoundArguments) -> dict[str, JSON]:
    params = bound.signature.parameters
    out: dict[str, JSON] = {}
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is Parameter.VAR_POSITIONAL:
            out[name] = [converter.unstructure(v) for v in value]
        elif kind is Parameter.VAR_KEYWORD:
            out[name] = {k: converter.unstructure(v) for k, v in value.items()}
        else:
            out[name] = converter.unstructure(value)
    return out


def load_parameters(fn: Callable[..., object], data: JSON) -> tuple[list[Any], dict[str, Any]]:
    """Rebuild ``(args, kwargs)`` for calling ``fn`` from :func:`dump_parameters` output."""
    if not isinstance(data, dict):
        raise ParameterError(f"parameters must be a JSON object, got {type(data).__name__}")
    hints = _hints(fn)
    params = _signature(fn).parameters
    unknown = set(data) - set(params)
    if unknown:
        raise ParameterError(f"unexpected parameter(s) {', '.join(sorted(unknown))} for {fn.__qualname__}")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    positional_ok = True
    for name, param in params.items():
        hint = hints.get(name)
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
            args.extend(_structure(v, hint, f"*{name}") for v in value)
        elif param.kind is Parameter.VAR_KEYWORD:
            if not isinstance(value, dict):
                raise ParameterError(f"**{name} must be a JSON object")
            kwargs.update({k: _structure(v, hint, f"**{name}[{k!r}]") for k, v in value.items()})
        elif param.kind is Parameter.KEYWORD_ONLY or (
            param.kind is Parameter.POSITIONAL_OR_KEYWORD and not positional_ok
        ):
            kwargs[name] = _structure(value, hint, name)
        else:
            args.append(_structure(value, hint, name))
    return args, kwargs


def dump_result(fn: Callable[..., object], value: object) -> JSON:
    return converter.unstructure(value)


def load_result(fn: Callable[..., object], data: JSON) -> Any:
    return _structure(data, _hints(fn).get("return"), "result")


def pickle_dumps(value: object) -> str:
    return base64.b64encode(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).decode()


def pickle_loads(data: JSON) -> Any:
    if not isinstance(data, str):
        raise ParameterError("pickled data must be a base64 string")
    try:
        return pickle.loads(base64.b64decode(data))
    except Exception as exc:
        raise ParameterError(f"cannot unpickle: {exc!r}") from None


#: The longest text a state report carries in one field (a message, an exception's type,
#: its arguments), in bytes once encoded as JSON; longer text is cut (see clip_text).
MAX_TEXT_BYTES: Final = 64 * 1024
#: The longest traceback a state report carries, in bytes once encoded as JSON.
MAX_TRACEBACK_BYTES: Final = 256 * 1024
#: What ends text that was cut; ``{}`` is the number of characters left out.
CUT_MARKER: Final = "... [cut {} characters]"


def _json_size(text: str) -> int:
    return len(orjson.dumps(text)) - 2  # without the quotes


def clip_text(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    """``text`` made fit to report: valid for JSON and at most ``limit`` bytes encoded.

    Lone surrogates (an undecodable file name gives them; JSON cannot carry them) become
    ``\\udcXX`` escapes. Text still longer than ``limit`` bytes (as a JSON string, quotes
    not counted) is cut, and ends with ``... [cut N characters]``, the marker included in
    the limit. ``limit`` must leave room for the marker (at least 64).
    """
    if limit < 64:
        raise ValueError("limit must be at least 64 bytes")
    text = str.__str__(text)  # an exact str, whatever subclass came in
    try:
        size = _json_size(text)
    except orjson.JSONEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        size = _json_size(text)
    if size <= limit:
        return text
    budget = limit - len(CUT_MARKER.format(len(text)))
    # The longest prefix within the budget (a character takes 1 to 6 bytes of JSON).
    low, high = 0, min(len(text), budget)
    while low < high:
        middle = (low + high + 1) // 2
        if _json_size(text[:middle]) <= budget:
            low = middle
        else:
            high = middle - 1
    return text[:low] + CUT_MARKER.format(len(text) - low)


def _failed_to(what: str, error: BaseException) -> str:
    raise_passing(error)
    return f"<{what} failed: {type_name(type(error))}>"


def safe_str(value: object, render: Callable[[Any], object] = str) -> str:
    """``render(value)`` (``str`` by default), or ``<str() failed: ...>`` if that raised.

    Never raises, except what must propagate (see :func:`~trioworker._util.passing_part`).
    The text is not clipped.
    """
    try:
        text: object = render(value)
        if not isinstance(text, str):
            return f"<{getattr(render, '__name__', 'render')}() returned no str>"
        return str.__str__(text)
    except BaseException as error:  # anything: it is the code's failure, not ours
        return _failed_to(f"{getattr(render, '__name__', 'render')}()", error)


def type_name(cls: type) -> str:
    """``module.qualname`` of a class, read so that no metaclass or odd ``__module__`` can raise."""
    qualname = str(type.__dict__["__qualname__"].__get__(cls))
    try:
        module = type.__dict__["__module__"].__get__(cls)
    except AttributeError:
        module = None
    return f"{module}.{qualname}" if isinstance(module, str) else qualname


def _short_name(cls: type) -> str:
    return str(type.__dict__["__name__"].__get__(cls))


def exception_line(exc: BaseException, limit: int | None = MAX_TEXT_BYTES) -> str:
    """``"ValueError: message"`` (``"SystemExit"`` for an empty message), clipped to
    ``limit`` (None: not clipped; clip the text it goes into). Never raises."""
    text = safe_str(exc)
    name = _short_name(type(exc))
    line = f"{name}: {text}" if text else name
    return line if limit is None else clip_text(line, limit)


def _traceback_text(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except BaseException as error:  # an odd __notes__ or chain: fall back to its own frames
        reason = _failed_to("rendering the traceback", error)
    frames = safe_str(exc.__traceback__, lambda tb: "".join(traceback.format_tb(tb)))
    return f"Traceback (most recent call last):\n{frames}{exception_line(exc)}\n{reason}\n"


def describe_exception(exc: BaseException) -> dict[str, JSON]:
    """The FAILED state's data: enough to re-raise the same type where it can be imported.

    ``{"type": "module.qualname", "message": str(exc), "traceback": text, "args": [...] |
    None}``. Never raises for what the exception does (a ``__str__`` or ``__repr__`` that
    raises, an unrenderable chain or ``__notes__``); every text is cut to fit
    (:data:`MAX_TEXT_BYTES`, the traceback :data:`MAX_TRACEBACK_BYTES`), and ``args`` is
    None when they are not JSON or too long.
    """
    return {
        "type": clip_text(type_name(type(exc))),
        "message": clip_text(safe_str(exc)),
        "traceback": clip_text(_traceback_text(exc), MAX_TRACEBACK_BYTES),
        "args": _jsonable_args(exc),
    }


def _jsonable_args(exc: BaseException) -> list[JSON] | None:
    try:
        args = [converter.unstructure(a) for a in exc.args]
        size = len(orjson.dumps(args))
    except BaseException as error:  # not JSON, or its own code raised: no args then
        raise_passing(error)
        return None
    return args if size <= MAX_TEXT_BYTES else None


SERIALIZERS: Final = ("json", "pickle")

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
