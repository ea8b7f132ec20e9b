"""Promises of the README that need a failure to be seen: each test here can fail.

Pickle is refused without ``allow_pickle``; the blocking futures cancel and complete; a
graceful server stop closes subscriptions with 1012 and workers come back; a worker that
resumes gets ``cancel`` for runs it lost; the client channel lost mid-call falls back to
HTTP. Every wait on the server or a worker has a ``trio.fail_after`` deadline.
"""

from __future__ import annotations

import contextlib
import math
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

import trioworker
from trioworker.client.rest import SyncTaskRunClient, TaskRunClient
from trioworker.models import StateType, TaskRun, TaskRunCreate, converter, make_state
from trioworker.protocol import SUBSCRIPTION_PATH
from trioworker.server import RunningServer, ServerConfig, serve_server
from trioworker.server.store.commit import GroupCommitStore
from trioworker.tasks import task
from trioworker.worker.task_worker import TaskWorker

from .fakes import CUTS, cutting_proxy
from .helpers import submit, wait_all
from .raw import subscribe

#: Every test here runs its server on each kind of store (tests/stores.py).
pytestmark = pytest.mark.every_store

Make = Callable[..., TaskWorker]

#: Real seconds any single wait on the server or a worker may take here.
DEADLINE = 30

# --------------------------------------------------------------------------- pickle

#: What unpickling ran, in this process (the worker runs here too).
unpickled: list[str] = []


def _explode(label: str) -> str:
    unpickled.append(label)
    return label


class Payload:
    """Pickles to a call of ``_explode``: unpickling it runs code, as a hostile pickle would."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return (_explode, (self.label,))


calls: list[object] = []


@task(key="p.echo", serializer="pickle")
def echo(value: object) -> object:
    calls.append(value)
    return value


@pytest.fixture(autouse=True)
def _fresh_records() -> None:
    unpickled.clear()
    calls.clear()


async def test_pickled_parameters_are_refused_without_allow_pickle(
    trioworker_worker: Make,
) -> None:
    future = await echo.delay(Payload("refused"))
    async with trioworker_worker(echo) as worker:
        assert not worker.allow_pickle  # the default
        with trio.fail_after(DEADLINE):
            error = await future.result(timeout=DEADLINE, raise_on_failure=False)
    assert isinstance(error, trioworker.ParameterError)
    assert "does not accept pickle" in str(error) and "--allow-pickle" in str(error)
    assert unpickled == []  # never unpickled: the hostile payload's code did not run
    assert calls == []  # and the task was not called
    state = await future.get_state()
    assert state.type is StateType.FAILED


async def test_pickled_parameters_and_results_are_accepted_with_allow_pickle(
    trioworker_worker: Make,
) -> None:
    future = await echo.delay(Payload("accepted"))
    values = await echo.map([{1, 2}, frozenset({"a"}), b"\x00bytes"])  # not JSON: pickle carries them
    async with trioworker_worker(echo, allow_pickle=True):
        with trio.fail_after(DEADLINE):
            assert await future.result(timeout=DEADLINE) == "accepted"
            results = [await f.result(timeout=DEADLINE) for f in values]
    assert unpickled == ["accepted"]
    assert results == [{1, 2}, frozenset({"a"}), b"\x00bytes"]


# --------------------------------------------------------------------------- blocking futures


@task(key="p.add")
async def add(a: int, b: int) -> int:
    return a + b


async def test_sync_cancel_stops_a_queued_run_and_reports_a_finished_one(
    trioworker_worker: Make,
) -> None:
    def submit_and_cancel() -> tuple[trioworker.SyncTaskRunFuture[int], bool]:
        future = add.sync.delay(1, 2)
        return future, future.cancel()

    with trio.fail_after(DEADLINE):
        queued, cancelled = await trio.to_thread.run_sync(submit_and_cancel)
    assert cancelled is True
    assert queued.state is not None and queued.state.type is StateType.CANCELLED
    done = await add.delay(3, 4)
    async with trioworker_worker(add):
        with trio.fail_after(DEADLINE):
            assert await done.result(timeout=DEADLINE) == 7
    with trio.fail_after(DEADLINE):
        again = await trio.to_thread.run_sync(trioworker.SyncTaskRunFuture(done.task_run_id, add).cancel)
    assert again is False  # it had finished: nothing to cancel
    assert (await done.get_state()).type is StateType.COMPLETED
    # The cancelled run was never delivered to the worker that ran since.
    assert (await trioworker.TaskRunFuture(queued.task_run_id, add).get_state()).type is StateType.CANCELLED


async def test_sync_as_completed_yields_each_future_once_as_it_ends(
    api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    gates = {i: trio.Event() for i in range(3)}

    @task(key="p.gated")
    async def gated(i: int) -> int:
        await gates[i].wait()
        return i * 10

    token = trio.lowlevel.current_trio_token()

    def collect(futures: list[trioworker.SyncTaskRunFuture[int]]) -> list[int]:
        # Each run is let go only after the previous one came out of as_completed: the
        # order is the order they ended, which is not the order submitted.
        seen: list[int] = []
        for future in trioworker.sync.as_completed(futures, timeout=DEADLINE):
            seen.append(future.result())
            following = {20: 0, 0: 10}.get(seen[-1])
            if following is not None:
                trio.from_thread.run_sync(gates[following // 10].set, trio_token=token)
        return seen

    futures = await trio.to_thread.run_sync(lambda: gated.sync.map([0, 1, 2]))
    async with trioworker_worker(gated, limit=3):
        gates[2].set()
        with trio.fail_after(DEADLINE):
            order = await trio.to_thread.run_sync(collect, futures)
    assert order == [20, 0, 10]


async def test_sync_as_completed_raises_timeout_error_for_runs_that_do_not_end(
    trioworker_server: object,
) -> None:
    futures = await trio.to_thread.run_sync(lambda: add.sync.map([1], b=[2]))
    with trio.fail_after(DEADLINE), pytest.raises(TimeoutError, match=r"1 task run\(s\) still running"):
        await trio.to_thread.run_sync(lambda: list(trioworker.sync.as_completed(futures, timeout=0.2)))


# --------------------------------------------------------------------------- graceful server stop


@attrs.define
class GracefulServer:
    """A server started with a ``shutdown`` event (as ``trioworker server`` stops on Ctrl-C)."""

    nursery: trio.Nursery
    config: ServerConfig
    shutdown: trio.Event = attrs.field(factory=trio.Event)
    stopped: trio.Event = attrs.field(factory=trio.Event)

    async def start(self) -> RunningServer:
        self.shutdown, self.stopped = trio.Event(), trio.Event()
        shutdown, stopped = self.shutdown, self.stopped

        async def run(*, task_status: trio.TaskStatus[RunningServer]) -> None:
            try:
                await serve_server(self.config, shutdown=shutdown, task_status=task_status)
            finally:
                stopped.set()

        running: RunningServer = await self.nursery.start(run)
        self.config = attrs.evolve(self.config, port=int(running.url.rsplit(":", 1)[1]))
        return running

    async def stop(self) -> None:
        """Stop gracefully; returns once the server returned (its database closed)."""
        self.shutdown.set()
        with trio.fail_after(DEADLINE):
            await self.stopped.wait()


@pytest.fixture
async def graceful(tmp_path: Path) -> AsyncIterator[GracefulServer]:
    async with trio.open_nursery() as nursery:
        yield GracefulServer(nursery, ServerConfig(db_path=tmp_path / "graceful.db", port=0))
        nursery.cancel_scope.cancel()


async def test_a_graceful_stop_closes_subscriptions_with_1012(graceful: GracefulServer) -> None:
    server = await graceful.start()
    async with subscribe(server, ["k"]) as sub:
        await sub.send({"type": "ack"})
        graceful.shutdown.set()
        with trio.fail_after(DEADLINE), pytest.raises(ConnectionClosed) as closed:
            await sub.ws.get_message()
    assert closed.value.reason is not None
    assert (closed.value.reason.code, closed.value.reason.reason) == (1012, "the server is stopping")
    with trio.fail_after(DEADLINE):
        await graceful.stopped.wait()  # and the server finished by itself


async def test_a_worker_reconnects_after_a_graceful_stop_and_its_run_runs_once(
    graceful: GracefulServer, caplog: pytest.LogCaptureFixture
) -> None:
    entered, proceed = trio.Event(), trio.Event()
    ran: list[int] = []

    @task(key="p.held")
    async def held(n: int) -> int:
        ran.append(n)
        entered.set()
        await proceed.wait()
        return n + 1

    server = await graceful.start()
    async with httpx.AsyncClient(base_url=server.api_url, timeout=DEADLINE) as api:
        [first] = await submit(api, "p.held", {"n": 1})
    worker = TaskWorker(held, api_url=server.api_url, shutdown_grace_seconds=5)
    async with worker:
        with trio.fail_after(DEADLINE):
            await entered.wait()
        await graceful.stop()  # the run is in flight on the worker
        assert "closed with 1012 the server is stopping" in caplog.text
        server = await graceful.start()  # the same port and file
        proceed.set()
        async with httpx.AsyncClient(base_url=server.api_url, timeout=DEADLINE) as api:
            [later] = await submit(api, "p.held", {"n": 2})
            with trio.fail_after(DEADLINE):
                runs = await wait_all(api, [first, later])
    assert [r["state"]["data"] for r in runs] == [2, 3]
    assert sorted(ran) == [1, 2]  # the run held across the stop ran once


# --------------------------------------------------------------------------- resuming


async def test_a_resumed_subscription_is_told_to_cancel_runs_it_no_longer_holds(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    ids = await submit(api, "k", {"i": 1}, {"i": 2}, {"i": 3})
    async with subscribe(trioworker_server, ["k"], credit=3, client_id="resumer") as first:
        delivered = [r["id"] for r in await first.runs()]
        while len(delivered) < 3:
            delivered += [r["id"] for r in await first.runs()]
        await first.report(delivered, "RUNNING")
    # The connection is gone: the runs are SCHEDULED/Redelivered. One is cancelled, one is
    # taken by another worker; the third is still there for the client to reclaim.
    cancelled, taken, kept = ids
    assert (await api.post(f"/task_runs/{cancelled}/cancel")).status_code == 200
    async with subscribe(trioworker_server, ["k"], credit=1, client_id="other") as other:
        assert [r["id"] for r in await other.runs()] == [taken]
        resumed = subscribe(trioworker_server, ["k"], credit=3, client_id="resumer", held=delivered)
        async with resumed as again:
            with trio.fail_after(DEADLINE):
                notice = await again.receive()
                while notice["type"] != "cancel":
                    notice = await again.receive()
            assert sorted(notice["ids"]) == sorted([cancelled, taken])
            # The kept run is leased to it again (not delivered again), and its report counts.
            results = await again.report([kept], "COMPLETED", data=3)
            assert [r["status"] for r in results] == ["ACCEPT"]
    run = (await api.get(f"/task_runs/{kept}")).json()
    assert (run["state"]["type"], run["run_count"]) == ("COMPLETED", 1)


# --------------------------------------------------------------------------- a scripted server
#
# What the real server never does (deliver a key the worker did not ask for, deliver a run
# twice) is played by a websocket server of the test's, on a real socket.

Script = Callable[[WebSocketConnection, dict[str, Any]], Awaitable[None]]


def wire_run(key: str, **parameters: Any) -> dict[str, Any]:
    run = TaskRun(uuid.uuid4(), key, key, make_state(StateType.PENDING), parameters=parameters)
    wire: dict[str, Any] = converter.unstructure(run)
    return wire


async def send(ws: WebSocketConnection, message: dict[str, Any]) -> None:
    await ws.send_message(orjson.dumps(message).decode())


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(await ws.get_message())
    return message


async def answer_until_quit(
    ws: WebSocketConnection, seen: list[dict[str, Any]], completed: trio.Event | None = None
) -> None:
    """Accept every report (recording what comes) until the worker quits; then close with 1000.
    ``completed`` is set once a COMPLETED report came."""
    while True:
        message = await receive(ws)
        seen.append(message)
        if message["type"] == "states":
            results = [{"id": s["id"], "ref": s["ref"], "status": "ACCEPT"} for s in message["states"]]
            await send(ws, {"type": "state_results", "results": results})
            if completed is not None and any(s["state"]["type"] == "COMPLETED" for s in message["states"]):
                completed.set()
        elif message["type"] == "quit":
            await ws.aclose(1000, "quit")
            return


@asynccontextmanager
async def scripted_server(*scripts: Script) -> AsyncIterator[str]:
    """A subscription endpoint playing ``scripts[n]`` on the n-th connection; yields the API URL.

    The client channel is accepted and left idle (a refused handshake would leak the
    client's socket inside trio-websocket 0.12)."""
    connections = iter(scripts)

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        if not request.path.endswith(SUBSCRIPTION_PATH):
            with contextlib.suppress(ConnectionClosed):
                await receive(ws)
                await send(ws, {"type": "auth_success"})
                await receive(ws)  # nothing comes: the worker creates no runs
            return
        script = next(connections)
        assert (await receive(ws))["type"] == "auth"
        await send(ws, {"type": "auth_success"})
        hello = await receive(ws)
        assert hello["type"] == "subscribe"
        with contextlib.suppress(ConnectionClosed):
            await script(ws, hello)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, handler, "127.0.0.1", 0, ssl_context=None))
        yield f"http://127.0.0.1:{server.port}/api"
        nursery.cancel_scope.cancel()


async def test_a_run_of_a_key_the_worker_does_not_serve_is_released() -> None:
    stranger = wire_run("p.nobody")
    seen: list[dict[str, Any]] = []
    released = trio.Event()

    async def script(ws: WebSocketConnection, hello: dict[str, Any]) -> None:
        assert hello["keys"] == ["p.add"]
        await send(ws, {"type": "task_runs", "task_runs": [stranger]})
        while (message := await receive(ws))["type"] != "release":
            seen.append(message)
        seen.append(message)
        released.set()
        await answer_until_quit(ws, seen)

    async with scripted_server(script) as api_url, TaskWorker(add, api_url=api_url) as worker:
        with trio.fail_after(DEADLINE):
            await released.wait()
        assert worker.current_tasks == 0
    assert {"type": "release", "ids": [stranger["id"]]} in seen
    assert not [m for m in seen if m["type"] == "states"]  # never reported on: it did not run


async def test_a_run_delivered_again_after_a_reconnect_runs_once() -> None:
    entered, proceed = trio.Event(), trio.Event()
    calls: list[int] = []

    @task(key="p.once")
    async def once(n: int) -> int:
        calls.append(n)
        entered.set()
        await proceed.wait()
        return n * 2

    run = wire_run("p.once", n=21)
    seen: list[dict[str, Any]] = []
    hellos: list[dict[str, Any]] = []

    async def first(ws: WebSocketConnection, hello: dict[str, Any]) -> None:
        hellos.append(hello)
        await send(ws, {"type": "task_runs", "task_runs": [run]})
        with trio.fail_after(DEADLINE):
            await entered.wait()
        await ws.aclose(1011, "lost")  # the connection drops while the run is in flight

    async def second(ws: WebSocketConnection, hello: dict[str, Any]) -> None:
        hellos.append(hello)
        await send(ws, {"type": "task_runs", "task_runs": [run]})  # the same run again
        proceed.set()
        await answer_until_quit(ws, seen, completed)

    completed = trio.Event()
    async with scripted_server(first, second) as api_url, TaskWorker(once, api_url=api_url) as worker:
        with trio.fail_after(DEADLINE):
            await completed.wait()
    assert calls == [21]  # ran once
    assert hellos[1]["held"] == [run["id"]]  # the worker said it still held it
    finals = [s for m in seen for s in m.get("states", []) if s["state"]["type"] == "COMPLETED"]
    assert [(s["id"], s["state"]["data"]) for s in finals] == [(run["id"], 42)]
    assert worker.finished_task_runs == {"p.once": 1}


# --------------------------------------------------------------------------- the client channel


async def test_the_client_channel_lost_mid_wait_falls_back_to_http(
    trioworker_server: RunningServer, trioworker_worker: Make, caplog: pytest.LogCaptureFixture
) -> None:
    results: list[int] = []
    returned = trio.Event()
    async with trioworker.connect() as client:
        channel = client.channel
        assert channel is not None and channel.usable
        future = await add.delay(1, 2)  # created over the channel

        async def wait() -> None:
            results.append(await future.result(timeout=DEADLINE))
            returned.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert future.task_run_id in channel._watches  # the wait is on the channel
            assert channel.ws is not None
            await trio.aclose_forcefully(channel.ws._stream)  # the socket is lost mid-call
            with trio.fail_after(DEADLINE):
                await trio.testing.wait_all_tasks_blocked()
            assert channel.broken is not None  # lost
            assert not returned.is_set()  # and the wait goes on, over HTTP now
            async with trioworker_worker(add):
                with trio.fail_after(DEADLINE):
                    await returned.wait()
        assert results == [3]
        later = await add.delay(2, 3)  # after the loss, calls go over HTTP
        async with trioworker_worker(add):
            with trio.fail_after(DEADLINE):
                assert await later.result(timeout=DEADLINE) == 5
    assert "using HTTP until it is open again" in caplog.text


async def test_a_resumed_worker_told_to_cancel_a_run_it_held_cancels_it() -> None:
    entered = trio.Event()
    outcome: list[str] = []

    @task(key="p.lost")
    async def lost() -> str:
        entered.set()
        try:
            await trio.sleep_forever()
        finally:
            outcome.append("cancelled")

    run = wire_run("p.lost")
    seen: list[dict[str, Any]] = []
    hellos: list[dict[str, Any]] = []
    ended = trio.Event()

    async def first(ws: WebSocketConnection, hello: dict[str, Any]) -> None:
        await send(ws, {"type": "task_runs", "task_runs": [run]})
        with trio.fail_after(DEADLINE):
            await entered.wait()
        await ws.aclose(1012, "restarting")

    async def second(ws: WebSocketConnection, hello: dict[str, Any]) -> None:
        hellos.append(hello)
        # As the real server answers a resume with a run someone else took (or cancelled).
        await send(ws, {"type": "cancel", "ids": [run["id"]]})
        while True:
            message = await receive(ws)
            seen.append(message)
            if message["type"] == "states":
                results = [{"id": s["id"], "ref": s["ref"], "status": "ACCEPT"} for s in message["states"]]
                await send(ws, {"type": "state_results", "results": results})
            if message["type"] == "release":
                ended.set()
            if message["type"] == "quit":
                await ws.aclose(1000, "quit")
                return

    async with scripted_server(first, second) as api_url, TaskWorker(lost, api_url=api_url) as worker:
        with trio.fail_after(DEADLINE):
            await ended.wait()
        assert worker.current_tasks == 0
    assert hellos[0]["held"] == [run["id"]]
    assert outcome == ["cancelled"]
    reported = [s["state"]["type"] for m in seen for s in m.get("states", [])]
    assert "COMPLETED" not in reported
    assert {"type": "release", "ids": [run["id"]]} in seen  # the lease the server kept is let go


@pytest.mark.parametrize("how", ["key", "no key", "map"])
async def test_a_create_in_flight_when_the_channel_is_lost_is_sent_again_over_http(
    trioworker_server: RunningServer, api: httpx.AsyncClient, how: str
) -> None:
    store = trioworker_server.service.store
    assert isinstance(store, GroupCommitStore)
    gate = threading.Event()
    held = store._queue(lambda ops: gate.wait(DEADLINE))  # the store is busy: no answer comes yet
    created: list[trioworker.TaskRunFuture[int]] = []
    errors: list[Exception] = []
    async with trioworker.connect() as client:
        channel = client.channel
        assert channel is not None

        async def create() -> None:
            try:
                if how == "map":
                    created.extend(await add.map([1, 2, 3], [4, 5, 6]))
                else:
                    key = "greeting-42" if how == "key" else None
                    created.append(await add.apply_async(args=[1, 2], idempotency_key=key))
            except trioworker.ServerUnavailable as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create)
            await trio.testing.wait_all_tasks_blocked()  # sent; the server waits for the store
            assert channel._calls  # in flight
            assert channel.ws is not None
            await trio.aclose_forcefully(channel.ws._stream)  # the socket is lost mid-call
            with trio.fail_after(DEADLINE):
                await trio.testing.wait_all_tasks_blocked()
            gate.set()
        await held.result()
    runs = (await api.get("/task_runs")).json()
    # The server got the first call; the call was sent again over HTTP with the same run ids
    # (and key, if any), and the server gave back the runs the lost call made: no run twice,
    # none lost, and the caller gets them.
    assert not errors
    assert [str(f.task_run_id) for f in created] == [run["id"] for run in runs]
    assert [run["parameters"] for run in runs] == (
        [{"a": 1, "b": 4}, {"a": 2, "b": 5}, {"a": 3, "b": 6}] if how == "map" else [{"a": 1, "b": 2}]
    )


def _port(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _creates(n: int) -> list[TaskRunCreate]:
    return [TaskRunCreate(task_key="p.add", parameters={"a": i, "b": 1}) for i in range(n)]


async def _create_through(
    api_url: str, kind: str, creates: list[TaskRunCreate], client_timeout: float
) -> list[TaskRun]:
    """Create ``creates`` with the client ``kind`` names (the blocking one in a thread)."""
    if kind.startswith("sync"):

        def blocking() -> list[TaskRun]:
            with SyncTaskRunClient(api_url, timeout=client_timeout) as client:
                if kind == "sync one":
                    return [client.create_task_run(creates[0])]
                return client.create_task_runs(creates)

        return await trio.to_thread.run_sync(blocking)
    async with TaskRunClient(api_url, timeout=client_timeout) as client:
        if kind == "async one":
            return [await client.create_task_run(creates[0])]
        return await client.create_task_runs(creates)


@pytest.mark.parametrize(
    ("how", "kind"),
    [
        (how, kind)
        for how in CUTS
        for kind in ("async one", "async many", "sync one", "sync many")
        if how != "hang" or kind.endswith("one")
    ],
)
async def test_a_create_whose_http_call_is_cut_is_sent_again(
    trioworker_server: RunningServer, api: httpx.AsyncClient, how: str, kind: str
) -> None:
    creates = _creates(1 if kind.endswith("one") else 3)
    async with cutting_proxy(_port(trioworker_server), how) as proxy:
        with trio.fail_after(DEADLINE):
            # hang: the answer never comes; the client gives up on it after its timeout (3 s).
            created = await _create_through(proxy.api_url, kind, creates, client_timeout=3)
    assert (proxy.cut, proxy.passed) == (1, 1)  # cut once, then sent again
    runs = (await api.get("/task_runs")).json()
    # One run per create, never two; the caller got them, in order.
    assert [run["id"] for run in runs] == [str(run.id) for run in created]
    assert [run["parameters"] for run in runs] == [c.parameters for c in creates]


async def test_task_submissions_whose_http_call_is_cut_are_sent_again(
    trioworker_server: RunningServer, api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with cutting_proxy(_port(trioworker_server), "after", cuts=4) as proxy:
        monkeypatch.setenv("TRIOWORKER_API_URL", proxy.api_url)
        with trio.fail_after(DEADLINE):
            futures: list[Any] = [await add.delay(1, 2), *(await add.map([3, 4], [5, 6]))]
            futures += await trio.to_thread.run_sync(
                lambda: [add.sync.delay(7, 8), *add.sync.map([9], [10])]  # the blocking client's own path
            )
    assert (proxy.cut, proxy.passed) == (4, 4)
    runs = (await api.get("/task_runs")).json()
    assert [run["id"] for run in runs] == [str(f.task_run_id) for f in futures]
    assert [(run["parameters"]["a"], run["parameters"]["b"]) for run in runs] == [
        (1, 2),
        (3, 5),
        (4, 6),
        (7, 8),
        (9, 10),
    ]


@pytest.mark.parametrize("kind", ["async many", "sync one"])
async def test_a_create_never_answered_gives_up_within_the_timeout_and_names_its_ids(
    trioworker_server: RunningServer, api: httpx.AsyncClient, kind: str
) -> None:
    creates = _creates(1 if kind.endswith("one") else 5)
    async with cutting_proxy(_port(trioworker_server), "after", cuts=math.inf) as proxy:
        with trio.fail_after(DEADLINE), pytest.raises(trioworker.ServerUnavailable) as raised:
            await _create_through(proxy.api_url, kind, creates, client_timeout=1)
    assert proxy.cut >= 2 and proxy.passed == 0  # sent again, and every answer was cut
    message = str(raised.value)
    assert "may or may not exist: read them by id" in message
    runs = (await api.get("/task_runs")).json()
    # However often it was sent, each create made one run: the ids the message names.
    assert len(runs) == len(creates)
    assert all(run["id"] in message for run in runs[:3])
    assert ("and 2 more" in message) == (len(creates) == 5)
