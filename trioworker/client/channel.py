"""The submitter's side of the client channel (see :mod:`trioworker.server.channel`).

Inside ``async with trioworker.connect():`` creates and waits for ended runs travel over
one websocket instead of one HTTP request each: about 0.1 ms a message instead of about
1.4 ms a request. The channel's task lives in ``connect()``'s nursery. If the socket is
lost, or the server sends a malformed message (the socket is then closed with 1002),
what was in flight fails with ServerUnavailable (the client then carries waits and
creates on over HTTP: a create is sent again with the same run ids, which the server
answers with the runs it made), calls go over HTTP meanwhile, and the channel is opened
again with backoff. User code never sees a parse error.

Once a run was waited for here, creates ask to be watched from the start (``"watch":
true``): each end is pushed as it happens, so an awaited result costs no watch message,
and an end that comes before its future waits is kept for it as long as the run object
the create answered (which the future holds) lives. An older server ignores the field;
waits then watch as before.

With several servers, the channel follows the failover rule of :mod:`trioworker.servers`
on the :class:`~trioworker.servers.Servers` it shares with its client: a lost connection
(a close with 1012 included) opens it again on the next server at once; backoff comes
after a whole round failed. A close with 1008 (the API key refused) keeps it where it is.
"""

from __future__ import annotations

import itertools
import logging
import random
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Final

import attrs
import cattrs
import orjson
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection

from trioworker import protocol
from trioworker._util import only_exception
from trioworker._websocket import (
    MalformedMessage,
    OpenStream,
    connection_failure,
    explain_error,
    parse_message,
)
from trioworker._websocket import connect as open_socket
from trioworker.connection import ConnectionOptions, connection_options, tls_failure
from trioworker.errors import NotFound, QueueFull, ServerUnavailable, api_error
from trioworker.models import JSON, TaskRun, TaskRunCreate, converter
from trioworker.protocol import CHANNEL_PATH, CLOSE_PROTOCOL_ERROR, socket_url
from trioworker.servers import ApiUrls, Rounds, Servers, UsesServers, as_servers

log = logging.getLogger("trioworker.client.channel")

#: Seconds to wait for the server's answer to the auth message.
AUTH_TIMEOUT: Final = 10.0
#: What ends one connection of the channel (it is then opened again).
_LOST = (OSError, HandshakeError, ConnectionClosed, ConnectionError, trio.TooSlowError, MalformedMessage)


def channel_url(api_url: str) -> str:
    """``http(s)://host[/api]`` -> ``ws(s)://host/api/task_runs/channel`` (one rule: api_root)."""
    return socket_url(api_url, CHANNEL_PATH)


@attrs.define(eq=False)
class _PendingCreate:
    done: trio.Event = attrs.field(factory=trio.Event)
    runs: list[TaskRun] = attrs.field(factory=list)
    error: Exception | None = None
    #: The server watches the runs that have not ended (``"watched": true``).
    watched: bool = False


@attrs.define(eq=False)
class _Created:
    """A run created watched: the server pushes its end unasked.

    Kept as long as the run as the create answered it (``TaskRun``, which its future holds)
    lives, by a weak reference; its end, once pushed, with it.
    """

    #: The run as created; None while the create is in flight.
    ref: weakref.ref[TaskRun] | None = None
    ended: TaskRun | None = None
    missing: bool = False

    @property
    def settled(self) -> bool:
        return self.ended is not None or self.missing


@attrs.define(eq=False)
class _RoomWait:
    """A refused create waiting for the server to say its key's queue has room."""

    ref: int
    done: trio.Event = attrs.field(factory=trio.Event)
    #: How many runs fit then; None when the channel was lost first.
    room: int | None = None


@attrs.define(eq=False)
class _Watch:
    done: trio.Event = attrs.field(factory=trio.Event)
    run: TaskRun | None = None
    missing: bool = False
    waiters: int = 0
    #: The connection was lost before the run was settled: waiters fall back to HTTP.
    dropped: bool = False


@attrs.define(eq=False)
class ClientChannel(UsesServers):
    """The channel, reopened when lost. Use :func:`open_channel`; check :attr:`usable`
    before each use (while it is being reopened, calls go over HTTP).

    ``api_url`` (one URL, several, or a :class:`~trioworker.servers.Servers` to share) is
    kept as :attr:`servers`; :attr:`api_url` is the server in use.
    """

    ws: WebSocketConnection | None
    servers: Servers = attrs.field(converter=as_servers, alias="api_url")
    api_key: str | None = None
    #: What ended the last connection; None while one is open.
    broken: Exception | None = None
    #: Times the channel was opened again after a loss.
    reopened: int = 0
    rng: random.Random = attrs.field(factory=random.Random)
    _lost: trio.Event = attrs.field(factory=trio.Event)
    _open: trio.Event = attrs.field(factory=trio.Event)
    _refs: itertools.count[int] = attrs.field(factory=itertools.count)
    _calls: dict[int, _PendingCreate] = attrs.field(factory=dict)
    _watches: dict[uuid.UUID, _Watch] = attrs.field(factory=dict)
    _to_watch: list[uuid.UUID] = attrs.field(factory=list)
    #: Whether creates ask to be watched (``"watch": true``): set once a run was waited
    #: for here (:meth:`wait`), so that a process that awaits its results gets each end
    #: pushed without a watch message, and one that only submits costs nothing more.
    watch_creates: bool = False
    #: The runs the server watches since their create, by id (see :class:`_Created`).
    _created: dict[uuid.UUID, _Created] = attrs.field(factory=dict)
    #: Refused creates (by ref) whose refusal promised a ``room`` message.
    _room_waits: dict[int, _RoomWait] = attrs.field(factory=dict)
    #: The same waits, by the QueueFull raised for the refusal (see :meth:`wait_room`).
    _room_of: weakref.WeakKeyDictionary[QueueFull, _RoomWait] = attrs.field(factory=weakref.WeakKeyDictionary)
    _flushing: bool = False
    #: The API root of the connection open now, or tried last.
    _url: str = attrs.field(default="", init=False)
    #: TLS and the handshake's extra headers (see :mod:`trioworker.connection`).
    connection: ConnectionOptions = attrs.field(factory=connection_options, kw_only=True)
    #: A test seam: opens the byte stream under each connection (see trioworker._websocket).
    _open_stream: OpenStream | None = attrs.field(default=None, kw_only=True)

    @property
    def usable(self) -> bool:
        return self.broken is None and self.ws is not None

    async def wait_usable(self) -> None:
        """Wait until the channel is open (again, after a loss)."""
        await self._open.wait()

    async def _send(self, message: dict[str, JSON]) -> None:
        ws = self.ws
        if ws is None or self.broken is not None:
            raise self._unavailable()
        try:
            await ws.send_message(orjson.dumps(message).decode())
        except ConnectionClosed as exc:
            self._break(exc)
            raise self._unavailable() from exc

    def _unavailable(self) -> ServerUnavailable:
        why = "" if self.broken is None else f": {self.broken}"
        return ServerUnavailable(f"the channel to {self._url or self.api_url} was lost{why}")

    async def create(
        self, creates: Sequence[TaskRunCreate], *, partial: bool = False, watch: bool | None = None
    ) -> list[TaskRun]:
        """Create runs; returns them in order.

        ``watch`` (default :attr:`watch_creates`): ask the server to push the runs' ends
        unasked, so that :meth:`wait` needs no watch message; a run whose end came before
        the answer is returned ended. An older server ignores it (the waits then watch).

        Raises:
            ApiError: the server refused them (422, 409); :class:`QueueFull` for a full
                queue, which, ``partial``, carries the runs of the creates that fit, made
                (see :meth:`wait_room`).
            ServerUnavailable: the channel was lost before the answer came.
        """
        ref = next(self._refs)
        call = self._calls[ref] = _PendingCreate()
        message: dict[str, JSON] = {
            "type": protocol.CREATE,
            "ref": ref,
            "task_runs": converter.unstructure(list(creates)),
        }
        if partial:
            message["partial"] = True
        pending: dict[uuid.UUID, _Created] = {}
        if self.watch_creates if watch is None else watch:
            message["watch"] = True
            # Before sending: an end may come before the answer.
            for create in creates:
                if create.id is not None and create.id not in self._created:
                    pending[create.id] = self._created[create.id] = _Created()
        try:
            await self._send(message)
            await call.done.wait()
            if call.error is None and call.watched:
                return self._adopt_created(call.runs, pending)
        finally:
            self._calls.pop(ref, None)
            for run_id, created in pending.items():  # not watched (an older server), or failed
                self._drop_created(run_id, created)
        if call.error is not None:
            raise call.error
        return call.runs

    def _adopt_created(self, runs: list[TaskRun], pending: dict[uuid.UUID, _Created]) -> list[TaskRun]:
        """The runs of a watched create as answered (its ids' entries taken out of
        ``pending``): tie what is kept of each to it (see :class:`_Created`); a run whose
        end came first is returned ended."""
        answered: list[TaskRun] = []
        for run in runs:
            created = pending.pop(run.id, None)
            if created is None:
                # Another run (an idempotency key's), watched too, unless something else
                # keeps it already.
                if run.id not in self._created and not run.state.is_terminal:
                    self._created[run.id] = _Created(weakref.ref(run, self._forget_created(run.id)))
                answered.append(run)
            elif created.settled or run.state.is_terminal:
                self._drop_created(run.id, created)
                answered.append(created.ended or run)
            else:
                created.ref = weakref.ref(run, self._forget_created(run.id))
                answered.append(run)
        return answered

    def _drop_created(self, run_id: uuid.UUID, created: _Created) -> None:
        if self._created.get(run_id) is created:
            del self._created[run_id]

    def _forget_created(self, run_id: uuid.UUID) -> Callable[[weakref.ref[TaskRun]], None]:
        """The weak reference's callback: forget ``run_id`` once its run object is gone."""

        def forget(ref: weakref.ref[TaskRun]) -> None:
            created = self._created.get(run_id)
            if created is not None and created.ref is ref:
                del self._created[run_id]

        return forget

    def ended(self, run_id: uuid.UUID) -> TaskRun | None:
        """The run's end as the server pushed it for a watched create, if it came; None
        if not (yet). Raises NotFound when the server said it is gone."""
        created = self._created.get(run_id)
        if created is None:
            return None
        if created.missing:
            raise NotFound(404, f"no task run {run_id} (deleted?)")
        return created.ended

    async def wait_room(self, full: QueueFull) -> int | None:
        """Wait until the server says the queue that refused ``full`` (raised by
        :meth:`create`) has room: how many runs fit then. None at once when its refusal
        promised no ``room`` message (an older server; several servers), and as soon as
        the channel is lost."""
        wait = self._room_of.get(full)
        if wait is None:
            return None
        try:
            await wait.done.wait()
        finally:
            if not wait.done.is_set():  # the caller gave up: forget it
                self._room_waits.pop(wait.ref, None)
        return wait.room

    async def wait(self, run_id: uuid.UUID, seconds: float) -> TaskRun | None:
        """The run once it ended; None if ``seconds`` passed first. Raises NotFound if it is gone.

        A run created watched needs no watch message; if its end came already, it is
        returned without waiting. From the first wait on, creates ask to be watched.
        """
        self.watch_creates = True
        watch = self._watches.get(run_id)
        if watch is None:
            created = self._created.get(run_id)
            if created is not None and created.settled:
                return self.ended(run_id)
            watch = self._watches[run_id] = _Watch()
            if created is None or created.ref is None:  # not watched, or its create in flight
                await self._watch_soon(run_id)
        watch.waiters += 1
        try:
            with trio.move_on_after(seconds):
                await watch.done.wait()
        finally:
            watch.waiters -= 1
            if watch.waiters == 0 and not watch.done.is_set() and self._watches.get(run_id) is watch:
                del self._watches[run_id]
                # A run watched since its create stays watched: its end is kept for later.
                if run_id not in self._created and self.usable:
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await self._send({"type": protocol.UNWATCH, "ids": [str(run_id)]})
        if watch.dropped or (self.broken is not None and not watch.done.is_set()):
            raise self._unavailable()
        if watch.missing:
            raise NotFound(404, f"no task run {run_id} (deleted?)")
        return watch.run

    async def _watch_soon(self, run_id: uuid.UUID) -> None:
        """Ask to watch ``run_id``: waits that start together share one message.

        The first waiter yields once before sending, so that 10,000 futures awaited from
        10,000 tasks cost one watch message (and one read on the server), not 10,000.
        """
        self._to_watch.append(run_id)
        if self._flushing:
            return
        self._flushing = True
        try:
            # Shielded: the other waiters count on this message even if we are cancelled.
            with trio.CancelScope(shield=True):
                await trio.lowlevel.checkpoint()
                ids, self._to_watch = self._to_watch, []
                with trio.move_on_after(10) as stuck:
                    await self._send({"type": protocol.WATCH, "ids": [str(i) for i in ids]})
                if stuck.cancelled_caught:
                    self._break(TimeoutError("a watch message could not be sent in 10 s"))
        finally:
            self._flushing = False

    async def keep_open(self, *, task_status: trio.TaskStatus[bool] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the channel open, opening it again after every loss, until cancelled.

        Reports ``started(True)`` once open, or ``started(False)`` (and returns) when the
        first attempt fails on every server (a connection-level failure moves to the next
        one at once), or is refused: an older server without the channel, or none at
        all; the client then uses HTTP only.
        """
        rounds = Rounds(self.servers, self.rng)
        started = False
        while True:
            url = self._url = self.servers.current
            failure: Exception | None
            try:
                async with open_socket(
                    channel_url(url),
                    open_stream=self._open_stream,
                    connection=self.connection,
                    api_key=self.api_key,
                ) as ws:
                    await ws.send_message(
                        orjson.dumps({"type": protocol.AUTH, "token": self.api_key}).decode()
                    )
                    with trio.fail_after(AUTH_TIMEOUT):
                        reply = parse_message(await ws.get_message())
                    if reply["type"] != protocol.AUTH_SUCCESS:
                        raise MalformedMessage(f"unexpected reply to auth: {reply['type']!r}")
                    self.ws, self.broken, self._lost = ws, None, trio.Event()
                    self._open.set()
                    if started:
                        self.reopened += 1
                        log.info("channel to %s open again", url)
                    else:
                        started = True
                        task_status.started(True)
                    rounds.succeeded()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self.read_forever, ws)
                        await self._lost.wait()
                        nursery.cancel_scope.cancel()
                    if self._dropped_for_malformed():
                        with trio.move_on_after(1):
                            await ws.aclose(CLOSE_PROTOCOL_ERROR, "malformed message")
                failure = self.broken
            except _LOST as exc:
                if not started:
                    if connection_failure(exc) and not rounds.failed(url):
                        log.debug("no channel to %s (%r); trying %s", url, exc, self.servers.current)
                        continue
                    log.debug("no channel to %s (%r); using HTTP", url, exc)
                    task_status.started(False)
                    return
                self._break(exc)
                failure = exc
            self.ws = None
            if rounds.failed(url, fail_over=failure is None or connection_failure(failure)):
                await trio.sleep(rounds.pause())

    def _dropped_for_malformed(self) -> bool:
        return isinstance(self.broken, MalformedMessage)

    async def read_forever(self, ws: WebSocketConnection) -> None:
        """Read one connection until it is lost; a malformed message drops it."""
        try:
            while True:
                self._apply(parse_message(await ws.get_message()))
        except (ConnectionClosed, MalformedMessage) as exc:
            self._break(exc)

    def _apply(self, message: dict[str, JSON]) -> None:
        """Apply one message, read whole first: a malformed one changes nothing."""
        kind = message["type"]
        try:
            if kind == protocol.CREATED:
                runs = converter.structure(message["task_runs"], list[TaskRun])
                watched = message.get("watched", False)
                if not isinstance(watched, bool):
                    raise TypeError(f"watched {watched!r} is not true or false")
                call = self._calls.get(_ref(message))
                if call is not None:
                    call.runs, call.watched = runs, watched
                    call.done.set()
            elif kind == protocol.ERROR:
                status, detail = message.get("status", 400), message.get("detail")
                if not isinstance(status, int) or isinstance(status, bool):
                    raise TypeError(f"status {status!r} is not a whole number")
                ref = _ref(message)
                error = api_error(status, str(detail), message)
                call = self._calls.get(ref)
                if isinstance(error, QueueFull) and error.room_announced:
                    # Before the caller wakes: its room message may be the next one read.
                    wait = self._room_waits[ref] = _RoomWait(ref)
                    self._room_of[error] = wait
                if call is not None:
                    call.error = error
                    call.done.set()
            elif kind == protocol.ROOM:
                room, refs = message.get("room"), message.get("refs")
                if not isinstance(room, int) or isinstance(room, bool):
                    raise TypeError(f"room {room!r} is not a whole number")
                if not isinstance(refs, list):
                    raise TypeError(f"refs is {refs!r}, not a list")
                for ref in refs:
                    announced = self._room_waits.pop(ref, None) if isinstance(ref, int) else None
                    if announced is not None:
                        announced.room = room
                        announced.done.set()
            elif kind == protocol.ENDED:
                ended = converter.structure(message["task_runs"], list[TaskRun])
                missing = message.get("missing", [])
                if not isinstance(missing, list) or not all(isinstance(i, str) for i in missing):
                    raise TypeError(f"missing is {missing!r}, not a list of strings")
                missing_ids = [uuid.UUID(str(i)) for i in missing]
                for run in ended:
                    self._settle(run.id, run)
                for run_id in missing_ids:
                    self._settle(run_id, None)
            else:
                raise ValueError(f"unknown message type {kind!r}")
        except (cattrs.BaseValidationError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedMessage(
                f"the server sent a {kind!r} message that cannot be read: {explain_error(exc)}"
            ) from None

    def _settle(self, run_id: uuid.UUID, run: TaskRun | None) -> None:
        watch = self._watches.pop(run_id, None)
        if watch is not None:
            watch.run, watch.missing = run, run is None
            watch.done.set()
        created = self._created.get(run_id)
        if created is not None:
            created.ended, created.missing = run, run is None

    def _break(self, exc: Exception) -> None:
        if self.broken is not None:
            return
        self.broken = exc
        self._lost.set()
        self._open = trio.Event()
        what = str(exc) if isinstance(exc, MalformedMessage) else tls_failure(exc) or repr(exc)
        log.warning("channel to %s lost (%s); using HTTP until it is open again", self._url, what)
        for call in self._calls.values():
            call.error = self._unavailable()
            call.done.set()
        for watch in self._watches.values():
            watch.dropped = True  # its waiters fall back to HTTP
            watch.done.set()
        self._watches.clear()
        # The server watches nothing of this connection any more: keep only the ends that came.
        # (A new dict: a weak reference's callback may change the one iterated otherwise.)
        created, self._created = self._created, {}
        self._created.update((i, c) for i, c in list(created.items()) if c.settled)
        for wait in self._room_waits.values():
            wait.done.set()  # no room message comes on a lost socket: they send again
        self._room_waits.clear()


def _ref(message: dict[str, JSON]) -> int:
    ref = message.get("ref")
    if not isinstance(ref, int) or isinstance(ref, bool):
        raise TypeError(f"ref {ref!r} is not a whole number")
    return ref


@asynccontextmanager
async def open_channel(
    api_url: ApiUrls,
    api_key: str | None,
    *,
    open_stream: OpenStream | None = None,
    connection: ConnectionOptions | None = None,
) -> AsyncIterator[ClientChannel | None]:
    """The channel, or None when it cannot be opened (an older server: use HTTP).

    ``api_url``: one server or several (see :class:`ClientChannel`). ``connection``: TLS
    and the handshake's extra headers (default: from the environment).

    ``open_stream`` is a test seam (see :mod:`trioworker._websocket`).

    **Resource handling:** its task and socket live exactly as long as the block.
    """
    channel = ClientChannel(
        None, api_url, api_key, open_stream=open_stream, connection=connection or connection_options()
    )
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            opened = await nursery.start(channel.keep_open)
            try:
                yield channel if opened else None
            except BaseException as exc:  # remembered, to be re-raised unwrapped below
                body_error = exc
                raise
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller gets its own exception back, not wrapped by our nursery.
        if body_error is not None and only_exception(group) is body_error:
            raise body_error from None
        raise
