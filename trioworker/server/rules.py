"""Which state changes the server allows: one pure function, so the rules read as a table."""

from __future__ import annotations

from typing import Final

from trioworker.models import SetStateStatus, State, StateType

S = StateType

#: Non-terminal state -> states a client may propose from it. PENDING is the server's alone:
#: only a delivery moves a run there.
_ALLOWED: Final[dict[StateType, frozenset[StateType]]] = {
    S.SCHEDULED: frozenset({S.SCHEDULED, S.RUNNING, S.FAILED, S.CANCELLED, S.CRASHED}),
    S.PENDING: frozenset({S.SCHEDULED, S.RUNNING, S.FAILED, S.CANCELLED, S.CRASHED}),
    S.RUNNING: frozenset({S.SCHEDULED, S.COMPLETED, S.FAILED, S.CANCELLED, S.CRASHED}),
}


def decide(current: State, proposed: State, *, force: bool = False) -> tuple[SetStateStatus, str | None]:
    """Judge a proposed state against the current one.

    Returns the status and, when not accepted, a sentence saying why. A repeat of the
    current state is accepted without a change (``"unchanged"``), which makes reports
    idempotent: a worker may resend after a reconnect without harm.
    """
    cur, new = current.type, proposed.type
    if force:
        return SetStateStatus.ACCEPT, None
    if cur is new and cur is not S.SCHEDULED:
        return SetStateStatus.ACCEPT, "unchanged"
    if cur is S.CANCELLED:
        return SetStateStatus.ABORT, "the run was cancelled"
    if cur.is_terminal:
        return SetStateStatus.REJECT, f"the run is already {cur.value}; it cannot become {new.value}"
    if new is S.PENDING:
        return SetStateStatus.REJECT, "only the server moves a run to PENDING, by delivering it"
    if new not in _ALLOWED[cur]:
        return SetStateStatus.REJECT, f"a {cur.value} run cannot become {new.value}"
    return SetStateStatus.ACCEPT, None
