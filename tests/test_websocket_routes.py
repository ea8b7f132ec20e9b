"""The websockets' routes served on hypercorn's ASGI events (trioworker.server.app's
WebsocketRouter, trioworker.server.sockets' AsgiWebsocket), not through quart: what a
client sees is what quart answered, and quart never sees these handshakes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import pytest
import trio
import trio_websocket
from hypercorn.typing import ASGIReceiveEvent, ASGISendEvent, Framework, WebsocketScope
from quart import websocket
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from trioworker import protocol
from trioworker._http import serve_app
from trioworker.server import RunningServer
from trioworker.server.app import create_app
from trioworker.server.channel import ChannelSession
from trioworker.server.queue import Dispatcher
from trioworker.server.service import TaskRunService
from trioworker.server.sockets import AsgiWebsocket, ConnectionGone
from trioworker.server.store import open_store

from .helpers import LogEvents
from .test_conformance import open_socket

ROUTES = [protocol.SUBSCRIPTION_PATH, protocol.CHANNEL_PATH, protocol.EVENTS_PATH]
AUTH = orjson.dumps({"type": "auth", "token": None}).decode()


def ws_url(url: str, path: str) -> str:
    return url.replace("http://", "ws://", 1) + "/api" + path


@asynccontextmanager
async def server_seen_by_quart(tmp_path: Path) -> AsyncIterator[tuple[str, list[str]]]:
    """A server (its parts put together as serve_server does) whose quart app records the
    path of every websocket handshake it sees: ``(URL, paths)``."""
    seen: list[str] = []
    async with open_store(tmp_path / "seen.db") as store, trio.open_nursery() as nursery:
        dispatcher = Dispatcher()
        await nursery.start(dispatcher.release_delayed_runs)
        app = create_app(TaskRunService(store, dispatcher))

        @app.quart.before_websocket
        async def record() -> None:
            seen.append(websocket.path)

        url: str = await nursery.start(partial(serve_app, cast(Framework, app), "127.0.0.1", 0))
        yield url, seen
        nursery.cancel_scope.cancel()


async def rejected_status(url: str, path: str) -> int:
    """The status of the HTTP answer to a websocket handshake to ``url`` (the server's) +
    ``path`` (the socket closed when it is done, which trio-websocket does not)."""
    host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        with pytest.raises(ExceptionGroup) as caught:
            async with trio.open_nursery() as nursery:
                await trio_websocket.wrap_client_stream(nursery, stream, f"{host}:{port}", path)
    [rejected] = caught.value.exceptions
    assert isinstance(rejected, ConnectionRejected)
    return rejected.status_code


async def test_the_websocket_routes_never_enter_quart(tmp_path: Path) -> None:
    async with server_seen_by_quart(tmp_path) as (url, seen):
        for path in ROUTES:
            async with open_websocket_url(ws_url(url, path)) as ws:
                await ws.send_message(AUTH)
                with trio.fail_after(10):
                    assert orjson.loads(await ws.get_message()) == {"type": "auth_success"}
        assert seen == []
        # Another path is quart's, as before: its hooks run, and it answers 404.
        assert await rejected_status(url, "/api/nope") == 404
        assert seen == ["/api/nope"]


async def test_quart_answers_other_requests_to_these_paths_as_before(
    trioworker_server: RunningServer,
) -> None:
    async with httpx.AsyncClient(base_url=trioworker_server.api_url, timeout=10) as api:
        # An HTTP request to a websocket route: 400 (a websocket's rule), or another route's
        # answer where one matches (a run id that is not a UUID).
        for path in (protocol.SUBSCRIPTION_PATH, protocol.EVENTS_PATH):
            response = await api.get(path)
            assert response.status_code == 400, path
        response = await api.get(protocol.CHANNEL_PATH)
        assert (response.status_code, response.json()["detail"]) == (404, "no task run 'channel': not a UUID")
    # A path that merges into a route is redirected; one with a slash more is not found.
    for path in ROUTES:
        assert await rejected_status(trioworker_server.url, "/api/" + path) == 308
        assert await rejected_status(trioworker_server.url, "/api" + path + "/") == 404


async def test_a_binary_frame_after_auth_is_read_as_json(trioworker_server: RunningServer) -> None:
    missing = "00000000-0000-0000-0000-000000000001"
    async with open_websocket_url(ws_url(trioworker_server.url, protocol.CHANNEL_PATH)) as ws:
        await ws.send_message(AUTH)
        with trio.fail_after(10):
            assert orjson.loads(await ws.get_message()) == {"type": "auth_success"}
            await ws.send_message(orjson.dumps({"type": "watch", "ids": [missing]}))
            assert orjson.loads(await ws.get_message()) == {
                "type": "ended",
                "task_runs": [],
                "missing": [missing],
            }


@pytest.mark.parametrize("path", ROUTES)
async def test_a_socket_opened_while_the_fence_is_raised_closes_with_1012(
    trioworker_server: RunningServer, path: str
) -> None:
    trioworker_server.service.fence.raise_("the database is away")
    async with open_socket(trioworker_server, "/api" + path) as ws:
        with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
    assert closed.value.reason is not None
    assert (closed.value.reason.code, closed.value.reason.reason) == (
        protocol.CLOSE_RESTART,
        "the database is away; use another server",
    )


async def test_an_exception_of_a_session_is_logged_and_the_socket_closed_with_1000(
    trioworker_server: RunningServer, logs: LogEvents, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: ChannelSession, nursery: trio.Nursery) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(ChannelSession, "receive_forever", broken)
    async with open_socket(trioworker_server, "/api" + protocol.CHANNEL_PATH) as ws:
        await ws.send_message(AUTH)
        with trio.fail_after(10):
            assert orjson.loads(await ws.get_message()) == {"type": "auth_success"}
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason is not None and closed.value.reason.code == protocol.CLOSE_NORMAL
    [record] = logs.matching("^Exception on websocket /api/task_runs/channel$")
    assert record.exc_info is not None


# -- AsgiWebsocket on its own: ASGI events in, ASGI events out


def scope(**fields: Any) -> WebsocketScope:
    base: dict[str, Any] = {
        "type": "websocket",
        "path": "/api/events",
        "scheme": "ws",
        "headers": [(b"host", b"127.0.0.1:1"), (b"Origin", b"http://a"), (b"origin", b"http://b")],
        "extensions": {"websocket.http.response": {}},
    }
    return cast(WebsocketScope, base | fields)


@asynccontextmanager
async def asgi_socket(
    events: list[dict[str, Any]], **fields: Any
) -> AsyncIterator[tuple[AsgiWebsocket, list[ASGISendEvent]]]:
    """A socket that receives ``events`` (then waits) and records what it sends."""
    incoming, receiving = trio.open_memory_channel[ASGIReceiveEvent](len(events))
    for event in events:
        incoming.send_nowait(cast(ASGIReceiveEvent, event))
    sent: list[ASGISendEvent] = []

    async def send(event: ASGISendEvent) -> None:
        sent.append(event)

    async with incoming, receiving:
        yield AsgiWebsocket(scope(**fields), receiving.receive, send), sent


async def test_frames_come_as_text_or_bytes_and_a_disconnect_ends_receiving() -> None:
    events: list[dict[str, Any]] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "t", "bytes": None},
        {"type": "websocket.receive", "text": None, "bytes": b"b"},
        {"type": "websocket.receive", "text": None, "bytes": None},
        {"type": "websocket.disconnect", "code": 1006},
    ]
    async with asgi_socket(events) as (socket, sent):
        await socket.accept()
        await socket.accept()
        assert [await socket.receive() for _ in range(3)] == ["t", b"b", b""]
        for _ in range(2):  # and again at once, without waiting for another event
            with pytest.raises(ConnectionGone):
                await socket.receive()
        with pytest.raises(ConnectionGone):
            await socket.send("late")
    assert sent == [{"type": "websocket.accept", "subprotocol": None, "headers": []}]
    assert socket.gone and not socket.closed


async def test_a_send_after_close_raises_connection_gone_and_a_second_close_is_refused() -> None:
    async with asgi_socket([]) as (socket, sent):
        assert (socket.path, socket.scheme, socket.header("ORIGIN"), socket.header("x")) == (
            "/api/events",
            "ws",
            "http://a",
            None,
        )
        await socket.accept()
        await socket.send("one")
        await socket.close(4001, "Protocol violation: no")
        with pytest.raises(ConnectionGone):
            await socket.send("two")
        with pytest.raises(RuntimeError):
            await socket.close(1000)
    assert sent[1:] == [
        {"type": "websocket.send", "bytes": None, "text": "one"},
        {"type": "websocket.close", "code": 4001, "reason": "Protocol violation: no"},
    ]


async def test_a_send_the_server_refuses_raises_connection_gone() -> None:
    async def refusing(event: ASGISendEvent) -> None:
        raise RuntimeError("hypercorn: unexpected message")

    async def nothing() -> ASGIReceiveEvent:
        raise AssertionError("not received from")

    socket = AsgiWebsocket(scope(), nothing, refusing)
    with pytest.raises(ConnectionGone):
        await socket.send("x")


@pytest.mark.parametrize("extensions", [{"websocket.http.response": {}}, {}])
async def test_a_rejected_handshake_is_an_http_answer_where_the_server_can_give_one(
    extensions: dict[str, Any],
) -> None:
    async with asgi_socket([], extensions=extensions) as (socket, sent):
        await socket.reject(403, b'{"detail":"no"}')
        with pytest.raises(ConnectionGone):
            await socket.send("x")
    if extensions:
        assert sent == [
            {
                "type": "websocket.http.response.start",
                "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"15")],
            },
            {"type": "websocket.http.response.body", "body": b'{"detail":"no"}', "more_body": False},
        ]
    else:  # the server answers 403 itself
        assert sent == [{"type": "websocket.close", "code": 1000, "reason": None}]
