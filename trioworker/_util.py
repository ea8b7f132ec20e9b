"""Small helpers shared by modules (no state)."""

from __future__ import annotations


def only_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one leaf of nested single-member groups, or None when there are several.

    Nurseries wrap even a single error in a group; where exactly one thing went wrong,
    callers deserve that error itself (the ``raise_single_exception_from_group`` idea).
    """
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc
