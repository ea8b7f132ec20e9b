"""What Prefect's clients expect of the server: every websocket closes with 1008 when its
first message is not an auth message, and a proposed state needs a type, not a name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from trioworker.server import RunningServer

from .raw import subscribe

PATHS = ["/api/task_runs/subscriptions/scheduled", "/api/task_runs/channel"]
AUTH = {"type": "auth", "token": None}

#: First messages that are not an auth message: sent as they are (str: a text frame, bytes:
#: a binary frame), anything else encoded as JSON text.
NOT_AUTH: list[Any] = [
    pytest.param("{not json", id="not-json"),
    pytest.param("", id="empty"),
    pytest.param("auth", id="bare-word"),
    pytest.param([1, 2], id="array"),
    pytest.param("null", id="null"),
    pytest.param('"auth"', id="json-string"),
    pytest.param({"token": None}, id="no-type"),
    pytest.param({"type": 5, "token": None}, id="type-not-a-string"),
    pytest.param({"type": "AUTH", "token": None}, id="type-uppercase"),
    pytest.param({"type": "subscribe", "keys": ["k"], "client_id": "c", "credit": 1}, id="subscribe"),
    pytest.param({"type": "create", "ref": 1, "task_runs": []}, id="create"),
    pytest.param(orjson.dumps(AUTH), id="binary-frame-with-auth"),
    pytest.param(b"\x00\xff", id="binary-frame"),
]


def socket_url(server: RunningServer, path: str) -> str:
    return server.url.replace("http://", "ws://", 1) + path


@asynccontextmanager
async def open_socket(server: RunningServer, path: str) -> AsyncIterator[WebSocketConnection]:
    ws: WebSocketConnection | None = None
    try:
        async with open_websocket_url(socket_url(server, path)) as ws:
            yield ws
    finally:
        if ws is not None:
            await trio.aclose_forcefully(ws._stream)


async def close_after(server: RunningServer, path: str, first: Any) -> tuple[int, str, list[Any]]:
    """Send ``first`` (then an auth message); the close code, its reason and what came before."""
    received: list[Any] = []
    async with open_socket(server, path) as ws:
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(10):
            await ws.send_message(first if isinstance(first, str | bytes) else orjson.dumps(first).decode())
            await ws.send_message(orjson.dumps(AUTH).decode())
            while True:
                received.append(await ws.get_message())
    assert closed.value.reason is not None
    return closed.value.reason.code, closed.value.reason.reason or "", received


@pytest.mark.parametrize("path", PATHS, ids=["subscription", "channel"])
@pytest.mark.parametrize("first", NOT_AUTH)
async def test_a_first_message_that_is_not_auth_closes_with_1008(
    trioworker_server: RunningServer, api: httpx.AsyncClient, path: str, first: Any
) -> None:
    code, reason, received = await close_after(trioworker_server, path, first)
    assert (code, received) == (1008, [])  # no auth_success, even for the auth message after it
    assert reason == """Expected 'auth' message: the first message must be {"type": "auth", "token": ...}"""
    assert (await api.get("/health")).json()["subscriptions"] == 0
    async with open_socket(trioworker_server, path) as ws:  # the next client is served as ever
        await ws.send_message(orjson.dumps(AUTH).decode())
        with trio.fail_after(10):
            assert orjson.loads(await ws.get_message()) == {"type": "auth_success"}


# -- states without a name


async def create(api: httpx.AsyncClient, key: str = "names") -> str:
    response = await api.post("/task_runs", json={"task_key": key})
    assert response.status_code == 201, response.text
    run_id: str = response.json()["id"]
    return run_id


async def propose(
    api: httpx.AsyncClient, run_id: str, state: dict[str, Any], *, force: bool = False
) -> dict[str, Any]:
    response = await api.post(f"/task_runs/{run_id}/set_state", json={"state": state, "force": force})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize("name", ["missing", None, ""], ids=["missing", "null", "empty"])
async def test_set_state_without_a_name_takes_the_name_of_its_type(
    api: httpx.AsyncClient, name: str | None
) -> None:
    def state(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, **fields} if name == "missing" else {"type": kind, "name": name, **fields}

    run_id = await create(api)
    for kind, expected in [("RUNNING", "Running"), ("COMPLETED", "Completed")]:
        result = await propose(api, run_id, state(kind, data=7 if kind == "COMPLETED" else None))
        assert result["status"] == "ACCEPT", result
        assert (result["state"]["type"], result["state"]["name"]) == (kind, expected)
    run = (await api.get(f"/task_runs/{run_id}")).json()
    assert (run["state"]["name"], run["state"]["data"]) == ("Completed", 7)
    history = (await api.get(f"/task_runs/{run_id}/history")).json()
    assert [h["name"] for h in history] == ["Scheduled", "Running", "Completed"]

    for kind, expected in [
        ("SCHEDULED", "Scheduled"),
        ("PENDING", "Pending"),
        ("FAILED", "Failed"),
        ("CANCELLED", "Cancelled"),
        ("CRASHED", "Crashed"),
    ]:
        other = await create(api)
        result = await propose(api, other, state(kind), force=True)
        assert (result["status"], result["state"]["name"]) == ("ACCEPT", expected)


async def test_set_state_keeps_a_given_name_and_refuses_a_bad_type(api: httpx.AsyncClient) -> None:
    run_id = await create(api)
    result = await propose(api, run_id, {"type": "SCHEDULED", "name": "AwaitingRetry"})
    assert result["state"]["name"] == "AwaitingRetry"
    for state in [{"type": "DONE"}, {"type": 5}, {"name": "Completed"}, {"type": "COMPLETED", "name": 5}]:
        response = await api.post(f"/task_runs/{run_id}/set_state", json={"state": state})
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith("invalid state request: ")


async def test_state_reports_without_a_name_over_the_socket(
    trioworker_server: RunningServer, api: httpx.AsyncClient
) -> None:
    run_id = await create(api, "socket.names")
    async with subscribe(trioworker_server, ["socket.names"]) as sub:
        [run] = await sub.runs()
        assert run["id"] == run_id
        for kind, name in [("RUNNING", None), ("COMPLETED", "missing")]:
            state: dict[str, Any] = {"type": kind, "data": "done"}
            if name != "missing":
                state["name"] = name
            await sub.send({"type": "states", "states": [{"id": run_id, "ref": kind, "state": state}]})
            with trio.fail_after(10):
                while (message := await sub.receive())["type"] != "state_results":
                    pass
            [answer] = message["results"]
            assert (answer["ref"], answer["status"]) == (kind, "ACCEPT"), answer
    history = (await api.get(f"/task_runs/{run_id}/history")).json()
    assert [h["name"] for h in history] == ["Scheduled", "Pending", "Running", "Completed"]
