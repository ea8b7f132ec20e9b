"""A bare subscription client for protocol tests: it speaks the wire format by hand."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from trioworker.server import RunningServer

SUBSCRIPTION = "/api/task_runs/subscriptions/scheduled"


def ws_url(server: RunningServer, path: str = SUBSCRIPTION) -> str:
    return server.url.replace("http://", "ws://", 1) + path


class Raw:
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        #: Deliveries that arrived while :meth:`report` waited for its answer: a run can
        #: be delivered into the room a final report freed before that report is answered.
        self.early_deliveries: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_message(orjson.dumps(message).decode())

    async def receive(self) -> dict[str, Any]:
        with trio.fail_after(10):
            message = orjson.loads(await self.ws.get_message())
        assert isinstance(message, dict)
        return message

    async def runs(self) -> list[dict[str, Any]]:
        """The runs of the next delivery (cancel notices and results are skipped)."""
        if self.early_deliveries:
            return list(self.early_deliveries.pop(0)["task_runs"])
        while True:
            message = await self.receive()
            if message["type"] == "task_runs":
                return list(message["task_runs"])

    async def report(self, ids: Iterable[str], state_type: str, **state: Any) -> list[dict[str, Any]]:
        states = [{"id": i, "state": {"type": state_type, "name": state_type.title(), **state}} for i in ids]
        await self.send({"type": "states", "states": states})
        while True:
            message = await self.receive()
            if message["type"] == "state_results":
                return list(message["results"])
            if message["type"] == "task_runs":
                self.early_deliveries.append(message)

    async def finish(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        for state_type in ("RUNNING", "COMPLETED"):
            results = await self.report(ids, state_type)
            assert [r["status"] for r in results] == ["ACCEPT"] * len(ids)


@asynccontextmanager
async def connect(
    server: RunningServer, path: str = SUBSCRIPTION, **options: Any
) -> AsyncIterator[WebSocketConnection]:
    """``open_websocket_url`` (of the websocket at ``path``, with ``options``) that always
    closes its TCP stream.

    trio-websocket 0.12 returns early from ``aclose()`` when the server closed first, and
    leaves the socket to the garbage collector (a ResourceWarning): close it here.
    """
    ws: WebSocketConnection | None = None
    try:
        async with open_websocket_url(ws_url(server, path), **options) as ws:
            yield ws
    finally:
        if ws is not None:
            await trio.aclose_forcefully(ws._stream)


@asynccontextmanager
async def subscribe(
    server: RunningServer,
    keys: list[str],
    *,
    credit: int = 10,
    token: str | None = None,
    client_id: str = "test-1",
    prefetch: int | None = None,
    held: list[str] | None = None,
) -> AsyncIterator[Raw]:
    async with connect(server) as ws:
        raw = Raw(ws)
        await raw.send({"type": "auth", "token": token})
        assert await raw.receive() == {"type": "auth_success"}
        message = {"type": "subscribe", "keys": keys, "client_id": client_id, "credit": credit}
        if prefetch is not None:
            message["prefetch"] = prefetch
        if held is not None:
            message["held"] = held  # what a reconnecting worker says it still works on
        await raw.send(message)
        yield raw
