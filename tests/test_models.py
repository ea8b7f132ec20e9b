from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import cattrs
import orjson
import pytest

from trioworker.models import (
    SetStateRequest,
    State,
    StateDetails,
    StateType,
    TaskRun,
    TaskRunCreate,
    converter,
    dumps,
    loads,
    make_state,
)


def a_run() -> TaskRun:
    return TaskRun(
        id=uuid.uuid4(),
        task_key="say",
        name="say-1",
        state=make_state(
            StateType.SCHEDULED,
            details=StateDetails(scheduled_time=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ),
        parameters={"text": "hi", "n": [1, 2]},
        tags=["a"],
        context={"user": "ann"},
        wait_for=[uuid.uuid4()],
    )


def test_task_run_round_trips_through_json() -> None:
    run = a_run()
    assert loads(dumps(run), TaskRun) == run


def test_wire_format_uses_iso_utc_times_uuid_strings_and_enum_names() -> None:
    run = a_run()
    wire = orjson.loads(dumps(run))
    assert wire["id"] == str(run.id)
    assert wire["state"]["type"] == "SCHEDULED"
    assert wire["state"]["state_details"]["scheduled_time"] == "2030-01-02T03:04:05+00:00"
    assert wire["wait_for"] == [str(run.wait_for[0])]


def test_unknown_fields_from_a_newer_peer_are_ignored() -> None:
    run = a_run()
    wire = orjson.loads(dumps(run))
    wire["priority"] = 7
    wire["state"]["color"] = "green"
    wire["state"]["state_details"]["zone"] = "eu"
    assert converter.structure(wire, TaskRun) == run


def test_times_in_other_zones_are_normalised_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    state = converter.structure(
        {"type": "RUNNING", "name": "Running", "timestamp": "2030-01-01T12:00:00+02:00"}, State
    )
    assert state.timestamp == datetime(2030, 1, 1, 12, tzinfo=plus_two)
    assert state.timestamp.tzinfo is UTC
    naive = converter.structure({"task_key": "k", "scheduled_time": "2030-01-01T12:00:00"}, TaskRunCreate)
    assert naive.scheduled_time == datetime(2030, 1, 1, 12, tzinfo=UTC)


def test_a_create_needs_only_a_task_key() -> None:
    create = converter.structure({"task_key": "say"}, TaskRunCreate)
    assert create == TaskRunCreate(task_key="say")


@pytest.mark.parametrize(
    "payload",
    [
        {"state": {"type": "EXPLODED", "name": "x"}},
        {"state": {"name": "no type"}},
        {"state": {"type": "RUNNING", "name": "Running", "timestamp": "yesterday"}},
    ],
)
def test_bad_states_raise_validation_errors(payload: dict[str, object]) -> None:
    with pytest.raises(cattrs.BaseValidationError):
        converter.structure(payload, SetStateRequest)


def test_terminal_states() -> None:
    assert {t for t in StateType if t.is_terminal} == {
        StateType.COMPLETED,
        StateType.FAILED,
        StateType.CANCELLED,
        StateType.CRASHED,
    }
    assert make_state(StateType.FAILED).name == "Failed"


def test_decimals_travel_exactly() -> None:
    from decimal import Decimal

    assert converter.unstructure(Decimal("0.10")) == "0.10"
    assert converter.structure("0.10", Decimal) == Decimal("0.10")
