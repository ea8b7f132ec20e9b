"""The websocket plumbing both clients share: opening a socket, reading one protocol
message, the errors that drop a connection, and which of them move a client to the next
server (:func:`connection_failure`; the backoff and the failover rule are
:mod:`trioworker.servers`).

The worker's subscription (:mod:`trioworker.worker.subscription`) and the submitter's
channel (:mod:`trioworker.client.channel`) speak different halves of the protocol over the
same kind of connection; what they have in common lives here, once.

TLS and the extra headers of the handshake are the client's
:class:`~trioworker.connection.ConnectionOptions`, the same as its REST calls use.

**Test seam:** the byte stream under a websocket is opened by an :data:`OpenStream`
(:meth:`ConnectionOptions.open_stream <trioworker.connection.ConnectionOptions.open_stream>`,
TCP and TLS, unless told otherwise). Tests pass one that returns an end of
:func:`trio.testing.memory_stream_pair` and speak the server's part on the other end, as
Trio's own tests do: the whole client runs, without a socket.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final, TypeAlias

import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    WebSocketConnection,
    wrap_client_stream,
)

from trioworker._util import only_exception
from trioworker.connection import ConnectionOptions, connection_options
from trioworker.models import JSON
from trioworker.protocol import CLOSE_POLICY, CLOSE_PROTOCOL

# The backoff (defined here first) is the failover rule's now; its names stay here too.
from trioworker.servers import BACKOFF_FACTOR as BACKOFF_FACTOR
from trioworker.servers import BACKOFF_FIRST as BACKOFF_FIRST
from trioworker.servers import BACKOFF_MAX as BACKOFF_MAX
from trioworker.servers import FAILOVER_STATUSES
from trioworker.servers import next_backoff as next_backoff

#: Largest message accepted from the server (a delivery of many runs can be large).
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
#: Seconds to open a socket (TCP, TLS and the websocket handshake) before giving up.
CONNECT_TIMEOUT: Final = 10.0


#: Opens the byte stream a websocket runs over: ``(host, port, secure) -> stream``, where
#: ``secure`` asks for TLS (a ``wss://`` URL). Raises OSError when it cannot.
OpenStream: TypeAlias = Callable[[str, int, bool], Awaitable[trio.abc.Stream]]


@asynccontextmanager
async def connect(
    url: str,
    *,
    open_stream: OpenStream | None = None,
    connection: ConnectionOptions | None = None,
    api_key: str | None = None,
) -> AsyncIterator[WebSocketConnection]:
    """Open a websocket to ``url`` (``ws://`` or ``wss://``); its byte stream is ours and is
    always closed on the way out.

    trio-websocket 0.12 leaves the stream open when the server closed first or refused the
    handshake (an HTTP error status); owning the stream keeps a reconnecting client from
    leaking one socket per attempt.

    Args:
        open_stream: opens the stream under the websocket (a test seam, see the module
            docstring); the default is ``connection``'s: TCP, with TLS for ``wss://``.
        connection: TLS and the handshake's extra headers (default: from the environment,
            see :func:`~trioworker.connection.connection_options`).
        api_key: sent as ``Authorization: Bearer KEY`` in the handshake, winning over an
            extra header of that name (:meth:`~trioworker.connection.ConnectionOptions.websocket_headers`);
            the server reads it from the auth message the caller sends.

    Raises:
        OSError: the stream could not be opened (TCP or TLS failed).
        HandshakeError: the handshake was refused (:class:`ConnectionRejected`) or took
            longer than CONNECT_TIMEOUT (:class:`ConnectionTimeout`).
    """
    connection = connection or connection_options(warn=False)
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with trio.move_on_after(CONNECT_TIMEOUT) as opening:
        stream = await (open_stream or connection.open_stream)(host, port, secure)
    if opening.cancelled_caught:
        raise ConnectionTimeout
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(CONNECT_TIMEOUT) as handshake:
                ws = await wrap_client_stream(
                    nursery,
                    # Annotated as a socket or TLS stream, but any trio.abc.Stream works
                    # (trio-websocket's docstring says so; it only reads addresses off sockets).
                    stream,  # type: ignore[arg-type]
                    host if port in (80, 443) else f"{host}:{port}",
                    resource,
                    extra_headers=connection.websocket_headers(api_key),
                    message_queue_size=64,
                    max_message_size=MAX_MESSAGE_BYTES,
                )
            if handshake.cancelled_caught:
                raise ConnectionTimeout
            try:
                yield ws
            except BaseException as exc:  # remembered, to be re-raised unwrapped below
                body_error = exc
                raise
            finally:
                try:
                    # A close handshake, unless we are cancelled (then the stream is just
                    # closed) or the server stopped answering (no one would answer it).
                    if not isinstance(body_error, Unresponsive):
                        with trio.move_on_after(CONNECT_TIMEOUT):
                            await ws.aclose()
                finally:
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        single = only_exception(group)
        if single is None:
            raise
        if single is body_error or not isinstance(single, trio.Cancelled):
            raise single from None
        raise
    finally:
        await trio.aclose_forcefully(stream)


def connection_failure(exc: BaseException) -> bool:
    """Whether ``exc``, which ended a websocket connection or kept one from being made,
    is the server going away (the client moves to the next server) rather than its
    answer (the client stays): a close with 1008 (API key refused) or 4001 (protocol
    broken by the client), and a refused handshake other than 502/503/504, are answers;
    everything else (refused, reset, timed out, lost, closed with 1012, malformed) is the
    server's going."""
    if isinstance(exc, ConnectionClosed):
        return exc.reason is None or exc.reason.code not in (CLOSE_POLICY, CLOSE_PROTOCOL)
    if isinstance(exc, ConnectionRejected):
        return exc.status_code in FAILOVER_STATUSES
    return True


class Disconnected(Exception):
    """The socket was lost; the session reconnects."""


class Unresponsive(Disconnected):
    """The server answered no ping in time: the connection is dropped without a close
    handshake and made again."""


class MalformedMessage(Disconnected):
    """The server sent something the protocol does not allow: the connection is dropped
    (closed with 1002) and made again."""


def parse_message(raw: str | bytes) -> dict[str, JSON]:
    """One text frame as a JSON object with a string ``"type"``; else :class:`MalformedMessage`."""
    if not isinstance(raw, str):
        raise MalformedMessage("the server sent a binary frame (the protocol uses text frames)")
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise MalformedMessage(f"the server sent malformed JSON: {clip(raw)}") from None
    if not isinstance(message, dict):
        raise MalformedMessage(f"the server sent JSON that is not an object: {clip(raw)}")
    if not isinstance(message.get("type"), str):
        raise MalformedMessage(f'the server sent a message without a string "type": {clip(raw)}')
    return message


def clip(raw: str, limit: int = 80) -> str:
    """``raw`` for an error message: its repr, cut to ``limit`` characters."""
    return repr(raw if len(raw) <= limit else raw[:limit] + "...")


def explain_error(exc: BaseException) -> str:
    """One line for a parse error (cattrs groups become their first leaf)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyError) else f"missing {exc}"
    return text.splitlines()[0][:200] if text else type(exc).__name__
