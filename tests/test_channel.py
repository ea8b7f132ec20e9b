"""The client channel's wire protocol, by hand."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from trioworker.models import TaskRunCreate
from trioworker.server import RunningServer
from trioworker.server.service import TaskRunService
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


class Socket:
    """One authenticated channel connection, spoken to by hand."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_message(orjson.dumps(message).decode())

    async def receive(self) -> dict[str, Any]:
        with trio.fail_after(10):
            reply: dict[str, Any] = orjson.loads(await self.ws.get_message())
        return reply


@asynccontextmanager
async def channel(server: RunningServer) -> AsyncIterator[Socket]:
    async with open_websocket_url(channel_url(server)) as ws:
        try:
            socket = Socket(ws)
            await socket.send(AUTH)
            assert await socket.receive() == {"type": "auth_success"}
            yield socket
        finally:
            await trio.aclose_forcefully(ws._stream)


async def test_a_watched_create_gets_its_end_pushed_unasked(trioworker_server: RunningServer) -> None:
    service = trioworker_server.service
    run_id = str(uuid.uuid4())
    async with channel(trioworker_server) as ws:
        await ws.send(
            {"type": "create", "ref": 1, "watch": True, "task_runs": [{"task_key": "k", "id": run_id}]}
        )
        created = await ws.receive()
        assert (created["type"], created["ref"], created["watched"]) == ("created", 1, True)
        assert [r["id"] for r in created["task_runs"]] == [run_id]
        # Watched once, from the create: a watch message for it now reads and adds nothing.
        assert len(service._waiters[uuid.UUID(run_id)]) == 1
        await ws.send({"type": "watch", "ids": [run_id]})
        await ws.send({"type": "create", "ref": 2, "task_runs": [{"task_key": "k"}]})
        assert (await ws.receive())["ref"] == 2  # the watch was read before this create
        assert len(service._waiters[uuid.UUID(run_id)]) == 1
        await service.cancel(uuid.UUID(run_id))
        ended = await ws.receive()
        assert ended["type"] == "ended" and ended["missing"] == []
        assert [(r["id"], r["state"]["type"]) for r in ended["task_runs"]] == [(run_id, "CANCELLED")]
        assert uuid.UUID(run_id) not in service._waiters


async def test_a_watched_create_watches_only_what_can_still_end(trioworker_server: RunningServer) -> None:
    """A repeat of an ended run answers it ended and watches nothing; a refused create
    watches nothing; an unwatched create (an older client) is answered as before."""
    service = trioworker_server.service
    ended_id, refused_id = uuid.uuid4(), uuid.uuid4()

    def create(ref: int, run_id: uuid.UUID, key: str = "k", **fields: Any) -> dict[str, Any]:
        return {"type": "create", "ref": ref, "task_runs": [{"task_key": key, "id": str(run_id)}], **fields}

    async with channel(trioworker_server) as ws:
        await ws.send(create(1, ended_id))
        first = await ws.receive()
        assert first["type"] == "created" and "watched" not in first
        await service.cancel(ended_id)
        await ws.send(create(2, ended_id, watch=True))
        repeat = await ws.receive()
        assert repeat["watched"] is True and repeat["task_runs"][0]["state"]["type"] == "CANCELLED"
        await ws.send(create(3, ended_id, "other", watch=True))
        assert (await ws.receive())["status"] == 409
        await ws.send(create(4, refused_id, "", watch=True))
        assert (await ws.receive())["status"] == 422
        assert ended_id not in service._waiters and refused_id not in service._waiters


async def test_a_watch_during_a_refused_watched_create_is_answered(
    trioworker_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch message for an id a watched create in flight watches already waits for that
    create: refused (the id is another key's run), the id is watched as the message asked."""
    service = trioworker_server.service
    run_id = str(uuid.uuid4())
    entered, gate = trio.Event(), trio.Event()
    create_runs = TaskRunService.create_runs

    async def held(self: TaskRunService, creates: list[TaskRunCreate], *, partial: bool = False) -> Any:
        if creates[0].task_key == "other":  # the refused create waits here, its ids watched
            entered.set()
            await gate.wait()
        return await create_runs(self, creates, partial=partial)

    monkeypatch.setattr(TaskRunService, "create_runs", held)
    async with channel(trioworker_server) as ws:
        await ws.send({"type": "create", "ref": 1, "task_runs": [{"task_key": "k", "id": run_id}]})
        assert (await ws.receive())["type"] == "created"
        refused = {
            "type": "create",
            "ref": 2,
            "watch": True,
            "task_runs": [{"task_key": "other", "id": run_id}],
        }
        await ws.send(refused)
        with trio.fail_after(10):
            await entered.wait()
        await ws.send({"type": "watch", "ids": [run_id]})
        await ws.send({"type": "create", "ref": 3, "task_runs": [{"task_key": "k"}]})
        assert (await ws.receive())["ref"] == 3  # the watch message was read
        gate.set()
        assert (await ws.receive())["status"] == 409
        await service.cancel(uuid.UUID(run_id))
        ended = await ws.receive()
        assert [(r["id"], r["state"]["type"]) for r in ended["task_runs"]] == [(run_id, "CANCELLED")]
        assert uuid.UUID(run_id) not in service._waiters


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
        ([AUTH, {"type": "create", "task_runs": [], "watch": "yes"}], 4001, '"watch"'),
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
