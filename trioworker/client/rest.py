"""The REST clients: :class:`TaskRunClient` (async, for Trio) and :class:`SyncTaskRunClient`
(blocking, for plain code; it starts no event loop).

Both build the same requests (:class:`_Call`) and parse the same answers; only the
transport differs. Errors are translated where they happen: a refused or broken connection
becomes :class:`~trioworker.errors.ServerUnavailable`, an error status an
:class:`~trioworker.errors.ApiError` (:class:`~trioworker.errors.NotFound` for 404,
:class:`~trioworker.errors.QueueFull` for 429).

Creates are the exception to "raise at once": every run they create carries an id the
client chose, so a create whose answer was lost (the client channel, or its HTTP
connection, dropped after it was sent) is sent again over HTTP with the same ids, and the
server answers a repeat with the run it already made: never two runs, never none. So is
the rest of a create that a server's queue limit turned back (429), once there is room:
the server makes the creates that fit first (see :class:`_Backpressure`).

**Several servers** (``api_url="http://a:4300,http://b:4300"`` or a list: replicas of one
deployment) are used by the failover rule of :mod:`trioworker.servers`: a call goes to the
current server; after a connection-level failure (refused, reset, timed out, a 502/503/504
answer) the next server becomes current, and the call is sent to it at once if that is
safe: when the request cannot have reached the server, or the call is a read (GETs, the
long-polls) or a create. Any other call raises as with one server (the next call goes to
the next server). A call gives up after a whole round of failures (every server once),
except a create whose outcome is unknown, which goes on round after round as above. An
error answer (4xx) is never sent elsewhere.

``async with trioworker.connect():`` (and ``with trioworker.sync.connect():``) makes one
client, with its kept-alive connection, the one every submission and future in the block
uses. Without it each call opens a short-lived client of its own.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, Self, TypeVar
from urllib.parse import quote

import attrs
import httpx
import orjson
import trio

from trioworker import protocol
from trioworker._websocket import OpenStream
from trioworker.connection import connection_options, tls_failure
from trioworker.errors import ApiError, QueueFull, ServerUnavailable, api_error
from trioworker.models import (
    JSON,
    CancelResult,
    GroupCancelResult,
    PurgeRequest,
    PurgeResult,
    Schedule,
    ScheduleCreate,
    SetStateRequest,
    SetStateResult,
    State,
    StateChange,
    StateType,
    TaskRun,
    TaskRunCreate,
    WaitResult,
    converter,
)
from trioworker.servers import FAILOVER_STATUSES, ApiUrls, Rounds, UsesServers, as_servers
from trioworker.settings import Settings

if TYPE_CHECKING:
    from trioworker.client.channel import ClientChannel

T = TypeVar("T")

log = logging.getLogger("trioworker.client")

#: Seconds a request may take; long-polls add their own wait on top.
DEFAULT_TIMEOUT: Final = 30.0
#: Times, in all, a create whose outcome is unknown is sent before ServerUnavailable (all
#: within the client's ``timeout`` of the first loss, with jittered backoff from 0.2 s
#: between rounds): that many rounds, each server once a round.
CREATE_ATTEMPTS: Final = 8
#: The longest single long-poll; longer waits are several.
MAX_POLL_SECONDS: Final = 60.0


def with_ids(creates: Sequence[TaskRunCreate]) -> list[TaskRunCreate]:
    """``creates``, each with an ``id`` (a fresh uuid4 where it has none): what makes
    sending one again safe."""
    return [c if c.id is not None else attrs.evolve(c, id=uuid.uuid4()) for c in creates]


def _not_sent(exc: httpx.TransportError) -> bool:
    """Whether the request cannot have reached the server (no connection was made)."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    fields: dict[str, object] = {}
    try:
        body = response.json()
        if isinstance(body, dict):
            fields = body
        detail = str(fields.get("detail", response.text))
    except ValueError:
        detail = response.text or response.reason_phrase
    retry_after = response.headers.get("Retry-After", "")
    if "retry_after" not in fields and retry_after.isdigit():
        # A proxy's 429 says it in the header only; trioworker's body says it to the millisecond.
        fields = {**fields, "retry_after": int(retry_after)}
    raise api_error(response.status_code, detail, fields)


@attrs.frozen
class _Call(Generic[T]):
    """One API call: the request and how to read its answer."""

    method: str
    path: str
    parse: Callable[[JSON], T]
    body: JSON = None
    params: dict[str, Any] | None = None
    #: Extra seconds the answer may take (a long-poll's own wait).
    wait: float = 0.0
    #: Sending it twice does what sending it once does (reads; creates, by their ids):
    #: after a failure that may have reached the server, it is sent to the next one.
    retry_safe: bool = attrs.field(default=attrs.Factory(lambda self: self.method == "GET", takes_self=True))


def _listed(call: _Call[T]) -> _Call[list[T]]:
    """``call``, its answer read as a list of one."""
    parse = call.parse
    return _Call(
        call.method, call.path, lambda data: [parse(data)], call.body, call.params, call.wait, call.retry_safe
    )


def _ignore(data: JSON) -> None:
    return None


def _objects(data: JSON) -> list[dict[str, JSON]]:
    """A JSON array of objects, as it is."""
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError(f"expected a JSON array of objects, got {type(data).__name__}")
    return [item for item in data if isinstance(item, dict)]


def _room(data: JSON) -> int | None:
    """The ``room`` of a queue's answer: a whole number, or None (no queue limit)."""
    room = data.get("room") if isinstance(data, dict) else 0
    if room is not None and (not isinstance(room, int) or isinstance(room, bool) or room < 0):
        raise ValueError(f"room is {room!r}, not a whole number")
    return room


def _structure(cls: Any) -> Callable[[JSON], Any]:
    return lambda data: converter.structure(data, cls)


class _Calls:
    """The API, as request descriptions: shared by the async and the blocking client."""

    @staticmethod
    def health() -> _Call[dict[str, JSON]]:
        return _Call("GET", protocol.HEALTH, lambda d: dict(d))

    @staticmethod
    def create(create: TaskRunCreate) -> _Call[TaskRun]:
        return _Call(
            "POST", protocol.RUNS, _structure(TaskRun), converter.unstructure(create), retry_safe=True
        )

    @staticmethod
    def create_many(creates: Sequence[TaskRunCreate]) -> _Call[list[TaskRun]]:
        """Creates in one request; the server makes those that fit when a queue is full
        (``partial``: see :class:`_Backpressure`)."""
        body = converter.unstructure(list(creates))
        params = {"partial": "true"}
        return _Call("POST", protocol.RUNS_BATCH, _structure(list[TaskRun]), body, params, retry_safe=True)

    @staticmethod
    def queue_room(task_key: str, wanted: int, seconds: float) -> _Call[int | None]:
        seconds = min(seconds, MAX_POLL_SECONDS)
        params = {"task_key": task_key, "wanted": wanted, "timeout": seconds}
        return _Call("GET", protocol.RUNS_ROOM, _room, params=params, wait=seconds)

    @staticmethod
    def read(run_id: uuid.UUID) -> _Call[TaskRun]:
        return _Call("GET", protocol.RUN.format(run_id=run_id), _structure(TaskRun))

    @staticmethod
    def read_many(
        task_key: str | None,
        state: StateType | None,
        limit: int,
        offset: int,
        newest_first: bool,
        tags: Sequence[str] = (),
        parent_task_run_id: uuid.UUID | None = None,
        group_id: uuid.UUID | None = None,
    ) -> _Call[list[TaskRun]]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if tags:
            params["tag"] = list(tags)
        if task_key is not None:
            params["task_key"] = task_key
        if state is not None:
            params["state"] = state.value
        if newest_first:
            params["sort"] = "CREATED_DESC"
        if parent_task_run_id is not None:
            params["parent_task_run_id"] = str(parent_task_run_id)
        if group_id is not None:
            params["group_id"] = str(group_id)
        return _Call("GET", protocol.RUNS, _structure(list[TaskRun]), params=params)

    @staticmethod
    def descendants(run_id: uuid.UUID, limit: int) -> _Call[list[TaskRun]]:
        return _Call(
            "GET",
            protocol.RUN_DESCENDANTS.format(run_id=run_id),
            _structure(list[TaskRun]),
            params={"limit": limit},
        )

    @staticmethod
    def cancel_group(group_id: uuid.UUID) -> _Call[GroupCancelResult]:
        # Sending it twice does what sending it once does: a failover may send it again.
        return _Call(
            "POST",
            protocol.GROUP_CANCEL.format(group_id=group_id),
            _structure(GroupCancelResult),
            retry_safe=True,
        )

    @staticmethod
    def find(id_prefix: str, limit: int) -> _Call[list[TaskRun]]:
        params = {"id_prefix": id_prefix, "limit": limit}
        return _Call("GET", protocol.RUNS_FIND, _structure(list[TaskRun]), params=params)

    @staticmethod
    def retry(run_id: uuid.UUID) -> _Call[TaskRun]:
        return _Call("POST", protocol.RUN_RETRY.format(run_id=run_id), _structure(TaskRun))

    @staticmethod
    def purge(older_than: float, task_key: str | None, state: StateType | None) -> _Call[int]:
        body = converter.unstructure(PurgeRequest(older_than, task_key, state))
        return _Call(
            "POST", protocol.RUNS_PURGE, lambda data: converter.structure(data, PurgeResult).deleted, body
        )

    @staticmethod
    def task_workers(task_key: str | None) -> _Call[list[dict[str, JSON]]]:
        params = None if task_key is None else {"task_key": task_key}
        return _Call("GET", protocol.TASK_WORKERS, _objects, params=params)

    @staticmethod
    def history(run_id: uuid.UUID) -> _Call[list[StateChange]]:
        return _Call("GET", protocol.RUN_HISTORY.format(run_id=run_id), _structure(list[StateChange]))

    @staticmethod
    def set_state(run_id: uuid.UUID, state: State, force: bool) -> _Call[SetStateResult]:
        body = converter.unstructure(SetStateRequest(state, force))
        return _Call("POST", protocol.RUN_SET_STATE.format(run_id=run_id), _structure(SetStateResult), body)

    @staticmethod
    def cancel(run_id: uuid.UUID) -> _Call[CancelResult]:
        return _Call("POST", protocol.RUN_CANCEL.format(run_id=run_id), _structure(CancelResult))

    @staticmethod
    def delete(run_id: uuid.UUID) -> _Call[None]:
        return _Call("DELETE", protocol.RUN.format(run_id=run_id), _ignore)

    @staticmethod
    def wait(run_id: uuid.UUID, seconds: float) -> _Call[TaskRun]:
        seconds = min(seconds, MAX_POLL_SECONDS)
        return _Call(
            "GET",
            protocol.RUN_WAIT.format(run_id=run_id),
            _structure(TaskRun),
            params={"timeout": seconds},
            wait=seconds,
        )

    @staticmethod
    def wait_many(
        run_ids: Sequence[uuid.UUID], seconds: float, *, wait_all: bool, linger: float
    ) -> _Call[WaitResult]:
        seconds = min(seconds, MAX_POLL_SECONDS)
        body = {"ids": [str(i) for i in run_ids], "timeout": seconds, "all": wait_all, "linger": linger}
        return _Call(
            "POST", protocol.RUNS_WAIT, _structure(WaitResult), body, wait=seconds + linger, retry_safe=True
        )

    @staticmethod
    def upsert_schedule(create: ScheduleCreate) -> _Call[Schedule]:
        body = converter.unstructure(create)
        return _Call("POST", protocol.SCHEDULES, _structure(Schedule), body, retry_safe=True)

    @staticmethod
    def schedules() -> _Call[list[Schedule]]:
        return _Call("GET", protocol.SCHEDULES, _structure(list[Schedule]))

    @staticmethod
    def read_schedule(name: str) -> _Call[Schedule]:
        return _Call("GET", protocol.SCHEDULE.format(name=quote(name, safe="")), _structure(Schedule))

    @staticmethod
    def delete_schedule(name: str) -> _Call[None]:
        return _Call("DELETE", protocol.SCHEDULE.format(name=quote(name, safe="")), _ignore)


@attrs.define(eq=False)
class _CreateRetries:
    """When to send one create again: the rule the async and the blocking client share.

    A create that surely did not reach a server (connection refused) goes to the next
    server at once; when every server refused it, it raises, as every call does. Once it
    may have reached one and no answer came (``lost``: the channel or the connection
    dropped, a read timed out), it is sent again: to the next server at once, and after a
    whole round with backoff, up to :data:`CREATE_ATTEMPTS` rounds in all, within the
    client's ``timeout`` seconds of that first loss; a refused connection then counts as
    one more try (the server may be restarting).
    """

    client: _Base
    call: _Call[Any]
    #: When the first loss happened (the clock of the caller).
    lost_at: float = 0.0
    lost: Exception | None = None
    attempts: int = 0
    rounds: Rounds = attrs.field(
        default=attrs.Factory(lambda self: Rounds(self.client.servers, self.client._rng), takes_self=True)
    )

    def request_timeout(self, now: float) -> float:
        """Seconds the next attempt may take."""
        if self.lost is None:
            return self.client.timeout
        return max(0.0, min(self.client.timeout, self.lost_at + self.client.timeout - now))

    def pause_after(self, url: str, exc: httpx.TransportError, now: float) -> float:
        """Seconds to wait before sending the create again (to the now current server);
        raises ServerUnavailable if it is not to be sent again."""
        self.attempts += 1
        round_failed = self.rounds.failed(url)
        if self.lost is None:
            if _not_sent(exc):
                if round_failed:
                    raise self.client._unreachable(exc) from exc
                return 0.0
            self.lost, self.lost_at = exc, now
        pause = self.rounds.pause() if round_failed else 0.0
        if (
            self.attempts >= CREATE_ATTEMPTS * len(self.client.servers)
            or now + pause >= self.lost_at + self.client.timeout
        ):
            raise self._give_up(exc) from exc
        log.info(
            "a create sent to %s got no answer (%r); sending it again to %s in %.2f s",
            url,
            exc,
            self.client.servers.current,
            pause,
        )
        return pause

    def answered(self, url: str, response: httpx.Response) -> bool:
        """Whether ``response`` is the create's answer; False when it is a 502/503/504
        and another server is left to try in this round (it is sent there at once)."""
        return self.client._answered(self.rounds, url, self.call, response)

    def _give_up(self, exc: Exception) -> ServerUnavailable:
        body = self.call.body
        items = body if isinstance(body, list) else [body]
        ids = [str(item.get("id")) for item in items if isinstance(item, dict)]
        shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        tries = f"{self.attempts} attempt{'s' if self.attempts > 1 else ''}"
        return ServerUnavailable(
            f"cannot reach {self.client.servers.describe()} to confirm a create "
            f"(no answer to {tries} over HTTP; the last: {exc!r}); its runs may or may not "
            f"exist: read them by id ({shown})"
        )


@attrs.define(eq=False)
class _Backpressure:
    """What a create the server's queue limit turns back (429: :class:`QueueFull`) does
    next: the rule the async and the blocking client share.

    The creates go in order, and the server is asked to make those that fit (``partial``):
    its refusal carries the runs of the first ones, made, and the client sends only the
    rest again, the server's bound (``max_queued``) at a time (more cannot fit; what does
    not fit of it is refused, cheaply), once there is room: as soon as the client channel
    says so (a ``room`` message) or a long-poll of the room answers, else after the wait
    the server judged from how fast its workers take runs (``retry_after``, and up to a
    fifth more, so that clients do not come back in step). A server that refuses a request whole
    says how many of its first creates fit: those are sent at once. Each create carries its
    id, so none is made twice. It gives up when nothing was accepted for ``timeout``
    seconds: :class:`QueueFull`, with the runs made so far.
    """

    creates: list[TaskRunCreate]
    timeout: float
    rng: random.Random
    #: When something was last accepted (or the call began), on the caller's clock.
    since: float
    created: list[TaskRun] = attrs.field(factory=list)
    #: How many of the creates not made yet to send next, at most.
    _size: int = attrs.field(default=attrs.Factory(lambda self: len(self.creates), takes_self=True))

    @property
    def deadline(self) -> float:
        """When it gives up if nothing more is accepted (the caller's clock)."""
        return self.since + self.timeout

    def next(self) -> list[TaskRunCreate]:
        """The creates to send now (none: done)."""
        start = len(self.created)
        return self.creates[start : start + self._size]

    def accepted(self, runs: list[TaskRun], now: float) -> None:
        if runs:
            self.created += runs
            self.since = now

    def refused(self, full: QueueFull, sent: int, now: float) -> bool:
        """Take in a refusal of the ``sent`` creates :meth:`next` gave: the runs it made;
        True when the rest is to be sent at once (an older server said that fewer fit)."""
        self.accepted(full.created, now)
        if full.partial:
            self._size = max(1, full.max_queued or sent)  # more cannot fit at once
            return False
        if 0 < full.room < sent:
            self._size = full.room
            return True
        return False

    def room_poll(self, full: QueueFull, now: float) -> _Call[int | None] | None:
        """The long-poll for room after ``full`` (None: the server cannot be asked: an
        older one): for half the server's bound, or what is left to send if less, until
        the deadline."""
        if not full.partial or full.task_key is None:
            return None
        left = len(self.creates) - len(self.created)
        wanted = max(1, min(left, ((full.max_queued or 1) + 1) // 2))
        return _Calls.queue_room(full.task_key, wanted, max(0.0, self.deadline - now))

    @staticmethod
    def polled(room: int | None) -> bool:
        """Whether the long-poll's answer says to send the rest now (there is room, or no
        limit at all)."""
        return room != 0

    def pause(self, full: QueueFull, now: float) -> float:
        """Seconds to wait before sending :meth:`next` again; raises :class:`QueueFull`
        when the wait would end past ``timeout`` seconds without progress."""
        pause = full.retry_after * self.rng.uniform(1.0, 1.2)
        if now + pause > self.deadline:
            raise self.give_up(full) from full
        log.debug("%s: sending the rest again in %.3f s", full.detail, pause)
        return pause

    def give_up(self, full: QueueFull) -> QueueFull:
        made = len(self.created)
        return QueueFull(
            f"{full.detail}; it stayed full for {self.timeout:g} s"
            + (f": {made} of {len(self.creates)} runs were created" if made else ": nothing was created"),
            task_key=full.task_key,
            room=full.room,
            retry_after=full.retry_after,
            created=self.created,
            max_queued=full.max_queued,
        )


class _Base(UsesServers):
    def __init__(
        self,
        api_url: ApiUrls | None,
        api_key: str | None,
        timeout: float,
        ca_bundle: str | Path | None,
        insecure: bool | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        settings = Settings.from_env()
        #: The servers, and the one in use (shared with the client channel).
        self.servers = as_servers(api_url or settings.api_url)
        self.api_key = api_key if api_key is not None else settings.api_key
        self.timeout = timeout
        #: TLS and the extra headers (shared with the client channel).
        self.connection = connection_options(ca_bundle, insecure, headers)
        #: Jitter for the pauses between attempts of a create.
        self._rng = random.Random()

    def _options(self) -> dict[str, Any]:
        return {
            "headers": self.connection.http_headers(self.api_key),
            "timeout": self.timeout,
            "verify": self.connection.ssl_context,
        }

    def _try_next(self, rounds: Rounds, url: str, call: _Call[Any], exc: httpx.TransportError) -> bool:
        """``call`` to ``url`` failed with ``exc``: move on; whether to send it to the next
        server now (it cannot have arrived, or sending it again is safe, and the round of
        servers is not over)."""
        round_failed = rounds.failed(url)
        return not round_failed and (call.retry_safe or _not_sent(exc))

    def _answered(self, rounds: Rounds, url: str, call: _Call[Any], response: httpx.Response) -> bool:
        """Whether ``response`` from ``url`` is ``call``'s answer; False when it is a
        502/503/504 (``url`` failed: move on) and the call is to go to the next server now."""
        if response.status_code not in FAILOVER_STATUSES:
            return True
        round_failed = rounds.failed(url)
        return round_failed or not call.retry_safe

    def _request_args(self, call: _Call[Any]) -> dict[str, Any]:
        args: dict[str, Any] = {"params": call.params}
        if call.body is not None:
            args["content"] = orjson.dumps(call.body)
        if call.wait:
            args["timeout"] = self.timeout + call.wait
        return args

    def _unreachable(self, exc: Exception) -> ServerUnavailable:
        return ServerUnavailable(f"cannot reach {self.servers.describe()}: {tls_failure(exc) or repr(exc)}")

    @staticmethod
    def _parse(call: _Call[T], response: httpx.Response) -> T:
        _raise_for_status(response)
        return call.parse(orjson.loads(response.content) if response.content else None)


class TaskRunClient(_Base):
    """Async client of the task-run API: ``async with TaskRunClient() as client``.

    Args:
        api_url: the server, ``http://host:port`` as it prints it or ``.../api`` (default
            ``TRIOWORKER_API_URL``); or several, replicas of one deployment, in the order
            to try them: comma-separated in one string, or a sequence (see
            :mod:`trioworker.servers`; a :class:`~trioworker.servers.Servers` is shared).
            ``ValueError`` if unusable (see :func:`trioworker.servers.api_roots`).
            :attr:`api_url` is the server in use, :attr:`api_urls` all of them.
        api_key: sent as a bearer token (default ``TRIOWORKER_API_KEY``).
        timeout: seconds a request may take (long-polls add their wait); a create whose
            answer was lost, or that the server's queue limit turned back, is tried again
            within that long.
        transport: an httpx transport, for tests that do without a network.
        ca_bundle, insecure, headers: how to connect (default ``TRIOWORKER_API_CA_BUNDLE``,
            ``TRIOWORKER_API_INSECURE``, ``TRIOWORKER_API_HEADERS``): the CA certificates an
            ``https://`` server's certificate is checked against (a PEM file or a folder;
            default the system's), no check at all, headers sent on every request and
            websocket handshake. See :mod:`trioworker.connection`; ``ValueError`` (one line
            naming the setting) for one that cannot be used.
    """

    def __init__(
        self,
        api_url: ApiUrls | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        ca_bundle: str | Path | None = None,
        insecure: bool | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(api_url, api_key, timeout, ca_bundle, insecure, headers)
        self._http = httpx.AsyncClient(transport=transport, **self._options())
        #: The client channel while :func:`connect` holds one open.
        self.channel: ClientChannel | None = None

    def _live_channel(self) -> ClientChannel | None:
        channel = self.channel
        return channel if channel is not None and channel.usable else None

    async def __aenter__(self) -> Self:
        await self._http.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._http.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, call: _Call[T]) -> T:
        rounds = Rounds(self.servers, self._rng)
        while True:
            url = self.servers.current
            try:
                response = await self._http.request(call.method, url + call.path, **self._request_args(call))
            except httpx.TransportError as exc:
                if self._try_next(rounds, url, call, exc):
                    continue
                raise self._unreachable(exc) from exc
            if self._answered(rounds, url, call, response):
                return self._parse(call, response)

    async def health(self) -> dict[str, JSON]:
        return await self.call(_Calls.health())

    async def create_task_run(self, create: TaskRunCreate) -> TaskRun:
        """Create one run; the same as :meth:`create_task_runs` with one."""
        [run] = await self._create_fitting(with_ids([create]), lambda part: _listed(_Calls.create(part[0])))
        return run

    async def create_task_runs(self, creates: Sequence[TaskRunCreate]) -> list[TaskRun]:
        """Create runs (over the client channel when one is open); returns them in order.

        A create without an ``id`` gets one (uuid4) first. If the channel or the HTTP
        connection is lost after the create was sent (or the answer times out), it is sent
        again over HTTP with the same ids, and the server answers a repeat with the run it
        already made: up to :data:`CREATE_ATTEMPTS` attempts, with backoff, within
        ``timeout`` seconds of that loss.

        **Backpressure:** a server with a queue limit (``--max-queued``) turns back
        creates that do not fit (429). It makes those that fit first; the call waits until
        there is room (the channel is told; over HTTP, as long as the server says) and
        sends only the rest again, in order, until every one is made or ``timeout``
        seconds pass in which none was (see :class:`_Backpressure`).

        Raises:
            ServerUnavailable: the server refused the connection before anything was sent
                (nothing was created), or no attempt was answered in time (the message
                gives the ids, to read the runs by).
            QueueFull: the queue stayed full for ``timeout`` seconds (``created``: the
                runs made before).
            ApiError: the server refused the input (422, or 409 for an id it holds for
                another run).
        """
        return await self._create_fitting(with_ids(creates), _Calls.create_many)

    async def _create_fitting(
        self, creates: list[TaskRunCreate], make_call: Callable[[list[TaskRunCreate]], _Call[list[TaskRun]]]
    ) -> list[TaskRun]:
        """Create ``creates`` as the server's queue limit lets them in (see :class:`_Backpressure`)."""
        pressure = _Backpressure(creates, self.timeout, self._rng, trio.current_time())
        while part := pressure.next():
            try:
                runs = await self._create(part, make_call)
            except QueueFull as full:
                if not pressure.refused(full, len(part), trio.current_time()):
                    await self._wait_for_room(pressure, full)
            else:
                pressure.accepted(runs, trio.current_time())
        return pressure.created

    async def _wait_for_room(self, pressure: _Backpressure, full: QueueFull) -> None:
        """Wait until the queue that refused ``full`` has room: until the client channel
        says so, when its refusal promised that; else until a long-poll of the queue's room
        (``GET /api/task_runs/room``) says so; else, or when that finds none, for the wait
        the server gave.

        Raises:
            QueueFull: no room within the call's timeout (see :class:`_Backpressure`).
        """
        channel = self.channel
        if channel is not None and full.room_announced:
            room = None
            with trio.move_on_at(pressure.deadline):
                room = await channel.wait_room(full)
            if room is not None:
                return
            if trio.current_time() >= pressure.deadline:
                raise pressure.give_up(full) from full
            # The channel was lost: the rest goes over HTTP, after the server's wait.
        elif (poll := pressure.room_poll(full, trio.current_time())) is not None:
            try:
                if pressure.polled(await self.call(poll)):
                    return
            except (ApiError, ServerUnavailable) as exc:
                log.debug("no room could be waited for (%r)", exc)
        await trio.sleep(pressure.pause(full, trio.current_time()))

    async def queue_room(self, task_key: str, *, wanted: int = 1, seconds: float = 30.0) -> int | None:
        """Long-poll: how many more runs of ``task_key`` fit in its queue (the server's
        ``--max-queued``), once ``wanted`` do or ``seconds`` (at most 60) passed; None when
        the server has no queue limit."""
        return await self.call(_Calls.queue_room(task_key, wanted, seconds))

    async def _create(
        self, creates: list[TaskRunCreate], make_call: Callable[[list[TaskRunCreate]], _Call[list[TaskRun]]]
    ) -> list[TaskRun]:
        lost: ServerUnavailable | None = None
        channel = self._live_channel()
        if channel is not None:
            try:
                return await channel.create(creates, partial=True)
            except ServerUnavailable as exc:
                log.info("a create was in flight on the lost client channel: sending it again over HTTP")
                lost = exc
        call = make_call(creates)  # only now: over the channel, the request is never built
        retries = _CreateRetries(self, call, trio.current_time(), lost)
        while True:
            args = self._request_args(call)
            args["timeout"] = retries.request_timeout(trio.current_time())
            url = self.servers.current
            try:
                response = await self._http.request(call.method, url + call.path, **args)
            except httpx.TransportError as exc:
                await trio.sleep(retries.pause_after(url, exc, trio.current_time()))
            else:
                if retries.answered(url, response):
                    return self._parse(call, response)

    async def read_task_run(self, run_id: uuid.UUID) -> TaskRun:
        return await self.call(_Calls.read(run_id))

    async def read_task_runs(
        self,
        *,
        task_key: str | None = None,
        state: StateType | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = False,
        tags: Sequence[str] = (),
        parent_task_run_id: uuid.UUID | None = None,
        group_id: uuid.UUID | None = None,
    ) -> list[TaskRun]:
        """Runs in the order they were created (``newest_first``: the reverse), filtered by
        task key, state type, ``tags`` (runs with every one of them), parent run (its
        children) and run group; ``offset`` of them skipped, at most ``limit`` (1 to 1000)."""
        call = _Calls.read_many(
            task_key, state, limit, offset, newest_first, tags, parent_task_run_id, group_id
        )
        return await self.call(call)

    async def descendants(self, run_id: uuid.UUID, *, limit: int = 1000) -> list[TaskRun]:
        """The runs submitted from inside ``run_id``, from inside those, and so on, in the
        order they were created; at most ``limit`` (1 to 10,000), the nearest levels first.

        Raises:
            NotFound: no such run.
        """
        return await self.call(_Calls.descendants(run_id, limit))

    async def cancel_group(self, group_id: uuid.UUID) -> GroupCancelResult:
        """Cancel a run group on the server, in one transaction: its runs that have not
        ended, their descendants, and the runs created in it from now on."""
        return await self.call(_Calls.cancel_group(group_id))

    async def find_task_runs(self, id_prefix: str, *, limit: int = 10) -> list[TaskRun]:
        """The runs whose id starts with ``id_prefix`` (hex digits, dashes optional, any
        case: ``"0b7c7c36"`` as tables show it), in id order, at most ``limit`` (1 to 1000).

        Raises:
            ApiError: 422 for a prefix that is not hex digits.
        """
        return await self.call(_Calls.find(id_prefix, limit))

    async def retry(self, run_id: uuid.UUID) -> TaskRun:
        """A new SCHEDULED run with the same task, arguments, tags, context and parent as the
        ended run ``run_id``.

        Raises:
            NotFound: no such run. ApiError: 409 when it has not ended (cancel it first).
        """
        return await self.call(_Calls.retry(run_id))

    async def purge(
        self, older_than: float, *, task_key: str | None = None, state: StateType | None = None
    ) -> int:
        """Delete, with their history, the runs that ended more than ``older_than`` seconds
        ago (0: every ended run), of ``task_key`` and in ``state`` (a state runs end in) when
        given; how many were deleted. Runs that have not ended are never touched.

        Raises:
            ApiError: 422 for an ``older_than`` below 0 or over 100 years, or a ``state``
                runs do not end in.
        """
        return await self.call(_Calls.purge(older_than, task_key, state))

    async def task_workers(self, task_key: str | None = None) -> list[dict[str, JSON]]:
        """The workers connected to the server in use (subscribed to ``task_key``, when
        given): ``{"client_id", "task_keys", "limit", "prefetch", "runs_in_flight",
        "connected_since"}`` each."""
        return await self.call(_Calls.task_workers(task_key))

    async def history(self, run_id: uuid.UUID) -> list[StateChange]:
        return await self.call(_Calls.history(run_id))

    async def set_state(self, run_id: uuid.UUID, state: State, *, force: bool = False) -> SetStateResult:
        return await self.call(_Calls.set_state(run_id, state, force))

    async def cancel(self, run_id: uuid.UUID) -> CancelResult:
        """Cancel the run and its descendants that have not ended (detached ones left alone).

        Raises:
            NotFound: no such run. ApiError: 409 when it had ended.
        """
        return await self.call(_Calls.cancel(run_id))

    async def delete(self, run_id: uuid.UUID) -> None:
        await self.call(_Calls.delete(run_id))

    async def wait(self, run_id: uuid.UUID, *, seconds: float = 30.0) -> TaskRun:
        """Long-poll: the run once it ended, or as it stands after ``seconds`` (at most 60)."""
        return await self.call(_Calls.wait(run_id, seconds))

    async def wait_many(
        self,
        run_ids: Sequence[uuid.UUID],
        *,
        seconds: float = 30.0,
        wait_all: bool = False,
        linger: float = 0.0,
    ) -> WaitResult:
        """Long-poll for many runs: answers once one (``wait_all``: every one) ended."""
        return await self.call(_Calls.wait_many(run_ids, seconds, wait_all=wait_all, linger=linger))

    # -- schedules (periodic runs: see trioworker.schedules)
    async def upsert_schedule(self, create: ScheduleCreate) -> Schedule:
        """Create the schedule ``create`` names on the server, or change it (sending the same
        again changes nothing); it as the server holds it, with its next fire time.

        Raises:
            ApiError: 422 for a schedule that cannot work (the detail says why in one line).
        """
        return await self.call(_Calls.upsert_schedule(create))

    async def schedules(self) -> list[Schedule]:
        """Every schedule on the server, by name."""
        return await self.call(_Calls.schedules())

    async def read_schedule(self, name: str) -> Schedule:
        """The schedule ``name``. Raises: NotFound: there is none."""
        return await self.call(_Calls.read_schedule(name))

    async def delete_schedule(self, name: str) -> None:
        """Delete the schedule ``name``: no more runs from it. Raises: NotFound: there is none."""
        await self.call(_Calls.delete_schedule(name))


class SyncTaskRunClient(_Base):
    """The blocking twin of :class:`TaskRunClient` (``httpx.Client``; no event loop); the
    same arguments."""

    def __init__(
        self,
        api_url: ApiUrls | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        ca_bundle: str | Path | None = None,
        insecure: bool | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(api_url, api_key, timeout, ca_bundle, insecure, headers)
        self._http = httpx.Client(transport=transport, **self._options())

    def __enter__(self) -> Self:
        self._http.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._http.__exit__(exc_type, exc, tb)

    def close(self) -> None:
        self._http.close()

    def call(self, call: _Call[T]) -> T:
        rounds = Rounds(self.servers, self._rng)
        while True:
            url = self.servers.current
            try:
                response = self._http.request(call.method, url + call.path, **self._request_args(call))
            except httpx.TransportError as exc:
                if self._try_next(rounds, url, call, exc):
                    continue
                raise self._unreachable(exc) from exc
            if self._answered(rounds, url, call, response):
                return self._parse(call, response)

    def health(self) -> dict[str, JSON]:
        return self.call(_Calls.health())

    def create_task_run(self, create: TaskRunCreate) -> TaskRun:
        """Create one run; the same as :meth:`create_task_runs` with one."""
        [run] = self._create_fitting(with_ids([create]), lambda part: _listed(_Calls.create(part[0])))
        return run

    def create_task_runs(self, creates: Sequence[TaskRunCreate]) -> list[TaskRun]:
        """Create runs; returns them in order. As :meth:`TaskRunClient.create_task_runs`
        (without the channel): a create whose connection dropped after it was sent is sent
        again with the same ids, and a full queue (429) is waited for; the same errors."""
        return self._create_fitting(with_ids(creates), _Calls.create_many)

    def _create_fitting(
        self, creates: list[TaskRunCreate], make_call: Callable[[list[TaskRunCreate]], _Call[list[TaskRun]]]
    ) -> list[TaskRun]:
        pressure = _Backpressure(creates, self.timeout, self._rng, time.monotonic())
        while part := pressure.next():
            try:
                runs = self._create(make_call(part))
            except QueueFull as full:
                if not pressure.refused(full, len(part), time.monotonic()):
                    self._wait_for_room(pressure, full)
            else:
                pressure.accepted(runs, time.monotonic())
        return pressure.created

    def _wait_for_room(self, pressure: _Backpressure, full: QueueFull) -> None:
        """As :meth:`TaskRunClient._wait_for_room`, without the channel."""
        if (poll := pressure.room_poll(full, time.monotonic())) is not None:
            try:
                if pressure.polled(self.call(poll)):
                    return
            except (ApiError, ServerUnavailable) as exc:
                log.debug("no room could be waited for (%r)", exc)
        time.sleep(pressure.pause(full, time.monotonic()))

    def queue_room(self, task_key: str, *, wanted: int = 1, seconds: float = 30.0) -> int | None:
        return self.call(_Calls.queue_room(task_key, wanted, seconds))

    def _create(self, call: _Call[list[TaskRun]]) -> list[TaskRun]:
        retries = _CreateRetries(self, call)
        while True:
            args = self._request_args(call)
            args["timeout"] = retries.request_timeout(time.monotonic())
            url = self.servers.current
            try:
                response = self._http.request(call.method, url + call.path, **args)
            except httpx.TransportError as exc:
                time.sleep(retries.pause_after(url, exc, time.monotonic()))
            else:
                if retries.answered(url, response):
                    return self._parse(call, response)

    def read_task_run(self, run_id: uuid.UUID) -> TaskRun:
        return self.call(_Calls.read(run_id))

    def read_task_runs(
        self,
        *,
        task_key: str | None = None,
        state: StateType | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = False,
        tags: Sequence[str] = (),
        parent_task_run_id: uuid.UUID | None = None,
        group_id: uuid.UUID | None = None,
    ) -> list[TaskRun]:
        call = _Calls.read_many(
            task_key, state, limit, offset, newest_first, tags, parent_task_run_id, group_id
        )
        return self.call(call)

    def find_task_runs(self, id_prefix: str, *, limit: int = 10) -> list[TaskRun]:
        return self.call(_Calls.find(id_prefix, limit))

    def retry(self, run_id: uuid.UUID) -> TaskRun:
        return self.call(_Calls.retry(run_id))

    def purge(self, older_than: float, *, task_key: str | None = None, state: StateType | None = None) -> int:
        return self.call(_Calls.purge(older_than, task_key, state))

    def task_workers(self, task_key: str | None = None) -> list[dict[str, JSON]]:
        return self.call(_Calls.task_workers(task_key))

    def history(self, run_id: uuid.UUID) -> list[StateChange]:
        return self.call(_Calls.history(run_id))

    def set_state(self, run_id: uuid.UUID, state: State, *, force: bool = False) -> SetStateResult:
        return self.call(_Calls.set_state(run_id, state, force))

    def cancel(self, run_id: uuid.UUID) -> CancelResult:
        return self.call(_Calls.cancel(run_id))

    def cancel_group(self, group_id: uuid.UUID) -> GroupCancelResult:
        return self.call(_Calls.cancel_group(group_id))

    def descendants(self, run_id: uuid.UUID, *, limit: int = 1000) -> list[TaskRun]:
        return self.call(_Calls.descendants(run_id, limit))

    def delete(self, run_id: uuid.UUID) -> None:
        self.call(_Calls.delete(run_id))

    def wait(self, run_id: uuid.UUID, *, seconds: float = 30.0) -> TaskRun:
        return self.call(_Calls.wait(run_id, seconds))

    def wait_many(
        self,
        run_ids: Sequence[uuid.UUID],
        *,
        seconds: float = 30.0,
        wait_all: bool = False,
        linger: float = 0.0,
    ) -> WaitResult:
        return self.call(_Calls.wait_many(run_ids, seconds, wait_all=wait_all, linger=linger))

    def upsert_schedule(self, create: ScheduleCreate) -> Schedule:
        return self.call(_Calls.upsert_schedule(create))

    def schedules(self) -> list[Schedule]:
        return self.call(_Calls.schedules())

    def read_schedule(self, name: str) -> Schedule:
        return self.call(_Calls.read_schedule(name))

    def delete_schedule(self, name: str) -> None:
        self.call(_Calls.delete_schedule(name))


# --------------------------------------------------------------------------- the ambient client

_current_async: Final[ContextVar[TaskRunClient | None]] = ContextVar("trioworker_client", default=None)
_current_sync: Final[ContextVar[SyncTaskRunClient | None]] = ContextVar(
    "trioworker_sync_client", default=None
)


@asynccontextmanager
async def connect(
    api_url: ApiUrls | None = None,
    api_key: str | None = None,
    *,
    channel: bool = True,
    open_stream: OpenStream | None = None,
    ca_bundle: str | Path | None = None,
    insecure: bool | None = None,
    headers: Mapping[str, str] | None = None,
) -> AsyncIterator[TaskRunClient]:
    """Use one client for every submission and future inside the block.

    The client keeps its HTTP connection alive and, with ``channel`` (the default), opens
    the client channel: one websocket over which runs are created and ended runs come
    back, about ten times cheaper per call than HTTP. Workers do this for the task code
    they run. ``open_stream`` is a test seam: it opens the channel's byte stream (see
    :mod:`trioworker._websocket`).

    ``api_url`` takes one server or several (see :class:`TaskRunClient`); the channel and
    the calls share one position in the list: when the channel finds its server gone, it
    opens on the next one, and the calls go there too.

    ``ca_bundle``, ``insecure`` and ``headers`` say how to connect, over HTTP and over the
    channel alike (see :class:`TaskRunClient`).

    **Resource handling:** the channel's socket and reader task live exactly as long as
    the block.
    """
    from trioworker.client.channel import open_channel

    async with TaskRunClient(
        api_url, api_key, ca_bundle=ca_bundle, insecure=insecure, headers=headers
    ) as client:
        token = _current_async.set(client)
        try:
            if channel:
                async with open_channel(
                    client.servers, client.api_key, open_stream=open_stream, connection=client.connection
                ) as opened:
                    client.channel = opened
                    try:
                        yield client
                    finally:
                        client.channel = None
            else:
                yield client
        finally:
            _current_async.reset(token)


@contextmanager
def connect_sync(
    api_url: ApiUrls | None = None,
    api_key: str | None = None,
    *,
    ca_bundle: str | Path | None = None,
    insecure: bool | None = None,
    headers: Mapping[str, str] | None = None,
) -> Iterator[SyncTaskRunClient]:
    """The blocking twin of :func:`connect` (``trioworker.sync.connect``)."""
    with SyncTaskRunClient(
        api_url, api_key, ca_bundle=ca_bundle, insecure=insecure, headers=headers
    ) as client:
        token = _current_sync.set(client)
        try:
            yield client
        finally:
            _current_sync.reset(token)


class _UsingClient:
    """:func:`using_client`'s context manager: a class, not an ``asynccontextmanager``
    generator, since it is entered twice per awaited run (submit, then wait)."""

    __slots__ = ("_fresh",)

    def __init__(self) -> None:
        self._fresh: TaskRunClient | None = None

    async def __aenter__(self) -> TaskRunClient:
        client = _current_async.get()
        if client is not None:
            return client
        fresh = TaskRunClient()
        await fresh.__aenter__()
        self._fresh = fresh
        return fresh

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        fresh, self._fresh = self._fresh, None
        if fresh is not None:
            await fresh.__aexit__(exc_type, exc, tb)


def using_client() -> _UsingClient:
    """``async with using_client() as client``: the client of the enclosing :func:`connect`,
    or a short-lived one (closed when the block ends)."""
    return _UsingClient()


@contextmanager
def using_sync_client() -> Iterator[SyncTaskRunClient]:
    client = _current_sync.get()
    if client is not None:
        yield client
        return
    with SyncTaskRunClient() as fresh:
        yield fresh
