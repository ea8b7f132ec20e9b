"""What the server's websockets share: the connection on hypercorn's ASGI events
(:class:`AsgiWebsocket`), JSON messages, closing, authentication, and turning request
bodies into validated models (shared with the REST routes). The close codes and message
types are :mod:`trioworker.protocol`'s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import cattrs
import orjson
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, WebsocketScope

from trioworker import protocol
from trioworker.models import JSON, SetStateRequest, StateType, TaskRunCreate, converter, make_state
from trioworker.protocol import MAX_CACHE_KEY_LENGTH, SERIALIZER_JSON, SERIALIZER_PICKLE
from trioworker.server.fence import Fence

log = logging.getLogger("trioworker.server")

#: How long a new connection may take to authenticate (and subscribe).
HANDSHAKE_TIMEOUT: Final = 10.0
#: The longest task key, idempotency key, run name and tag, in characters (an index of
#: PostgreSQL holds a pair of keys; names and tags are shown in tables and pages).
MAX_KEY_LENGTH: Final = 200
#: The most tags one run may have.
MAX_TAGS: Final = 100
#: The longest cache expiration a create may ask for: 100 years, in seconds.
MAX_CACHE_EXPIRATION: Final = 100 * 365.25 * 86400
#: The longest ``state_details.delay_seconds`` a state proposal may ask for: 100 years.
MAX_DELAY_SECONDS: Final = 100 * 365 * 86400


class Refusal(Exception):
    """A request the API refuses, with the status code and the sentence the client gets
    (which the client raises as :class:`trioworker.ApiError`)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    def body(self) -> dict[str, JSON]:
        """The answer's JSON object (``{"detail": ...}``, and what a kind of refusal adds)."""
        return {"detail": self.detail}

    def headers(self) -> dict[str, str]:
        """Headers of the HTTP answer (e.g. ``Retry-After``)."""
        return {}


class ProtocolViolation(Exception):
    """A websocket client broke the protocol; the socket closes with 4001."""


class ConnectionGone(Exception):
    """The socket closed under us (the peer left); the session ends quietly."""


def describe(exc: Exception) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc))
    return str(exc)


def structure(data: JSON, cls: type[object], what: str) -> object:
    try:
        return converter.structure(data, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise Refusal(422, f"invalid {what}: {describe(exc)}") from None


def with_state_name(proposal: JSON) -> JSON:
    """A ``{"state": {...}, ...}`` proposal whose state has a type but no name (missing, null
    or ``""``) gets the type's name (``COMPLETED`` -> ``"Completed"``), as Prefect's clients
    expect. Anything else is returned as it is, for validation to judge.

    Raises:
        ValueError: ``state`` is not an object, or its ``type`` is missing or not a state
            type (one line naming ``state.type``, the value and the valid types; not the
            ``name``, which follows from the type).
    """
    if not isinstance(proposal, dict):
        return proposal
    state = proposal.get("state")
    if "state" in proposal and not isinstance(state, dict):
        raise ValueError(f'state must be an object with a "type", got {type(state).__name__}')
    if not isinstance(state, dict):
        return proposal
    value = state.get("type")
    if not isinstance(value, str) or value not in StateType.__members__:
        shown = "missing" if "type" not in state else f"{value!r}"
        raise ValueError(f"state.type is {shown}; it must be one of {', '.join(StateType.__members__)}")
    if state.get("name") not in (None, ""):
        return proposal
    kind = StateType(value)
    return {**proposal, "state": {**state, "name": make_state(kind).name}}


def validate_state_request(proposal: SetStateRequest) -> None:
    """Check the numbers of a structured state proposal the server computes with.

    ``state_details.delay_seconds`` must be finite and at most :data:`MAX_DELAY_SECONDS`;
    zero or negative means due now. (Times are checked when they are parsed.)

    Raises:
        ValueError: one line naming the field and its bounds.
    """
    delay = proposal.state.state_details.delay_seconds
    if delay is not None and not (math.isfinite(delay) and delay <= MAX_DELAY_SECONDS):
        raise ValueError(
            f"state_details.delay_seconds must be a number of seconds of at most {MAX_DELAY_SECONDS} "
            f"(zero or negative: due now), got {delay!r}"
        )


def validate_create(create: TaskRunCreate) -> None:
    """Check what the models cannot say of a create: lengths, NUL, the serializer and the
    parameters' shape.

    Raises:
        Refusal: 422, one line naming the field and its bound.
    """
    if not create.task_key or len(create.task_key) > MAX_KEY_LENGTH:
        raise Refusal(422, f"task_key must be a non-empty string of at most {MAX_KEY_LENGTH} characters")
    for name, text in (("idempotency_key", create.idempotency_key), ("name", create.name)):
        if text is not None and len(text) > MAX_KEY_LENGTH:
            raise Refusal(422, f"{name} must be at most {MAX_KEY_LENGTH} characters, got {len(text)}")
    if len(create.tags) > MAX_TAGS:
        raise Refusal(422, f"tags: a run may have at most {MAX_TAGS} tags, got {len(create.tags)}")
    for n, tag in enumerate(create.tags):
        if len(tag) > MAX_KEY_LENGTH:
            raise Refusal(422, f"tags[{n}] must be at most {MAX_KEY_LENGTH} characters, got {len(tag)}")
    # Keys are looked up in the store, and PostgreSQL text holds no NUL: none, in every store.
    for name, key in (("task_key", create.task_key), ("idempotency_key", create.idempotency_key)):
        if key is not None and "\x00" in key:
            raise Refusal(422, f"{name} must not contain NUL (\\u0000)")
    if any("\x00" in tag for tag in create.tags):
        raise Refusal(422, "tags must not contain NUL (\\u0000)")
    if create.cache_key is not None and (
        not create.cache_key or len(create.cache_key) > MAX_CACHE_KEY_LENGTH or "\x00" in create.cache_key
    ):
        raise Refusal(
            422,
            f"cache_key must be a non-empty string of at most {MAX_CACHE_KEY_LENGTH} characters, without NUL",
        )
    expiration = create.cache_expiration
    if expiration is not None and not (math.isfinite(expiration) and 0 <= expiration <= MAX_CACHE_EXPIRATION):
        raise Refusal(
            422, f"cache_expiration must be a number of seconds between 0 and {MAX_CACHE_EXPIRATION:g}"
        )
    if create.serializer not in protocol.SERIALIZERS:
        raise Refusal(
            422, f"unknown serializer {create.serializer!r}; expected one of {sorted(protocol.SERIALIZERS)}"
        )
    if create.serializer == SERIALIZER_JSON and not isinstance(create.parameters, dict):
        raise Refusal(422, "parameters must be a JSON object (name -> value) with the json serializer")
    if create.serializer == SERIALIZER_PICKLE and not isinstance(create.parameters, str):
        raise Refusal(422, "parameters must be a base64 string with the pickle serializer")


def creates_from(items: list[JSON]) -> list[TaskRunCreate]:
    creates: list[TaskRunCreate] = []
    for index, item in enumerate(items):
        create = structure(item, TaskRunCreate, f"task run #{index}" if len(items) > 1 else "task run")
        assert isinstance(create, TaskRunCreate)
        validate_create(create)
        creates.append(create)
    return creates


#: The close reason when the first message is not ``{"type": "auth", ...}``.
EXPECTED_AUTH: Final = """Expected 'auth' message: the first message must be {"type": "auth", "token": ...}"""


def _auth_message(raw: str | bytes) -> dict[str, JSON] | None:
    """The first message as an auth message, or None: a binary frame is not one."""
    if not isinstance(raw, str):
        return None
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(message, dict) and message.get("type") == protocol.AUTH:
        return message
    return None


class AsgiWebsocket:
    """One websocket handshake and connection, served on hypercorn's ASGI events.

    A message costs one hop: hypercorn puts its event in the connection's channel and
    :meth:`receive` takes it from there (quart-trio moved each one through a task and a
    queue of its own first). Nothing here reads the socket in the background: the peer's
    leaving is seen by the next :meth:`receive`.

    ``scope`` is ASGI's websocket scope; ``receive`` and ``send`` are the server's ASGI
    callables of that connection.
    """

    def __init__(self, scope: WebsocketScope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        #: The handshake was accepted (:meth:`accept`).
        self.accepted = False
        #: We closed it, or answered the handshake with an HTTP response (:meth:`reject`).
        self.closed = False
        #: The peer left (ASGI's ``websocket.disconnect`` was received).
        self.gone = False

    @property
    def path(self) -> str:
        """The request's path (percent-decoded, without the query)."""
        return self.scope["path"]

    @property
    def scheme(self) -> str:
        """``ws`` or ``wss``."""
        return self.scope["scheme"]

    def header(self, name: str) -> str | None:
        """The first value of the handshake's header ``name`` (any case), or None."""
        key = name.lower().encode("latin1")
        for header, value in self.scope["headers"]:
            if header.lower() == key:
                return value.decode("latin1")
        return None

    async def accept(self) -> None:
        """Accept the handshake (no subprotocol, no extra headers); again: nothing."""
        if not self.accepted:
            self.accepted = True
            await self._send({"type": "websocket.accept", "subprotocol": None, "headers": []})

    async def reject(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        """Answer the handshake, not yet accepted, with an HTTP response: ``status`` and
        ``body`` (a server without ASGI's ``websocket.http.response`` answers 403, empty)."""
        self.closed = True
        if "websocket.http.response" not in (self.scope.get("extensions") or {}):
            await self._send({"type": "websocket.close", "code": protocol.CLOSE_NORMAL, "reason": None})
            return
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        await self._send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await self._send({"type": "websocket.http.response.body", "body": body, "more_body": False})

    async def receive(self) -> str | bytes:
        """The next message: a text frame's ``str`` or a binary frame's ``bytes``.

        Raises:
            ConnectionGone: the peer left (at once on every call after that).
        """
        while not self.gone:
            event = await self._receive()
            if event["type"] == "websocket.receive":
                text = event.get("text")
                if text is not None:
                    return text
                return event.get("bytes") or b""
            if event["type"] == "websocket.disconnect":
                self.gone = True
            # ``websocket.connect`` (the first event): nothing to take.
        raise ConnectionGone("the peer closed the socket")

    async def send(self, text: str) -> None:
        """Send ``text`` as one text frame.

        Raises:
            ConnectionGone: the socket is closed (by us or the peer), or the server
                refuses the send.
        """
        if self.closed or self.gone:
            raise ConnectionGone("send on a closed socket")
        try:
            await self._send({"type": "websocket.send", "bytes": None, "text": text})
        except Exception as exc:  # hypercorn refuses sends on a socket it closed
            raise ConnectionGone from exc

    async def close(self, code: int, reason: str | None = None) -> None:
        """Close with ``code`` and ``reason`` (at most 123 bytes of UTF-8).

        Raises:
            RuntimeError: it was closed already.
        """
        if self.closed:
            raise RuntimeError("the socket is closed already")
        self.closed = True
        await self._send({"type": "websocket.close", "code": code, "reason": reason})


class JsonSocket:
    """A websocket (an :class:`AsgiWebsocket`) speaking one JSON object per frame."""

    def __init__(
        self,
        socket: AsgiWebsocket,
        token_ok: Callable[[object], bool],
        closing: trio.Event,
        fence: Fence | None = None,
    ) -> None:
        self.socket = socket
        self.token_ok = token_ok
        self.closing = closing
        #: Raised, this socket closes as when the server stops (see :mod:`trioworker.server.fence`).
        self.fence = Fence() if fence is None else fence
        self.send_lock = trio.StrictFIFOLock()

    async def send(self, payload: Mapping[str, JSON]) -> None:
        """Send ``payload`` as one JSON text frame (sends of several tasks in turn).

        Raises:
            ConnectionGone: the socket is closed.
        """
        data = orjson.dumps(payload).decode()
        # Uncontended (nearly always), the lock is taken without the scheduler pass of
        # ``acquire`` (the send below checkpoints anyway).
        try:
            self.send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self.send_lock.acquire()
        try:
            await self.socket.send(data)
        finally:
            self.send_lock.release()

    async def close(self, code: int, reason: str) -> None:
        # A close frame's reason has room for 123 bytes.
        try:
            await self.socket.close(code, reason.encode()[:123].decode(errors="ignore"))
        except Exception:
            log.debug("close(%d) on a socket that was already closed", code)

    async def receive(self) -> dict[str, JSON]:
        raw = await self.socket.receive()
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ProtocolViolation("malformed JSON") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise ProtocolViolation('every message must be a JSON object with a string "type"')
        return message

    async def authenticate(self) -> bool:
        """The auth step; False (after closing with 1008) when the first message is not an
        auth message (not text, not JSON, not an object, no or another ``type``) or its
        token is refused.
        """
        auth = _auth_message(await self.socket.receive())
        if auth is None:
            await self.close(protocol.CLOSE_POLICY, EXPECTED_AUTH)
            return False
        if not self.token_ok(auth.get("token")):
            await self.close(protocol.CLOSE_POLICY, "Unauthorized: missing or wrong API key")
            return False
        await self.send({"type": protocol.AUTH_SUCCESS})
        return True

    async def serve_authenticated(self, session: Callable[[trio.Nursery], Awaitable[None]]) -> None:
        """Authenticate, then run ``session(nursery)``: it may start its tasks in that
        nursery, beside one that closes the socket with 1012 when the server stops; when
        it returns, they are cancelled.

        **Error handling:** a :class:`ProtocolViolation` (or no auth within
        :data:`HANDSHAKE_TIMEOUT`) closes the socket with 4001 and its sentence; a
        :class:`ConnectionGone` ends it quietly; anything else propagates.
        """
        violation: str | None = None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                if not await self.authenticate():
                    return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.close_on_shutdown, nursery.cancel_scope)
                await session(nursery)
                nursery.cancel_scope.cancel()
        except* ProtocolViolation as group:
            violation = str(group.exceptions[0])
        except* trio.TooSlowError:
            violation = f"no auth within {HANDSHAKE_TIMEOUT:g} s"
        except* ConnectionGone:
            pass
        if violation is not None:
            await self.close(protocol.CLOSE_PROTOCOL, f"Protocol violation: {violation}")

    async def close_on_shutdown(self, scope: trio.CancelScope) -> None:
        """Once the server stops or its fence is raised: cancel ``scope`` and close with 1012."""
        reasons: list[str] = []
        async with trio.open_nursery() as nursery:

            async def stopping() -> None:
                await self.closing.wait()
                reasons.append("the server is stopping")
                nursery.cancel_scope.cancel()

            async def fenced() -> None:
                reasons.append(await self.fence.wait_raised())
                nursery.cancel_scope.cancel()

            nursery.start_soon(stopping)
            nursery.start_soon(fenced)
        scope.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await self.close(protocol.CLOSE_RESTART, reasons[0])
