"""Test seams: a websocket server the test speaks for (over real sockets or in memory),
and proxies in front of the real server.

:class:`FakeSockets` accepts websockets and hands each one to the test as a
:class:`Session`, which sends whatever the test wants (malformed frames included) and
reads what the client sends. :func:`fake_sockets` accepts them on a free port;
:func:`memory_sockets` accepts them without a socket, as Trio's own tests do: its
:meth:`MemorySockets.open_stream` is the clients' ``open_stream`` seam (see
:mod:`trioworker._websocket`), and returns one end of :func:`trio.testing.memory_stream_pair`
while the fake serves the other with trio-websocket's ``wrap_server_stream``.

:class:`Proxy` listens on another free port and routes each TCP connection by the path of
its first request: chosen paths to the fake, the rest to the real server;
:attr:`Proxy.rest_down` makes it drop REST connections (as a server restart does). A worker
pointed at the proxy thus holds a subscription the test controls and makes real REST
calls, which can fail on demand. :class:`CuttingProxy` forwards every
connection to the real server but cuts creates mid-call, the ways a network can.
:class:`OutageProxy` stands in front of a database that restarts or goes down.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Protocol, TypeVar

import attrs
import orjson
import trio
import trio.testing
from trio_websocket import WebSocketConnection, WebSocketRequest, serve_websocket, wrap_server_stream

from trioworker.models import StateType, TaskRun, converter, make_state

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
    #: The byte stream under the websocket, where the fake owns it (in memory).
    stream: trio.abc.Stream | None = None

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

    async def cut(self) -> None:
        """Drop the connection as a network does: the stream closes, with no close handshake
        (the client sees an abnormal close, 1006). In-memory sessions only."""
        assert self.stream is not None, "only a session of memory_sockets() can be cut"
        await trio.aclose_forcefully(self.stream)


@attrs.define(eq=False)
class FakeSockets:
    """The websockets the fake accepted, in order; ``port`` is where it listens (0 in memory)."""

    port: int
    sessions: trio.MemoryReceiveChannel[Session]

    async def next(self) -> Session:
        with trio.fail_after(10):
            return await self.sessions.receive()


async def _hold(
    request: WebSocketRequest, stream: trio.abc.Stream | None, send: trio.MemorySendChannel[Session]
) -> None:
    """Accept ``request`` and hand the session to the test, until it ends the session."""
    ws = await request.accept()
    session = Session(ws, request.path, stream=stream)
    send.send_nowait(session)
    await session.done.wait()  # the test ends the session (or the fake's nursery does)


@asynccontextmanager
async def fake_sockets() -> AsyncIterator[FakeSockets]:
    send, receive = trio.open_memory_channel[Session](math.inf)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            serve_websocket, partial(_hold, stream=None, send=send), "127.0.0.1", 0, None
        )
        yield FakeSockets(server.port, receive)
        nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class MemorySockets(FakeSockets):
    """:class:`FakeSockets` without a socket: give clients :meth:`open_stream`."""

    nursery: trio.Nursery
    send: trio.MemorySendChannel[Session]
    #: What each connection asked for: ``(host, port, secure)``, in order.
    opened: list[tuple[str, int, bool]] = attrs.field(factory=list)

    async def open_stream(self, host: str, port: int, secure: bool) -> trio.abc.Stream:
        """The ``open_stream`` seam: a fresh in-memory connection to the fake."""
        self.opened.append((host, port, secure))
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, server, self.send)
        return client

    @staticmethod
    async def _serve(stream: trio.abc.Stream, send: trio.MemorySendChannel[Session]) -> None:
        async with stream, trio.open_nursery() as nursery:
            # Waits for the client's handshake (forever, if the client goes away first:
            # the fake's nursery ends it).
            request = await wrap_server_stream(nursery, stream)
            await _hold(request, stream, send)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def memory_sockets() -> AsyncIterator[MemorySockets]:
    send, receive = trio.open_memory_channel[Session](math.inf)
    async with trio.open_nursery() as nursery:
        yield MemorySockets(0, receive, nursery, send)
        nursery.cancel_scope.cancel()


# -- the server's part of the subscription protocol, for tests that speak it


def delivered(key: str, parameters: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A run as the server delivers it (PENDING)."""
    run = TaskRun(
        id=uuid.uuid4(),
        task_key=key,
        name=key,
        state=make_state(StateType.PENDING),
        parameters=parameters or {},
    )
    out: dict[str, Any] = converter.unstructure(run)
    out.update(fields)
    return out


async def answer_states(
    session: Session,
    until: dict[str, str],
    seen: list[dict[str, Any]],
    reported: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Answer every state report with ACCEPT until each run in ``until`` reported its state
    type; returns the last state reported per run. Other messages go to ``seen``; every
    state type reported is appended, per run id, to ``reported``."""
    last: dict[str, Any] = {}
    while any(last.get(run_id, {}).get("type") != kind for run_id, kind in until.items()):
        message = await session.receive_type("states", seen)
        results = []
        for entry in message["states"]:
            last[entry["id"]] = entry["state"]
            if reported is not None:
                reported.setdefault(entry["id"], []).append(entry["state"]["type"])
            results.append({"id": entry["id"], "ref": entry["ref"], "status": "ACCEPT", "details": None})
        await session.send({"type": "state_results", "results": results})
    return last


async def quit_when_asked(session: Session) -> None:
    """Play the server's part of a clean quit."""
    await session.receive_type("quit")
    await session.ws.aclose()


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
            route = path.split(b"?", 1)[0].rstrip(b"/")  # a batch is sent with ?partial=true
            create = method == b"POST" and route.endswith((b"/task_runs", b"/task_runs/batch"))
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


@attrs.define(eq=False)
class OutageProxy:
    """Forwards TCP connections to ``real_port`` (a database) until told otherwise:
    :meth:`drop` cuts every open connection (as a restart of the database does);
    :meth:`sever` cuts them on the client's side only (a network that failed: the database
    does not notice, and its sessions live on); while :attr:`refusing`, new connections are
    closed at once (the database is down)."""

    port: int
    real_port: int
    refusing: bool = False
    #: Connections accepted so far (including refused ones).
    accepted: int = 0
    _open: dict[trio.CancelScope, tuple[trio.SocketStream, trio.Event]] = attrs.field(factory=dict)
    #: The database's ends of severed connections, open until the proxy closes.
    _orphans: list[trio.SocketStream] = attrs.field(factory=list)

    def drop(self) -> None:
        for scope in self._open:
            scope.cancel()

    def sever(self) -> None:
        self._orphans += [upstream for upstream, _ in self._open.values()]
        self.drop()

    async def cut(self) -> None:
        """:meth:`drop`, and wait until every connection is closed."""
        closed = [done for _, done in self._open.values()]
        self.drop()
        for done in closed:
            await done.wait()

    async def handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        async with client:
            if self.refusing:
                return
            upstream = await trio.open_tcp_stream("127.0.0.1", self.real_port)
            scope, done = trio.CancelScope(), trio.Event()
            self._open[scope] = (upstream, done)
            try:
                with scope:
                    async with trio.open_nursery() as nursery:

                        async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                            with contextlib.suppress(*GONE):
                                while chunk := await source.receive_some(65536):
                                    await sink.send_all(chunk)
                            nursery.cancel_scope.cancel()

                        nursery.start_soon(pump, client, upstream)
                        nursery.start_soon(pump, upstream, client)
            finally:
                del self._open[scope]
                if upstream not in self._orphans:
                    await trio.aclose_forcefully(upstream)
                await trio.aclose_forcefully(client)
                done.set()

    async def aclose(self) -> None:
        for orphan in self._orphans:
            await trio.aclose_forcefully(orphan)


@asynccontextmanager
async def outage_proxy(real_port: int) -> AsyncIterator[OutageProxy]:
    async with _serving(OutageProxy(0, real_port)) as proxy:
        try:
            yield proxy
        finally:
            await proxy.aclose()
