"""Small helpers shared by modules (no state)."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from typing import Final

import trio


def only_exception(group: BaseException) -> BaseException | None:
    """The one leaf of nested single-member groups, or None when there are several; an
    exception that is not a group is its own leaf.

    Nurseries wrap even a single error in a group; where exactly one thing went wrong,
    callers deserve that error itself (the ``raise_single_exception_from_group`` idea).
    """
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


#: At most this many exceptions of a group (groups and leaves, at any depth) are looked at
#: for what must propagate; a group made to be larger or deeper is walked that far only.
MAX_GROUP_WALK: Final = 10_000


#: Groups nested deeper than this are not split (``split`` recurses once per level).
MAX_SPLIT_DEPTH: Final = 100


def _leaves(exc: BaseException) -> Iterator[tuple[BaseException, int]]:
    """The leaves of ``exc`` with their depth, first :data:`MAX_GROUP_WALK` nodes only.

    Iterative: a group nested thousands deep cannot make it recurse.
    """
    stack: list[tuple[BaseException, int]] = [(exc, 0)]
    visited = 0
    while stack and visited < MAX_GROUP_WALK:
        node, depth = stack.pop()
        visited += 1
        if isinstance(node, BaseExceptionGroup):
            stack.extend((inner, depth + 1) for inner in reversed(node.exceptions))
        else:
            yield node, depth


def _from_sigint_handler(exc: BaseException) -> bool:
    """Raised for a real Ctrl-C: by the process's SIGINT handler, or by Trio itself.

    A SIGINT handler raises KeyboardInterrupt in its own frame, which is then the innermost
    frame of the traceback; Trio raises it in its own code when it delivers a Ctrl-C that
    came during protected code to the main task. Code that raises KeyboardInterrupt
    itself is neither.
    """
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame
    module = frame.f_globals.get("__name__")
    if isinstance(module, str) and (module == "trio" or module.startswith("trio.")):
        return True
    return frame.f_code is getattr(signal.getsignal(signal.SIGINT), "__code__", None)


def _cancelled_here() -> bool:
    try:
        return trio.current_effective_deadline() == -math.inf
    except RuntimeError:  # not in a Trio task: nothing to tell a real Cancelled from
        return True


def passing_part(exc: BaseException) -> BaseException | None:
    """What of ``exc``, raised by a run's code, must propagate instead of failing the run.

    * ``exc`` itself when it is, or holds, a real Ctrl-C: a KeyboardInterrupt raised by
      the process's SIGINT handler or by Trio (``raise KeyboardInterrupt`` in code is not);
    * its :class:`trio.Cancelled` part while a scope around the caller is cancelled (the
      run cancelled, the worker stopping): Trio's own cancellation, never swallowed;
    * None for everything else: the run's own failure, BaseExceptions included, and a
      Cancelled raised while nothing cancels the caller (one the code kept from elsewhere).

    Bounded for any group: it looks at :data:`MAX_GROUP_WALK` exceptions at most, and never
    recurses (a group nested deeper than :data:`MAX_SPLIT_DEPTH` passes its first Cancelled
    instead of its Cancelled part).

    Call it where ``exc`` was caught, in the same Trio task.
    """
    leaves = list(_leaves(exc))
    if any(isinstance(e, KeyboardInterrupt) and _from_sigint_handler(e) for e, _ in leaves):
        return exc
    if any(isinstance(e, trio.Cancelled) for e, _ in leaves) and _cancelled_here():
        if not isinstance(exc, BaseExceptionGroup):
            return exc
        if max(depth for _, depth in leaves) <= MAX_SPLIT_DEPTH:
            part, _ = exc.split(trio.Cancelled)
            return part
        # split() recurses once per level: too deep a group passes its first Cancelled.
        return next(e for e, _ in leaves if isinstance(e, trio.Cancelled))
    return None


def raise_passing(exc: BaseException) -> None:
    """Raise what of ``exc`` must propagate (see :func:`passing_part`); else return."""
    passing = passing_part(exc)
    if passing is not None:
        raise passing


#: Seconds per unit of :func:`parse_duration`.
DURATION_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Seconds from a duration as people write it: ``90`` or ``90s`` (seconds), ``15m``,
    ``12h``, ``7d``, ``2w``; decimals are fine (``1.5h``).

    Raises:
        ValueError: one sentence naming the text: not a number with an optional unit
            (s, m, h, d, w), negative, or not finite.
    """
    value = text.strip().lower()
    unit = DURATION_UNITS.get(value[-1:]) if value else None
    number = value[:-1].strip() if unit is not None else value
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a duration: a number of seconds, or a number with a unit "
            "(s, m, h, d, w), e.g. 90, 15m, 7d"
        ) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{text!r} is not a duration: it must be a finite number, 0 or more")
    return seconds
