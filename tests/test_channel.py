"""The client channel's wire protocol, by hand."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from trioworker.server import RunningServer
from trioworker.testing import ServerControl

#: Every test here runs its server on each kind of store (tests/stores.py).
pytestmark = pytest.mark.every_store


def channel_url(server: RunningServer) -> str:
    return server.url.replace("http://", "ws://", 1) + "/api/task_runs/channel"


async def talk(server: RunningServer, messages: list[Any], replies: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with open_websocket_url(channel_url(server)) as ws:
        try:
            for message in messages:
                await ws.send_message(message if isinstance(message, str) else orjson.dumps(message).decode())
            with trio.fail_after(10):
                while len(got) < replies:
                    got.append(orjson.loads(await ws.get_message()))
        finally:
            await trio.aclose_forcefully(ws._stream)
    return got


AUTH = {"type": "auth", "token": None}


async def test_create_watch_and_ended(trioworker_server: RunningServer) -> None:
    create = {"type": "create", "ref": 7, "task_runs": [{"task_key": "k", "parameters": {"x": 1}}]}
    [auth, created] = await talk(trioworker_server, [AUTH, create], 2)
    assert auth == {"type": "auth_success"}
    assert created["type"] == "created" and created["ref"] == 7
    run_id = created["task_runs"][0]["id"]
    await trioworker_server.service.cancel(uuid.UUID(run_id))
    [_, ended] = await talk(trioworker_server, [AUTH, {"type": "watch", "ids": [run_id]}], 2)
    assert ended["type"] == "ended"
    assert [r["state"]["type"] for r in ended["task_runs"]] == ["CANCELLED"]


async def test_bad_creates_get_an_error_and_the_socket_stays(trioworker_server: RunningServer) -> None:
    bad = {"type": "create", "ref": 1, "task_runs": [{"task_key": 5}]}
    good = {"type": "create", "ref": 2, "task_runs": [{"task_key": "k"}]}
    [_, error, created] = await talk(trioworker_server, [AUTH, bad, good], 3)
    assert error == {"type": "error", "ref": 1, "status": 422, "detail": error["detail"]}
    assert "task_key" in error["detail"]
    assert created["ref"] == 2


async def test_a_create_with_an_id_over_the_channel(trioworker_server: RunningServer) -> None:
    run_id = str(uuid.uuid4())

    def create(ref: int, **fields: Any) -> dict[str, Any]:
        return {"type": "create", "ref": ref, "task_runs": [{"task_key": "k", "id": run_id, **fields}]}

    async with open_websocket_url(channel_url(trioworker_server)) as ws:
        try:

            async def ask(message: dict[str, Any]) -> dict[str, Any]:
                await ws.send_message(orjson.dumps(message).decode())
                with trio.fail_after(10):
                    reply: dict[str, Any] = orjson.loads(await ws.get_message())
                assert reply["ref"] == message.get("ref")
                return reply

            await ws.send_message(orjson.dumps(AUTH).decode())
            with trio.fail_after(10):
                assert orjson.loads(await ws.get_message()) == {"type": "auth_success"}
            first = await ask(create(1, parameters={"x": 1}))
            assert first["type"] == "created" and first["task_runs"][0]["id"] == run_id
            assert await ask(create(2, parameters={"x": 1})) == {**first, "ref": 2}  # a repeat: the same run
            taken = await ask(create(3, task_key="other"))
            assert (taken["type"], taken["status"]) == ("error", 409)
            assert f"task run id {run_id} is taken by a run of task 'k'" in taken["detail"]
            bad = await ask({"type": "create", "ref": 4, "task_runs": [{"task_key": "k", "id": "nope"}]})
            assert (bad["type"], bad["status"]) == ("error", 422) and "$.id" in bad["detail"]
            assert (await ask(create(5)))["type"] == "created"  # the socket stays
        finally:
            await trio.aclose_forcefully(ws._stream)


@pytest.mark.parametrize(
    ("messages", "code", "reason"),
    [
        ([{"type": "auth", "token": "wrong"}], 1008, "Unauthorized"),
        ([AUTH, {"type": "dance"}], 4001, "unknown message type"),
        ([AUTH, {"type": "watch", "ids": ["nope"]}], 4001, '"ids"'),
        ([AUTH, {"type": "create", "task_runs": {}}], 4001, '"task_runs"'),
        ([AUTH, "{nope"], 4001, "malformed JSON"),
    ],
)
async def test_violations_close_the_channel(
    trioworker_server_control: ServerControl, messages: list[Any], code: int, reason: str
) -> None:
    server = await trioworker_server_control.start(api_key=None if code != 1008 else "right")
    with pytest.raises(ConnectionClosed) as closed:
        await talk(server, messages, 99)
    assert closed.value.reason is not None
    assert closed.value.reason.code == code
    assert reason in (closed.value.reason.reason or "")
