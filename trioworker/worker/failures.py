"""How a failed run is reported: bounded text, a ``str()`` that cannot raise, and an
exception described as JSON (its type, message, traceback and arguments).

Every field a task controls is cut to a bound (:data:`MAX_TEXT_BYTES`, tracebacks
:data:`MAX_TRACEBACK_BYTES`) with :data:`CUT_MARKER`, so one bad run cannot produce a report
the server refuses.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, Final

import orjson

from trioworker._util import raise_passing
from trioworker.models import JSON, converter

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
        raise_passing(error)
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
        raise_passing(error)
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
