"""Test seams over real sockets: a websocket server the test speaks for, and a routing proxy.

:class:`FakeSockets` accepts websockets on a free port and hands each one to the test as a
:class:`Session`, which sends whatever the test wants (malformed frames included) and
reads what the client sends. :class:`Proxy` listens on another free port and routes each
TCP connection by the path of its first request: chosen paths to the fake, the rest to
the real server; :attr:`Proxy.rest_down` makes it drop REST connections (as a server
restart does). A worker pointed at the proxy thus holds a subscription the test controls
and makes real REST calls, which can fail on demand. :class:`CuttingProxy` forwards every
connection to the real server but cuts creates mid-call, the ways a network can.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Protocol, TypeVar

import attrs
import orjson
import trio
from trio_websocket import WebSocketConnection, WebSocketRequest, serve_websocket

#: What a socket raises when its peer went away.
GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
SUBSCRIPTION_PATH = "/api/task_runs/subscriptions/scheduled"
CHANNEL_PATH = "/api/task_runs/channel"


@attrs.define(eq=False)
class Session:
    """One websocket accepted by the fake; the test talks on it."""

    ws: WebSocketConnection
    path: str
    done: trio.Event = attrs.field(factory=trio.Event)

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, dict):
            message = orjson.dumps(message).decode()
        await self.ws.send_message(message)

    async def receive(self) -> dict[str, Any]:
        with trio.fail_after(10):
            message = orjson.loads(await self.ws.get_message())
        assert isinstance(message, dict)
        return message

    async def receive_type(self, kind: str, seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The next message of type ``kind`` (the others are appended to ``seen``)."""
        while True:
            message = await self.receive()
            if message["type"] == kind:
                return message
            if seen is not None:
                seen.append(message)

    async def accept_subscription(self) -> dict[str, Any]:
        """Answer the auth message; returns the subscribe message."""
        assert (await self.receive())["type"] == "auth"
        await self.send({"type": "auth_success"})
        return await self.receive_type("subscribe")

    async def accept_channel(self) -> None:
        assert (await self.receive())["type"] == "auth"
        await self.send({"type": "auth_success"})

    async def close_code(self) -> int | None:
        """Wait until the client closed the socket; its close code."""
        with trio.fail_after(10):
            while self.ws.closed is None:
                try:
                    await self.ws.get_message()
                except Exception:
                    break
        reason = self.ws.closed
        return None if reason is None else reason.code


@attrs.define(eq=False)
class FakeSockets:
    port: int
    sessions: trio.MemoryReceiveChannel[Session]

    async def next(self) -> Session:
        with trio.fail_after(10):
            return await self.sessions.receive()


@asynccontextmanager
async def fake_sockets() -> AsyncIterator[FakeSockets]:
    send, receive = trio.open_memory_channel[Session](math.inf)
    async with trio.open_nursery() as nursery:

        async def handler(request: WebSocketRequest) -> None:
            ws = await request.accept()
            session = Session(ws, request.path)
            send.send_nowait(session)
            await session.done.wait()  # the test ends the session (or the nursery does)

        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        yield FakeSockets(server.port, receive)
        nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class Proxy:
    port: int
    real_port: int
    fake_port: int
    #: Path suffixes whose connections go to the fake.
    to_fake: set[str]
    #: While True, REST connections (all but the fake's) are dropped at once.
    rest_down: bool = False
    _rest: set[trio.CancelScope] = attrs.field(factory=set)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def drop_rest(self) -> None:
        """Drop REST connections now and until :meth:`restore_rest`."""
        self.rest_down = True
        for scope in list(self._rest):
            scope.cancel()

    def restore_rest(self) -> None:
        self.rest_down = False

    async def handle(self, client: trio.SocketStream) -> None:
        async with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await client.receive_some(65536)
                if not chunk:
                    return
                head += chunk
            path = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
            fake = any(path.endswith(suffix) for suffix in self.to_fake)
            if not fake and self.rest_down:
                if b"upgrade: websocket" in head.lower():
                    await client.send_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                return  # a plain request: closed without an answer
            upstream = await trio.open_tcp_stream("127.0.0.1", self.fake_port if fake else self.real_port)
            async with upstream:
                scope: trio.CancelScope | None = None
                try:
                    async with trio.open_nursery() as nursery:
                        scope = nursery.cancel_scope
                        if not fake:
                            self._rest.add(scope)
                        await upstream.send_all(head)

                        async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                            with contextlib.suppress(*GONE):
                                while chunk := await source.receive_some(65536):
                                    await sink.send_all(chunk)
                            nursery.cancel_scope.cancel()  # one side went away: close both

                        nursery.start_soon(pump, client, upstream)
                        nursery.start_soon(pump, upstream, client)
                finally:
                    if scope is not None:
                        self._rest.discard(scope)


class _Handles(Protocol):
    port: int

    async def handle(self, client: trio.SocketStream) -> None: ...


H = TypeVar("H", bound=_Handles)


@asynccontextmanager
async def _serving(proxy: H) -> AsyncIterator[H]:
    """Serve ``proxy`` on a free loopback port (set as its ``port``) for the block."""
    async with trio.open_nursery() as nursery:

        async def handle(stream: trio.SocketStream) -> None:
            with contextlib.suppress(*GONE):
                await proxy.handle(stream)

        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        proxy.port = listeners[0].socket.getsockname()[1]
        yield proxy
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def routing_proxy(real_port: int, fake_port: int, to_fake: set[str]) -> AsyncIterator[Proxy]:
    async with _serving(Proxy(0, real_port, fake_port, to_fake)) as proxy:
        yield proxy


#: How :class:`CuttingProxy` cuts a create: ``before`` it reaches the server; ``after`` the
#: server answered (the answer is dropped); ``partial`` (half the status line comes
#: through); ``hang`` (the server answered, the client hears nothing until it gives up).
CUTS = ("before", "after", "partial", "hang")


@attrs.define(eq=False)
class CuttingProxy:
    """Forwards HTTP connections to the real server, but cuts the next ``cuts`` creates
    (``POST .../task_runs`` and ``.../task_runs/batch``) as ``how`` says. ``math.inf``:
    every one. A cut closes the connection, so the client's next attempt opens another."""

    port: int
    real_port: int
    how: str
    cuts: float = 1
    #: Creates cut so far, and creates let through.
    cut: int = 0
    passed: int = 0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    async def handle(self, client: trio.SocketStream) -> None:
        async with client:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await client.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0]
            method, path = head.split(b" ", 2)[:2]
            create = method == b"POST" and path.rstrip(b"/").endswith((b"/task_runs", b"/task_runs/batch"))
            if create:
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")[1:]
                    if line.lower().startswith(b"content-length:")
                )
                while len(data) < len(head) + 4 + length:
                    data += await client.receive_some(65536)
            upstream = await trio.open_tcp_stream("127.0.0.1", self.real_port)
            async with upstream:
                if create and self.cut < self.cuts:
                    self.cut += 1
                    if self.how == "before":
                        return
                    await upstream.send_all(data)
                    answer = b""
                    while b"\r\n" not in answer:  # the server committed the create and answers
                        answer += await upstream.receive_some(65536)
                    if self.how == "partial":
                        await client.send_all(answer[:6])  # "HTTP/1"
                    elif self.how == "hang":
                        await client.receive_some(65536)  # until the client gives up and closes
                    return
                self.passed += create
                await upstream.send_all(data)
                async with trio.open_nursery() as nursery:

                    async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                        with contextlib.suppress(*GONE):
                            while chunk := await source.receive_some(65536):
                                await sink.send_all(chunk)
                        nursery.cancel_scope.cancel()  # one side went away: close both

                    nursery.start_soon(pump, client, upstream)
                    nursery.start_soon(pump, upstream, client)


@asynccontextmanager
async def cutting_proxy(real_port: int, how: str, cuts: float = 1) -> AsyncIterator[CuttingProxy]:
    async with _serving(CuttingProxy(0, real_port, how, cuts)) as proxy:
        yield proxy


@attrs.define(eq=False)
class FreezingProxy:
    """Forwards TCP connections to the real server until :meth:`freeze`: then it reads and
    forwards nothing more, either way (a hung server, or a network that drops everything),
    until :meth:`thaw`. New connections are accepted but hang as well while frozen."""

    port: int
    real_port: int
    thawed: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self.thawed.set()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def freeze(self) -> None:
        if self.thawed.is_set():
            self.thawed = trio.Event()

    def thaw(self) -> None:
        self.thawed.set()

    async def handle(self, client: trio.SocketStream) -> None:
        async with client:
            await self.thawed.wait()
            upstream = await trio.open_tcp_stream("127.0.0.1", self.real_port)
            async with upstream, trio.open_nursery() as nursery:

                async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                    with contextlib.suppress(*GONE):
                        while True:
                            await self.thawed.wait()
                            chunk = await source.receive_some(65536)
                            if not chunk:
                                break
                            await self.thawed.wait()  # a chunk read as it froze waits too
                            await sink.send_all(chunk)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)


@asynccontextmanager
async def freezing_proxy(real_port: int) -> AsyncIterator[FreezingProxy]:
    async with _serving(FreezingProxy(0, real_port)) as proxy:
        yield proxy
