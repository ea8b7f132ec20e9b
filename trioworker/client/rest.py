"""The REST clients: :class:`TaskRunClient` (async, for Trio) and :class:`SyncTaskRunClient`
(blocking, for plain code; it starts no event loop).

Both build the same requests (:class:`_Call`) and parse the same answers; only the
transport differs. Errors are translated where they happen: a refused or broken connection
becomes :class:`~trioworker.errors.ServerUnavailable`, an error status an
:class:`~trioworker.errors.ApiError` (:class:`~trioworker.errors.NotFound` for 404).

Creates are the exception to "raise at once": every run they create carries an id the
client chose, so a create whose answer was lost (the client channel, or its HTTP
connection, dropped after it was sent) is sent again over HTTP with the same ids, and the
server answers a repeat with the run it already made: never two runs, never none.

``async with trioworker.connect():`` (and ``with trioworker.sync.connect():``) makes one
client, with its kept-alive connection, the one every submission and future in the block
uses. Without it each call opens a short-lived client of its own.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from functools import cache
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, Self, TypeVar

import attrs
import httpx
import orjson
import trio

from trioworker import protocol
from trioworker._websocket import OpenStream, next_backoff, open_network_stream
from trioworker.errors import ApiError, NotFound, ServerUnavailable
from trioworker.models import (
    JSON,
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
from trioworker.settings import Settings, api_root

if TYPE_CHECKING:
    from trioworker.client.channel import ClientChannel

T = TypeVar("T")

log = logging.getLogger("trioworker.client")

#: Seconds a request may take; long-polls add their own wait on top.
DEFAULT_TIMEOUT: Final = 30.0
#: Times, in all, a create whose outcome is unknown is sent before ServerUnavailable (all
#: within the client's ``timeout`` of the first loss, with jittered backoff from 0.2 s).
CREATE_ATTEMPTS: Final = 8
#: The longest single long-poll; longer waits are several.
MAX_POLL_SECONDS: Final = 60.0


@cache
def _ssl_context() -> ssl.SSLContext:
    """One TLS context for every client: building one costs milliseconds."""
    return ssl.create_default_context()


def headers_for(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


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
    try:
        detail = str(response.json().get("detail", response.text))
    except (ValueError, AttributeError):
        detail = response.text or response.reason_phrase
    cls = NotFound if response.status_code == 404 else ApiError
    raise cls(response.status_code, detail)


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


def _listed(call: _Call[T]) -> _Call[list[T]]:
    """``call``, its answer read as a list of one."""
    parse = call.parse
    return _Call(call.method, call.path, lambda data: [parse(data)], call.body, call.params, call.wait)


def _ignore(data: JSON) -> None:
    return None


def _structure(cls: Any) -> Callable[[JSON], Any]:
    return lambda data: converter.structure(data, cls)


class _Calls:
    """The API, as request descriptions: shared by the async and the blocking client."""

    @staticmethod
    def health() -> _Call[dict[str, JSON]]:
        return _Call("GET", protocol.HEALTH, lambda d: dict(d))

    @staticmethod
    def create(create: TaskRunCreate) -> _Call[TaskRun]:
        return _Call("POST", protocol.RUNS, _structure(TaskRun), converter.unstructure(create))

    @staticmethod
    def create_many(creates: Sequence[TaskRunCreate]) -> _Call[list[TaskRun]]:
        return _Call(
            "POST", protocol.RUNS_BATCH, _structure(list[TaskRun]), converter.unstructure(list(creates))
        )

    @staticmethod
    def read(run_id: uuid.UUID) -> _Call[TaskRun]:
        return _Call("GET", protocol.RUN.format(run_id=run_id), _structure(TaskRun))

    @staticmethod
    def read_many(
        task_key: str | None, state: StateType | None, limit: int, offset: int
    ) -> _Call[list[TaskRun]]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if task_key is not None:
            params["task_key"] = task_key
        if state is not None:
            params["state"] = state.value
        return _Call("GET", protocol.RUNS, _structure(list[TaskRun]), params=params)

    @staticmethod
    def history(run_id: uuid.UUID) -> _Call[list[StateChange]]:
        return _Call("GET", protocol.RUN_HISTORY.format(run_id=run_id), _structure(list[StateChange]))

    @staticmethod
    def set_state(run_id: uuid.UUID, state: State, force: bool) -> _Call[SetStateResult]:
        body = converter.unstructure(SetStateRequest(state, force))
        return _Call("POST", protocol.RUN_SET_STATE.format(run_id=run_id), _structure(SetStateResult), body)

    @staticmethod
    def cancel(run_id: uuid.UUID) -> _Call[SetStateResult]:
        return _Call("POST", protocol.RUN_CANCEL.format(run_id=run_id), _structure(SetStateResult))

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
        return _Call("POST", protocol.RUNS_WAIT, _structure(WaitResult), body, wait=seconds + linger)


@attrs.define(eq=False)
class _CreateRetries:
    """When to send one create again: the rule the async and the blocking client share.

    A create that surely did not reach the server (connection refused) raises at once,
    as every call does. Once it may have and no answer came (``lost``: the channel or the
    connection dropped, a read timed out), it is sent again with backoff, up to
    :data:`CREATE_ATTEMPTS` times in all, within the client's ``timeout`` seconds of that
    first loss; a refused connection then counts as one more try (the server may be
    restarting).
    """

    client: _Base
    call: _Call[Any]
    #: When the first loss happened (the clock of the caller).
    lost_at: float = 0.0
    lost: Exception | None = None
    attempts: int = 0

    def request_timeout(self, now: float) -> float:
        """Seconds the next attempt may take."""
        if self.lost is None:
            return self.client.timeout
        return max(0.0, min(self.client.timeout, self.lost_at + self.client.timeout - now))

    def pause_after(self, exc: httpx.TransportError, now: float) -> float:
        """Seconds to wait before sending the create again; raises ServerUnavailable if not."""
        self.attempts += 1
        if self.lost is None:
            if _not_sent(exc):
                raise self.client._unreachable(exc) from exc
            self.lost, self.lost_at = exc, now
        pause = next_backoff(self.attempts - 1, self.client._rng)
        if self.attempts >= CREATE_ATTEMPTS or now + pause >= self.lost_at + self.client.timeout:
            raise self._give_up(exc) from exc
        log.info("a create got no answer (%r); sending it again in %.2f s", exc, pause)
        return pause

    def _give_up(self, exc: Exception) -> ServerUnavailable:
        body = self.call.body
        items = body if isinstance(body, list) else [body]
        ids = [str(item.get("id")) for item in items if isinstance(item, dict)]
        shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        tries = f"{self.attempts} attempt{'s' if self.attempts > 1 else ''}"
        return ServerUnavailable(
            f"cannot reach the trioworker server at {self.client.api_url} to confirm a create "
            f"(no answer to {tries} over HTTP; the last: {exc!r}); its runs may or may not "
            f"exist: read them by id ({shown})"
        )


class _Base:
    def __init__(self, api_url: str | None, api_key: str | None, timeout: float) -> None:
        settings = Settings.from_env()
        self.api_url = api_root(api_url or settings.api_url)
        self.api_key = api_key if api_key is not None else settings.api_key
        self.timeout = timeout
        #: Jitter for the pauses between attempts of a create.
        self._rng = random.Random()

    def _options(self) -> dict[str, Any]:
        return {
            "base_url": self.api_url,
            "headers": headers_for(self.api_key),
            "timeout": self.timeout,
            "verify": _ssl_context(),
        }

    def _request_args(self, call: _Call[Any]) -> dict[str, Any]:
        args: dict[str, Any] = {"params": call.params}
        if call.body is not None:
            args["content"] = orjson.dumps(call.body)
        if call.wait:
            args["timeout"] = self.timeout + call.wait
        return args

    def _unreachable(self, exc: Exception) -> ServerUnavailable:
        return ServerUnavailable(f"cannot reach the trioworker server at {self.api_url}: {exc!r}")

    @staticmethod
    def _parse(call: _Call[T], response: httpx.Response) -> T:
        _raise_for_status(response)
        return call.parse(orjson.loads(response.content) if response.content else None)


class TaskRunClient(_Base):
    """Async client of the task-run API: ``async with TaskRunClient() as client``.

    Args:
        api_url: the server, ``http://host:port`` as it prints it or ``.../api`` (default
            ``TRIOWORKER_API_URL``); ``ValueError`` if unusable (see
            :func:`trioworker.protocol.api_root`).
        api_key: sent as a bearer token (default ``TRIOWORKER_API_KEY``).
        transport: an httpx transport, for tests that do without a network.
    """

    def __init__(
        self,
        api_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(api_url, api_key, timeout)
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
        try:
            response = await self._http.request(call.method, call.path, **self._request_args(call))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return self._parse(call, response)

    async def health(self) -> dict[str, JSON]:
        return await self.call(_Calls.health())

    async def create_task_run(self, create: TaskRunCreate) -> TaskRun:
        """Create one run; the same as :meth:`create_task_runs` with one."""
        [with_id] = with_ids([create])
        [run] = await self._create([with_id], _listed(_Calls.create(with_id)))
        return run

    async def create_task_runs(self, creates: Sequence[TaskRunCreate]) -> list[TaskRun]:
        """Create runs (over the client channel when one is open); returns them in order.

        A create without an ``id`` gets one (uuid4) first. If the channel or the HTTP
        connection is lost after the create was sent (or the answer times out), it is sent
        again over HTTP with the same ids, and the server answers a repeat with the run it
        already made: up to :data:`CREATE_ATTEMPTS` attempts, with backoff, within
        ``timeout`` seconds of that loss.

        Raises:
            ServerUnavailable: the server refused the connection before anything was sent
                (nothing was created), or no attempt was answered in time (the message
                gives the ids, to read the runs by).
            ApiError: the server refused the input (422, or 409 for an id it holds for
                another run).
        """
        creates = with_ids(creates)
        return await self._create(creates, _Calls.create_many(creates))

    async def _create(self, creates: list[TaskRunCreate], call: _Call[list[TaskRun]]) -> list[TaskRun]:
        lost: ServerUnavailable | None = None
        channel = self._live_channel()
        if channel is not None:
            try:
                return await channel.create(creates)
            except ServerUnavailable as exc:
                log.info("a create was in flight on the lost client channel: sending it again over HTTP")
                lost = exc
        retries = _CreateRetries(self, call, trio.current_time(), lost)
        while True:
            args = self._request_args(call)
            args["timeout"] = retries.request_timeout(trio.current_time())
            try:
                response = await self._http.request(call.method, call.path, **args)
            except httpx.TransportError as exc:
                await trio.sleep(retries.pause_after(exc, trio.current_time()))
            else:
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
    ) -> list[TaskRun]:
        return await self.call(_Calls.read_many(task_key, state, limit, offset))

    async def history(self, run_id: uuid.UUID) -> list[StateChange]:
        return await self.call(_Calls.history(run_id))

    async def set_state(self, run_id: uuid.UUID, state: State, *, force: bool = False) -> SetStateResult:
        return await self.call(_Calls.set_state(run_id, state, force))

    async def cancel(self, run_id: uuid.UUID) -> SetStateResult:
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


class SyncTaskRunClient(_Base):
    """The blocking twin of :class:`TaskRunClient` (``httpx.Client``; no event loop)."""

    def __init__(
        self,
        api_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(api_url, api_key, timeout)
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
        try:
            response = self._http.request(call.method, call.path, **self._request_args(call))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return self._parse(call, response)

    def health(self) -> dict[str, JSON]:
        return self.call(_Calls.health())

    def create_task_run(self, create: TaskRunCreate) -> TaskRun:
        """Create one run; the same as :meth:`create_task_runs` with one."""
        [with_id] = with_ids([create])
        [run] = self._create(_listed(_Calls.create(with_id)))
        return run

    def create_task_runs(self, creates: Sequence[TaskRunCreate]) -> list[TaskRun]:
        """Create runs; returns them in order. As :meth:`TaskRunClient.create_task_runs`
        (without the channel): a create whose connection dropped after it was sent is sent
        again with the same ids; the same errors."""
        return self._create(_Calls.create_many(with_ids(creates)))

    def _create(self, call: _Call[list[TaskRun]]) -> list[TaskRun]:
        retries = _CreateRetries(self, call)
        while True:
            args = self._request_args(call)
            args["timeout"] = retries.request_timeout(time.monotonic())
            try:
                response = self._http.request(call.method, call.path, **args)
            except httpx.TransportError as exc:
                time.sleep(retries.pause_after(exc, time.monotonic()))
            else:
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
    ) -> list[TaskRun]:
        return self.call(_Calls.read_many(task_key, state, limit, offset))

    def history(self, run_id: uuid.UUID) -> list[StateChange]:
        return self.call(_Calls.history(run_id))

    def set_state(self, run_id: uuid.UUID, state: State, *, force: bool = False) -> SetStateResult:
        return self.call(_Calls.set_state(run_id, state, force))

    def cancel(self, run_id: uuid.UUID) -> SetStateResult:
        return self.call(_Calls.cancel(run_id))

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


# --------------------------------------------------------------------------- the ambient client

_current_async: Final[ContextVar[TaskRunClient | None]] = ContextVar("trioworker_client", default=None)
_current_sync: Final[ContextVar[SyncTaskRunClient | None]] = ContextVar(
    "trioworker_sync_client", default=None
)


@asynccontextmanager
async def connect(
    api_url: str | None = None,
    api_key: str | None = None,
    *,
    channel: bool = True,
    open_stream: OpenStream = open_network_stream,
) -> AsyncIterator[TaskRunClient]:
    """Use one client for every submission and future inside the block.

    The client keeps its HTTP connection alive and, with ``channel`` (the default), opens
    the client channel: one websocket over which runs are created and ended runs come
    back, about ten times cheaper per call than HTTP. Workers do this for the task code
    they run. ``open_stream`` is a test seam: it opens the channel's byte stream (see
    :mod:`trioworker._websocket`).

    **Resource handling:** the channel's socket and reader task live exactly as long as
    the block.
    """
    from trioworker.client.channel import open_channel

    async with TaskRunClient(api_url, api_key) as client:
        token = _current_async.set(client)
        try:
            if channel:
                async with open_channel(client.api_url, client.api_key, open_stream=open_stream) as opened:
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
def connect_sync(api_url: str | None = None, api_key: str | None = None) -> Iterator[SyncTaskRunClient]:
    """The blocking twin of :func:`connect` (``trioworker.sync.connect``)."""
    with SyncTaskRunClient(api_url, api_key) as client:
        token = _current_sync.set(client)
        try:
            yield client
        finally:
            _current_sync.reset(token)


@asynccontextmanager
async def using_client() -> AsyncIterator[TaskRunClient]:
    """The client of the enclosing :func:`connect`, or a short-lived one."""
    client = _current_async.get()
    if client is not None:
        yield client
        return
    async with TaskRunClient() as fresh:
        yield fresh


@contextmanager
def using_sync_client() -> Iterator[SyncTaskRunClient]:
    client = _current_sync.get()
    if client is not None:
        yield client
        return
    with SyncTaskRunClient() as fresh:
        yield fresh
