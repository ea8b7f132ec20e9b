"""Every number or time a client sends that the server computes with is either accepted
with a defined meaning or refused in one line naming the field: 422 on REST, a 4001
protocol error on a socket; never a 500, never a dead server or session (issue 10)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from trioworker.server import RunningServer
from trioworker.server.sockets import MAX_DELAY_SECONDS

from .raw import subscribe
from .test_fuzz import a_server


async def new_run(api: httpx.AsyncClient, **fields: object) -> str:
    response = await api.post("/task_runs", json={"task_key": "k", **fields})
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]
    assert isinstance(run_id, str)
    return run_id


async def set_delay(api: httpx.AsyncClient, run_id: str, delay: str) -> httpx.Response:
    body = b'{"state": {"type": "SCHEDULED", "state_details": {"delay_seconds": %s}}, "force": true}'
    return await api.post(
        f"/task_runs/{run_id}/set_state",
        content=body % delay.encode(),
        headers={"Content-Type": "application/json"},
    )


@pytest.mark.parametrize("delay", ["1e12", "1e300", "3e11", "3153600001", "1e400", "-1e400"])
async def test_a_delay_too_long_is_a_422_naming_the_field(api: httpx.AsyncClient, delay: str) -> None:
    run_id = await new_run(api)
    response = await set_delay(api, run_id, delay)
    assert response.status_code in (400, 422), response.text  # 1e400 is not JSON orjson reads
    if response.status_code == 422:
        assert (
            "state_details.delay_seconds must be a number of seconds of at most" in response.json()["detail"]
        )
    run = (await api.get(f"/task_runs/{run_id}")).json()
    assert run["state"]["type"] == "SCHEDULED" and run["state"]["state_details"]["scheduled_time"] is None


@pytest.mark.parametrize(("delay", "due_after"), [("-1", 0), ("-1e300", 0), ("0", 0), ("3153600000", 3.1e9)])
async def test_a_delay_in_bounds_is_accepted(api: httpx.AsyncClient, delay: str, due_after: float) -> None:
    run_id = await new_run(api)
    before = datetime.now(UTC).timestamp()
    response = await set_delay(api, run_id, delay)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ACCEPT"
    due = datetime.fromisoformat(response.json()["state"]["state_details"]["scheduled_time"]).timestamp()
    assert due >= before + due_after  # zero or negative: due now
    assert MAX_DELAY_SECONDS == 3153600000


@pytest.mark.parametrize("delay", ["true", '"5"', "[1]", "{}"])
async def test_a_delay_that_is_not_a_number_is_a_422(api: httpx.AsyncClient, delay: str) -> None:
    response = await set_delay(api, await new_run(api), delay)
    assert response.status_code == 422
    assert "delay_seconds" in response.json()["detail"]


@pytest.mark.parametrize(
    ("when", "status"),
    [
        ("0001-01-01T00:00:00Z", 201),  # long past: due now
        ("0001-01-01T00:00:00", 201),
        ("9999-12-31T23:59:59Z", 201),  # never in practice, but a defined time
        ("0001-01-01T00:00:00+05:00", 422),  # before year 1 in UTC
        ("9999-12-31T23:59:59-05:00", 422),  # after year 9999 in UTC
        ("10000-01-01T00:00:00Z", 422),
    ],
)
async def test_scheduled_times_at_the_ends_of_the_calendar(
    api: httpx.AsyncClient, when: str, status: int
) -> None:
    created = await api.post("/task_runs", json={"task_key": "k", "scheduled_time": when})
    assert created.status_code == status, created.text
    run_id = await new_run(api)
    proposal = {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": when}}, "force": True}
    changed = await api.post(f"/task_runs/{run_id}/set_state", json=proposal)
    assert changed.status_code == (200 if status == 201 else 422), changed.text
    if status == 422:
        assert "$.scheduled_time" in created.json()["detail"]
        assert "scheduled_time" in changed.json()["detail"]
    listed = await api.get("/task_runs", params={"limit": 1000})
    assert listed.status_code == 200  # what was stored reads back


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("limit=-1", "limit must be an integer between 1 and 1000, got '-1'"),
        ("limit=1e30", "limit must be an integer, got '1e30'"),
        ("limit=1.5", "limit must be an integer, got '1.5'"),
        ("limit=abc", "limit must be an integer, got 'abc'"),
        ("limit=inf", "limit must be an integer, got 'inf'"),
        ("limit=", "limit must be an integer, got ''"),
        ("offset=-1", "offset must be an integer between 0 and 4611686018427387904, got '-1'"),
        ("offset=nan", "offset must be an integer, got 'nan'"),
        ("offset=9223372036854775807", "offset must be an integer between 0 and 4611686018427387904"),
        ("offset=" + "9" * 400, "offset must be an integer, got '999"),
    ],
)
async def test_list_paging_out_of_range_is_a_422(api: httpx.AsyncClient, query: str, detail: str) -> None:
    response = await api.get("/task_runs?" + query)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(detail)


async def test_list_paging_at_its_bounds_is_served(api: httpx.AsyncClient) -> None:
    await new_run(api)
    for query, count in [
        ("limit=1000", 1),
        ("limit=+1", 1),
        ("offset=4611686018427387904", 0),
        ("offset=0", 1),
    ]:
        response = await api.get("/task_runs?" + query)
        assert (response.status_code, len(response.json())) == (200, count), query


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"timeout": True}, "timeout must be a number of seconds between 0 and 300, got True"),
        ({"timeout": -1}, "timeout must be a number"),
        ({"timeout": 1e308}, "timeout must be a number"),
        ({"timeout": "5"}, "timeout must be a number"),
        ({"linger": -0.5}, "linger must be a number of seconds between 0 and 5"),
        ({"linger": True}, "linger must be a number"),
        ({"linger": 1e300}, "linger must be a number"),
        ({"all": "yes"}, "all must be true or false, got 'yes'"),
        ({"all": 1}, "all must be true or false"),
    ],
)
async def test_wait_numbers_out_of_range_are_a_422(
    api: httpx.AsyncClient, body: dict[str, Any], detail: str
) -> None:
    run_id = await new_run(api)
    response = await api.post("/task_runs/wait", json={"ids": [run_id], **body})
    assert response.status_code == 422
    assert response.json()["detail"].startswith(detail)
    for query in ["timeout=-1", "timeout=nan", "timeout=inf", "timeout=1e400", "timeout=x"]:
        response = await api.get(f"/task_runs/{run_id}/wait?" + query)
        assert response.status_code == 422 and response.json()["detail"].startswith("timeout must be")


async def test_wait_at_its_bounds_answers(api: httpx.AsyncClient) -> None:
    run_id = await new_run(api)
    with trio.fail_after(10):
        response = await api.post("/task_runs/wait", json={"ids": [run_id], "timeout": 0, "linger": 5})
    assert (response.status_code, response.json()["pending"]) == (200, [run_id])


@pytest.mark.parametrize("n", [2**62, -(2**62), -3])
async def test_credit_far_beyond_any_bound_is_clamped(
    api: httpx.AsyncClient, trioworker_server: RunningServer, n: int
) -> None:
    """A credit message adds to the credit; the sum never goes below zero, and any size is
    only a large credit. The session goes on either way."""
    run_ids = [await new_run(api) for _ in range(2)]
    async with subscribe(trioworker_server, ["k"], credit=1) as sub:
        [first] = await sub.runs()
        await sub.send({"type": "credit", "n": n})
        await sub.finish([first["id"]])
        if n > 0:
            [second] = await sub.runs()  # the room the credit made
            assert {first["id"], second["id"]} == set(run_ids)
        else:
            await sub.send({"type": "credit", "n": 1})  # from zero, not from below it
            [second] = await sub.runs()
            assert second["id"] != first["id"]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"type": "credit", "n": 1.5}, '"n" of a credit message must be an integer'),
        ({"type": "credit", "n": True}, '"n" of a credit message must be an integer'),
        ({"type": "credit", "n": 1e300}, '"n" of a credit message must be an integer'),
        ({"type": "credit", "n": "5"}, '"n" of a credit message must be an integer'),
        ({"type": "credit"}, '"n" of a credit message must be an integer'),
        (
            {
                "type": "states",
                "states": [
                    {"id": "RUN", "state": {"type": "SCHEDULED", "state_details": {"delay_seconds": 1e12}}}
                ],
            },
            "bad state report: state_details.delay_seconds must be a number of seconds of at most",
        ),
        (
            {
                "type": "states",
                "states": [
                    {"id": "RUN", "state": {"type": "RUNNING", "timestamp": "0001-01-01T00:00:00+01:00"}}
                ],
            },
            "bad state report: ",
        ),
    ],
)
async def test_bad_numbers_on_the_socket_are_a_protocol_error(
    api: httpx.AsyncClient, trioworker_server: RunningServer, message: dict[str, Any], reason: str
) -> None:
    run_id = await new_run(api)
    async with subscribe(trioworker_server, ["k"], credit=1) as sub:
        [run] = await sub.runs()
        sent = orjson.loads(orjson.dumps(message).replace(b'"RUN"', f'"{run["id"]}"'.encode()))
        await sub.send(sent)
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(10):
            while True:
                await sub.ws.get_message()
    assert closed.value.reason is not None and closed.value.reason.code == 4001
    assert (closed.value.reason.reason or "").startswith(f"Protocol violation: {reason}"[:123])
    assert (await api.get(f"/task_runs/{run_id}")).status_code == 200  # the server goes on


numbers = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.none()
    | st.text(max_size=8)
)
times = st.datetimes().map(lambda d: d.isoformat()) | st.text(max_size=30) | numbers


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(delay=numbers, when=times, limit=numbers, offset=numbers, seconds=numbers, linger=numbers)
async def test_no_number_makes_the_server_fail(
    delay: object, when: object, limit: object, offset: object, seconds: object, linger: object
) -> None:
    async with a_server() as (_, api):
        run_id = await new_run(api)
        ended_id = await new_run(api)  # waits on an ended run answer at once
        assert (await api.post(f"/task_runs/{ended_id}/cancel")).status_code == 200
        answers = [
            await api.post(
                f"/task_runs/{run_id}/set_state",
                json={
                    "state": {"type": "SCHEDULED", "state_details": {"delay_seconds": delay}},
                    "force": True,
                },
            ),
            await api.post(
                f"/task_runs/{run_id}/set_state",
                json={
                    "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": when}},
                    "force": True,
                },
            ),
            await api.post("/task_runs", json={"task_key": "k", "scheduled_time": when}),
            await api.get("/task_runs", params={"limit": str(limit), "offset": str(offset)}),
            await api.post("/task_runs/wait", json={"ids": [ended_id], "timeout": seconds, "linger": linger}),
            await api.get(f"/task_runs/{ended_id}/wait", params={"timeout": str(seconds)}),
        ]
        for answer in answers:
            assert answer.status_code in (200, 201, 422), answer.text
            if answer.status_code == 422:
                assert "\n" not in answer.json()["detail"]
        assert (await api.get(f"/task_runs/{run_id}")).status_code == 200
