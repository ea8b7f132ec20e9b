from __future__ import annotations

import pytest

from trioworker.models import SetStateStatus, StateType, make_state
from trioworker.server.rules import decide

S = StateType
ACCEPT, REJECT, ABORT = SetStateStatus.ACCEPT, SetStateStatus.REJECT, SetStateStatus.ABORT


@pytest.mark.parametrize(
    ("current", "proposed", "status"),
    [
        (S.PENDING, S.RUNNING, ACCEPT),
        (S.RUNNING, S.COMPLETED, ACCEPT),
        (S.RUNNING, S.FAILED, ACCEPT),
        (S.RUNNING, S.SCHEDULED, ACCEPT),  # a retry
        (S.SCHEDULED, S.CANCELLED, ACCEPT),
        (S.SCHEDULED, S.RUNNING, ACCEPT),  # a run executed directly
        (S.SCHEDULED, S.COMPLETED, REJECT),  # never started
        (S.SCHEDULED, S.PENDING, REJECT),  # only deliveries make PENDING
        (S.COMPLETED, S.RUNNING, REJECT),
        (S.FAILED, S.COMPLETED, REJECT),
        (S.CANCELLED, S.RUNNING, ABORT),
        (S.CANCELLED, S.COMPLETED, ABORT),
    ],
)
def test_transitions(current: StateType, proposed: StateType, status: SetStateStatus) -> None:
    assert decide(make_state(current), make_state(proposed))[0] is status


@pytest.mark.parametrize("state", [S.RUNNING, S.COMPLETED, S.FAILED, S.CANCELLED])
def test_repeats_are_accepted_without_change(state: StateType) -> None:
    assert decide(make_state(state), make_state(state)) == (ACCEPT, "unchanged")


def test_force_overrides_the_rules() -> None:
    assert decide(make_state(S.COMPLETED), make_state(S.RUNNING), force=True)[0] is ACCEPT


def test_rejections_say_why() -> None:
    status, why = decide(make_state(S.COMPLETED), make_state(S.RUNNING))
    assert status is REJECT
    assert why == "the run is already COMPLETED; it cannot become RUNNING"
