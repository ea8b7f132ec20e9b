"""The worker's side of the subscription websocket: one connection at a time, reconnecting.

:class:`SubscriptionClient` delivers runs into a memory channel, carries state reports back
in batches (one message holds every report queued while the previous one was being sent),
and survives every kind of connection loss: it reconnects with jittered exponential
backoff, tells the server which runs it still works on (so they are not run twice), and
sends again the reports that were not answered (the server treats repeats as no-ops).

With several servers (replicas of one deployment) it follows the failover rule of
:mod:`trioworker.servers`: a lost connection, a close with 1012 included, is made again
on the next server at once, and the subscribe there names the runs still held, so that
this worker keeps them; backoff comes after a whole round of servers failed.
"""

from __future__ import annotations

import itertools
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Collection
from functools import partial
from typing import Final

import attrs
import cattrs
import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)

from trioworker import protocol
from trioworker._websocket import (
    Disconnected,
    MalformedMessage,
    OpenStream,
    Unresponsive,
    clip,
    connect,
    connection_failure,
    explain_error,
    parse_message,
)
from trioworker.connection import ConnectionOptions, connection_options, tls_failure
from trioworker.errors import SubscriptionRefused
from trioworker.models import JSON, SetStateResult, SetStateStatus, State, StateType, TaskRun, converter
from trioworker.protocol import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    SUBSCRIPTION_PATH,
    socket_url,
)
from trioworker.servers import Rounds, Servers, UsesServers, as_servers

log = logging.getLogger("trioworker.worker.subscription")

_STATES: Final = protocol.STATES.encode()
#: Reports per message are cut at about this many bytes: the server refuses messages over
#: its body limit (16 MiB by default) by closing the socket.
MESSAGE_BUDGET: Final = 1024 * 1024
#: Scheduler passes the writer lets go by before it sends what was queued.
COALESCE_PASSES: Final = 1
#: Keepalive: after this many seconds with nothing received, the client pings the server ...
KEEPALIVE_IDLE: Final = 20.0
#: ... and drops the connection (then reconnects) if no pong came within this many seconds.
KEEPALIVE_TIMEOUT: Final = 10.0


def websocket_url(api_url: str) -> str:
    """``http(s)://host[/api]`` -> ``ws(s)://host/api/task_runs/subscriptions/scheduled``.

    Raises ``ValueError`` for an unusable URL (see :func:`trioworker.protocol.api_root`).
    """
    return socket_url(api_url, SUBSCRIPTION_PATH)


@attrs.define(eq=False)
class _Report:
    ref: int
    run_id: uuid.UUID
    state: State
    done: trio.Event = attrs.field(factory=trio.Event)
    result: SetStateResult | None = None
    on_answer: Callable[[SetStateResult], None] | None = None

    async def answer(self) -> SetStateResult:
        await self.done.wait()
        assert self.result is not None
        return self.result

    def entry(self) -> dict[str, JSON]:
        return {"id": str(self.run_id), "ref": self.ref, "state": converter.unstructure(self.state)}


@attrs.define(eq=False)
class SubscriptionClient(UsesServers):
    """One worker's subscription. Run :meth:`run` in a nursery; use the rest from any task.

    Args:
        api_url: the server's API root, ``http://host:port/api``; or several servers
            (comma-separated, a sequence, or a :class:`~trioworker.servers.Servers` to
            share), kept as :attr:`servers`. :attr:`api_url` is the server in use.
        keys: the task keys to subscribe to.
        client_id: names this worker process (``host-pid``).
        credit: how many runs this worker may hold unfinished (its free capacity).
        prefetch: how many more runs the server may deliver into this worker's buffer, to
            wait there for a free slot (the server asks for them back, with ``revoke``, if
            another worker gets a free slot first).
        held: returns the runs the worker is still working on (sent on reconnect).
        on_cancel: called with runs the server wants stopped.
        on_delivery: called with each delivered run, in order, in the task that read it;
            returns True when it took the run (it started it), False to have it sent into
            ``deliveries`` (default: every run goes there).
        keepalive_idle: seconds with nothing received after which the server is pinged.
        keepalive_timeout: seconds to wait for the pong; without it the connection is
            dropped (:attr:`connected` turns False) and made again as for any loss.
        connection: keyword only: TLS and the handshake's extra headers (default: from
            the environment, see :mod:`trioworker.connection`).
        open_stream: keyword only, a test seam: opens the byte stream under each
            connection (see :mod:`trioworker._websocket`; default ``connection``'s: TCP,
            TLS for https).
    """

    servers: Servers = attrs.field(converter=as_servers, alias="api_url")
    api_key: str | None
    keys: tuple[str, ...]
    client_id: str
    credit: int
    held: Callable[[], Collection[uuid.UUID]]
    on_cancel: Callable[[list[uuid.UUID]], None]
    prefetch: int = 0
    on_delivery: Callable[[TaskRun], bool] | None = None
    rng: random.Random = attrs.field(factory=random.Random)
    keepalive_idle: float = KEEPALIVE_IDLE
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    connected: bool = False
    reconnects: int = 0
    _refs: itertools.count[int] = attrs.field(factory=itertools.count)
    _outbox: list[_Report] = attrs.field(factory=list)
    _control: list[dict[str, JSON]] = attrs.field(factory=list)
    _unanswered: dict[int, _Report] = attrs.field(factory=dict)
    _wakeup: trio.Event = attrs.field(factory=trio.Event)
    _quitting: bool = False
    #: Delivered runs the worker has not given a slot yet (the ones a revoke may take back).
    _unstarted: set[uuid.UUID] = attrs.field(factory=set)
    _revoked: set[uuid.UUID] = attrs.field(factory=set)
    #: Trio time when the server was last heard from (a message, a pong); the keepalive
    #: pings once keepalive_idle seconds passed since then.
    _heard_at: float = 0.0
    connection: ConnectionOptions = attrs.field(factory=connection_options, kw_only=True)
    _open_stream: OpenStream | None = attrs.field(default=None, kw_only=True)

    # -- what the worker calls
    async def report(self, run_id: uuid.UUID, state: State) -> SetStateResult:
        """Propose ``state`` for ``run_id``; returns the server's answer (across reconnects).

        **Cancellation handling:** if the caller is cancelled, the report still goes out
        (it is queued); only the wait for the answer is abandoned.
        """
        return await self.send_report(run_id, state).answer()

    def send_report(
        self, run_id: uuid.UUID, state: State, on_answer: Callable[[SetStateResult], None] | None = None
    ) -> _Report:
        """Queue a report without waiting; ``await it.answer()`` later, or have ``on_answer``
        called with it. Reports go out in the order they were queued, so two queued back to
        back share one message."""
        report = _Report(next(self._refs), run_id, state, on_answer=on_answer)
        self._outbox.append(report)
        self._wakeup.set()
        return report

    def take(self, run_id: uuid.UUID) -> bool:
        """The worker takes a delivered run off its buffer (to run it, or not).

        Returns False when the server revoked the run meanwhile: it was handed back, and
        the worker must not run it.
        """
        self._unstarted.discard(run_id)
        if run_id in self._revoked:
            self._revoked.discard(run_id)
            return False
        return True

    def _revoke(self, run_ids: list[uuid.UUID]) -> None:
        """The server wants these runs for another worker: hand back the ones not started."""
        back = [run_id for run_id in run_ids if run_id in self._unstarted]
        self._unstarted.difference_update(back)
        self._revoked.update(back)
        self.release(back)

    def change_credit(self, delta: int) -> None:
        if delta:
            self.credit += delta
            self._send_control({"type": protocol.CREDIT, "n": delta})

    def release(self, run_ids: Collection[uuid.UUID]) -> None:
        """Hand back runs this worker will not finish (the server requeues them)."""
        if run_ids:
            self._send_control({"type": protocol.RELEASE, "ids": [str(i) for i in run_ids]})

    def quit(self) -> None:
        """Ask for no more runs; :meth:`run` returns once the server closed the socket."""
        if not self._quitting:
            self._quitting = True
            self.credit = 0
            self._send_control({"type": protocol.QUIT})

    def _send_control(self, message: dict[str, JSON]) -> None:
        self._control.append(message)
        self._wakeup.set()

    # -- the connection loop
    async def run(
        self,
        deliveries: trio.MemorySendChannel[TaskRun],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hold the subscription until :meth:`quit` completes (or until cancelled).

        Reports ``started`` after the first successful subscribe.

        **Error handling:** every connection loss (refused, reset, abnormal close, server
        restart with 1012, HTTP errors in the handshake) is retried with backoff. So is a
        malformed message from the server (not JSON, not an object, a binary frame, an
        unknown type, a run or a field that cannot be read): the connection is closed
        with 1002 and made again, with one log line, and nothing of that message is
        applied. A close with 1008 (the API key was refused) raises
        :class:`SubscriptionRefused`.

        **Several servers:** a loss moves to the next server (see the module docstring)
        and is retried there at once; the backoff comes once a whole round failed. A
        refused handshake other than 502/503/504 is retried where it is, with backoff.
        """
        rounds = Rounds(self.servers, self.rng)
        malformed = 0  # in a row: a server that keeps sending them is not hammered
        started = False
        async with deliveries:
            while True:
                api_url = self.servers.current
                try:
                    async with connect(
                        websocket_url(api_url),
                        open_stream=self._open_stream,
                        connection=self.connection,
                        api_key=self.api_key,
                    ) as ws:
                        try:
                            await self._handshake(ws)
                            rounds.succeeded()
                            if not started:
                                task_status.started()
                                started = True
                            finished = await self._session(ws, deliveries)
                        except MalformedMessage:
                            with trio.move_on_after(1):
                                await ws.aclose(CLOSE_PROTOCOL_ERROR, "malformed message")
                            raise
                    if finished:
                        return
                except (OSError, HandshakeError, ConnectionRejected, ConnectionClosed, Disconnected) as exc:
                    self.connected = False
                    if isinstance(exc, ConnectionClosed) and exc.reason and exc.reason.code == CLOSE_POLICY:
                        raise SubscriptionRefused(
                            f"the server at {api_url} refused the subscription: {exc.reason.reason}"
                        ) from None
                    if self._quitting and not (self._unanswered or self._outbox or self.held()):
                        self.connected = False
                        return  # stopping with nothing left to say: no reason to reconnect
                    malformed = malformed + 1 if isinstance(exc, MalformedMessage) else 0
                    round_failed = rounds.failed(api_url, fail_over=connection_failure(exc))
                    delay = rounds.pause(extra=malformed) if round_failed else 0.0
                    self.reconnects += 1
                    elsewhere = "" if self.servers.current == api_url else f" to {self.servers.current}"
                    log.warning(
                        "subscription lost (%s)%s; reconnecting%s in %.2f s",
                        _describe(exc),
                        f" at {api_url}" if len(self.servers) > 1 else "",
                        elsewhere,
                        delay,
                    )
                    self._requeue_unanswered()
                    await trio.sleep(delay)

    async def _handshake(self, ws: WebSocketConnection) -> None:
        await self._send(ws, {"type": protocol.AUTH, "token": self.api_key})
        reply = await self._receive(ws)
        if reply.get("type") != protocol.AUTH_SUCCESS:
            raise MalformedMessage(f"unexpected handshake reply {clip(str(reply))}")
        self._control.clear()  # credit and release messages meant the old connection
        credit = 0 if self._quitting else self.credit
        held = [str(i) for i in self.held()]
        await self._send(
            ws,
            {
                "type": protocol.SUBSCRIBE,
                "keys": list(self.keys),
                "client_id": self.client_id,
                "credit": credit,
                "prefetch": self.prefetch,
                "held": held,
            },
        )
        if self._quitting:
            await self._send(ws, {"type": protocol.QUIT})
        self.connected = True
        log.info("subscribed to %s as %s (credit %d)", " | ".join(self.keys), self.client_id, credit)

    async def _session(self, ws: WebSocketConnection, deliveries: trio.MemorySendChannel[TaskRun]) -> bool:
        """Run one connection; True when it ended because we quit. Raises what ended it.

        The reader and the writer run side by side; the first connection error stops
        both and is raised on its own (not inside an exception group), so that :meth:`run`
        can tell a lost connection from a bug.
        """
        lost: BaseException | None = None

        async with trio.open_nursery() as nursery:

            async def until_lost(job: Callable[[], Awaitable[None]]) -> None:
                nonlocal lost
                try:
                    await job()
                except (ConnectionClosed, Disconnected, OSError, trio.BrokenResourceError) as exc:
                    lost = lost or exc
                    nursery.cancel_scope.cancel()

            nursery.start_soon(until_lost, partial(self._write_forever, ws))
            nursery.start_soon(until_lost, partial(self._keep_alive, ws))
            await until_lost(partial(self._read_forever, ws, deliveries))
        reason = lost.reason if isinstance(lost, ConnectionClosed) else None
        closed_normally = reason is not None and reason.code == CLOSE_NORMAL
        if closed_normally and self._quitting:
            self.connected = False
            return True
        if lost is None:  # pragma: no cover - the reader only ends by an error
            raise Disconnected("the connection ended without a reason")
        raise lost

    async def _read_forever(
        self, ws: WebSocketConnection, deliveries: trio.MemorySendChannel[TaskRun]
    ) -> None:
        """Read until the connection is lost; a malformed message drops it (Disconnected).

        Each message is read whole before any of it is applied, so a bad one changes nothing.
        """
        while True:
            message = await self._receive(ws)
            self._heard()
            kind = message["type"]
            if kind == protocol.TASK_RUNS:
                runs = _parse_runs(message)
                # No ack: the protocol makes it optional, and the server learns all it needs
                # from the RUNNING report that follows (one message per run saved).
                for run in runs:
                    self._unstarted.add(run.id)
                    if self.on_delivery is not None and self.on_delivery(run):
                        continue
                    try:
                        deliveries.send_nowait(run)  # unbounded: credit bounds it
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self._unstarted.discard(run.id)
                        self.release([run.id])  # the worker stopped taking runs
            elif kind == protocol.STATE_RESULTS:
                self._resolve(_parse_results(message))
            elif kind == protocol.CANCEL:
                self.on_cancel(_parse_ids(message))
            elif kind == protocol.REVOKE:
                self._revoke(_parse_ids(message))
            else:
                raise MalformedMessage(f"the server sent a message of unknown type {kind!r}")

    async def _keep_alive(self, ws: WebSocketConnection) -> None:
        """Ping the server whenever it has been quiet for keepalive_idle seconds; raise
        :class:`Unresponsive` when a pong does not come within keepalive_timeout."""
        self._heard_at = trio.current_time()
        while True:
            # Each message only notes its time (no timer to move): this task wakes at the
            # end of the idle period it last saw, and sleeps again if the server spoke since.
            due = self._heard_at + self.keepalive_idle
            if trio.current_time() < due:
                await trio.sleep_until(due)
                continue
            with trio.move_on_after(self.keepalive_timeout) as waiting:
                await ws.ping()
            if waiting.cancelled_caught:
                self.connected = False
                raise Unresponsive(
                    f"the server answered no ping within {self.keepalive_timeout:g} s "
                    f"after {self.keepalive_idle:g} s of silence"
                )
            self._heard_at = trio.current_time()

    def _heard(self) -> None:
        """Something came from the server: the keepalive waits keepalive_idle from now."""
        self._heard_at = trio.current_time()

    async def _write_forever(self, ws: WebSocketConnection) -> None:
        while True:
            await self._wakeup.wait()
            # A run that ends within a few scheduler passes of its RUNNING report (a short
            # async task) queues its final report by then: both go in one message, and the
            # server applies them in one commit instead of two in a row. When every RUNNING
            # queued has its next report behind it already (a run that ended in the step
            # that started it), there is nothing to wait for: it goes at once.
            if _lone_running(self._outbox):
                for _ in range(COALESCE_PASSES):
                    await trio.lowlevel.cancel_shielded_checkpoint()
            self._wakeup = trio.Event()
            control, self._control = self._control, []
            for message in control:
                await self._send(ws, message)
            batch, self._outbox = self._outbox, []
            for report in batch:
                self._unanswered[report.ref] = report
            for chunk in _by_size(batch):
                await ws.send_message((b'{"type":"%b","states":[%b]}' % (_STATES, b",".join(chunk))).decode())

    def _resolve(self, results: list[tuple[int, SetStateStatus, State | None, str | None]]) -> None:
        for ref, status, state, details in results:
            report = self._unanswered.pop(ref, None)
            if report is None:
                continue
            report.result = SetStateResult(status, report.state if state is None else state, details)
            report.done.set()
            if report.on_answer is not None:
                report.on_answer(report.result)

    def _requeue_unanswered(self) -> None:
        """Reports sent on a lost connection go out again first on the next one."""
        if self._unanswered:
            again = sorted(self._unanswered.values(), key=lambda r: r.ref)
            self._unanswered.clear()
            self._outbox[:0] = again
            self._wakeup.set()

    @staticmethod
    async def _send(ws: WebSocketConnection, message: dict[str, JSON]) -> None:
        await ws.send_message(orjson.dumps(message).decode())

    @staticmethod
    async def _receive(ws: WebSocketConnection) -> dict[str, JSON]:
        return parse_message(await ws.get_message())


def _lone_running(reports: list[_Report]) -> bool:
    """True when a RUNNING report in ``reports`` has no later report of its run behind it
    (its run may still end within a pass or two: worth waiting for, see ``COALESCE_PASSES``)."""
    waiting: set[uuid.UUID] = set()
    for report in reports:
        if report.state.type is StateType.RUNNING:
            waiting.add(report.run_id)
        else:
            waiting.discard(report.run_id)
    return bool(waiting)


def _parse_runs(message: dict[str, JSON]) -> list[TaskRun]:
    try:
        runs = message["task_runs"]
        if not isinstance(runs, list):
            raise TypeError(f"task_runs is {type(runs).__name__}, not a list")
        return converter.structure(runs, list[TaskRun])
    except (cattrs.BaseValidationError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedMessage(
            f"the server sent a delivery that is not a list of task runs: {explain_error(exc)}"
        ) from None


def _parse_results(message: dict[str, JSON]) -> list[tuple[int, SetStateStatus, State | None, str | None]]:
    out: list[tuple[int, SetStateStatus, State | None, str | None]] = []
    try:
        results = message["results"]
        if not isinstance(results, list):
            raise TypeError(f"results is {type(results).__name__}, not a list")
        for item in results:
            if not isinstance(item, dict):
                raise TypeError(f"a result is {type(item).__name__}, not an object")
            ref, details, state = item["ref"], item.get("details"), item.get("state")
            if not isinstance(ref, int) or isinstance(ref, bool):
                raise TypeError(f"ref {ref!r} is not a whole number")
            if details is not None and not isinstance(details, str):
                raise TypeError(f"details {details!r} is not a string")
            status = SetStateStatus(item["status"])
            out.append((ref, status, None if state is None else converter.structure(state, State), details))
    except (cattrs.BaseValidationError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedMessage(
            f"the server sent state results that cannot be read: {explain_error(exc)}"
        ) from None
    return out


def _parse_ids(message: dict[str, JSON]) -> list[uuid.UUID]:
    try:
        ids = message["ids"]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise TypeError(f"ids is {ids!r}, not a list of strings")
        return [uuid.UUID(i) for i in ids]
    except (KeyError, TypeError, ValueError) as exc:
        kind = message["type"]
        raise MalformedMessage(
            f"the server sent a {kind!r} message without task run ids: {explain_error(exc)}"
        ) from None


def _by_size(reports: list[_Report]) -> list[list[bytes]]:
    """Reports as JSON, in messages of at most about MESSAGE_BUDGET bytes (big results go
    alone). Each report is serialized once, here."""
    chunks: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for report in reports:
        entry = orjson.dumps(report.entry())
        if current and size + len(entry) > MESSAGE_BUDGET:
            chunks.append(current)
            current, size = [], 0
        current.append(entry)
        size += len(entry)
    if current:
        chunks.append(current)
    return chunks


def _describe(exc: BaseException) -> str:
    tls = tls_failure(exc)
    if tls is not None:
        return tls
    if isinstance(exc, ConnectionClosed) and exc.reason is not None:
        return f"closed with {exc.reason.code} {exc.reason.reason or ''}".strip()
    if isinstance(exc, ConnectionRejected):
        return f"HTTP {exc.status_code} during the handshake"
    if isinstance(exc, Disconnected):
        return str(exc)
    return repr(exc.__cause__ or exc) if isinstance(exc, HandshakeError) else repr(exc)
