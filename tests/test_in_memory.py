"""The worker's clients without a socket, tested as Trio tests its own: over memory streams.

The subscription client and :class:`TaskWorker` open their websockets through the
``open_stream`` seam (see :mod:`trioworker._websocket`). Here it returns one end of
:func:`trio.testing.memory_stream_pair`, and :func:`tests.fakes.memory_sockets` serves the
other end as the server (trio-websocket's ``wrap_server_stream``): the test speaks the
server's part of the protocol message by message. Every test here runs with Trio's socket
factory and hostname resolver replaced by ones that fail the test (the ``fake`` fixture
sees to it), so nothing here can reach for the network. Where time passes (a reconnect's
backoff, a grace period) the clock is Trio's ``MockClock``; tests with sync tasks keep the
real clock (an autojump clock would jump while a thread works) and never wait on it.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import pytest
import trio
import trio.testing

from trioworker import protocol
from trioworker._websocket import connect
from trioworker.models import SetStateStatus, StateType, TaskRun, make_state
from trioworker.tasks import task
from trioworker.worker.subscription import SubscriptionClient
from trioworker.worker.task_worker import TaskWorker, serve

from .fakes import MemorySockets, Session, answer_states, delivered, memory_sockets, quit_when_asked

#: A host no test could reach: every connection to it goes through the fake.
API_URL = "http://server.test:4300"


class _NoNetwork(trio.abc.SocketFactory, trio.abc.HostnameResolver):
    """Refuses any socket made, or name looked up, through Trio, and remembers each try:
    code under test may catch the error (a worker turns it into a FAILED run), so the
    fixture fails the test afterwards from what was remembered."""

    def __init__(self) -> None:
        self.tries: list[str] = []

    def _refuse(self, what: str) -> NoReturn:
        self.tries.append(what)
        raise AssertionError(what)

    def socket(self, family: int = 0, type: int = 0, proto: int = 0) -> NoReturn:
        self._refuse(f"a socket was opened (family {family}, type {type})")

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> NoReturn:
        self._refuse(f"a name was looked up: {host!r}")

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> NoReturn:
        self._refuse(f"an address was looked up: {sockaddr!r}")


@pytest.fixture
async def no_network() -> AsyncIterator[_NoNetwork]:
    """For this test's Trio run only (both settings are run-local), no socket; the test
    fails if anything tried one. (Not ``autouse``: pytest-trio does not run async autouse
    fixtures; ``fake`` asks for it.)"""
    guard = _NoNetwork()
    trio.socket.set_custom_socket_factory(guard)
    trio.socket.set_custom_hostname_resolver(guard)
    yield guard
    trio.socket.set_custom_socket_factory(None)
    trio.socket.set_custom_hostname_resolver(None)
    assert guard.tries == [], "the network was used"


@pytest.fixture
async def fake(no_network: _NoNetwork) -> AsyncIterator[MemorySockets]:
    async with memory_sockets() as sockets:
        yield sockets


def subscription_client(fake: MemorySockets, **options: Any) -> SubscriptionClient:
    arguments: dict[str, Any] = {
        "api_url": API_URL,
        "api_key": None,
        "keys": ("m.k",),
        "client_id": "w-1",
        "credit": 2,
        "held": set,
        "on_cancel": lambda ids: None,
        "open_stream": fake.open_stream,
    }
    return SubscriptionClient(**(arguments | options))


def is_connected(client: SubscriptionClient | TaskWorker) -> bool:
    """``client.connected``, read afresh (mypy would keep an earlier assert's answer)."""
    return client.connected


async def test_the_guard_refuses_every_socket_and_remembers_it() -> None:
    guard = _NoNetwork()
    trio.socket.set_custom_socket_factory(guard)
    trio.socket.set_custom_hostname_resolver(guard)
    with pytest.raises(ExceptionGroup) as opened:
        await trio.open_tcp_stream("127.0.0.1", 4300)
    assert opened.group_contains(AssertionError, match="a socket was opened")
    with pytest.raises(AssertionError, match="a name was looked up"):
        await trio.open_tcp_stream("server.test", 4300)
    assert [t.split(" (")[0].split(":")[0] for t in guard.tries] == [
        "a socket was opened",
        "a name was looked up",
    ]


async def test_connect_opens_its_stream_through_the_seam_and_closes_it(fake: MemorySockets) -> None:
    async with trio.open_nursery() as nursery:

        async def client() -> None:
            async with connect("wss://server.test/some/path?x=1", open_stream=fake.open_stream) as ws:
                await ws.send_message("hello")

        nursery.start_soon(client)
        session = await fake.next()
        assert fake.opened == [("server.test", 443, True)]  # wss: TLS on the default port
        assert session.path == "/some/path?x=1"
        assert await session.ws.get_message() == "hello"
        assert await session.close_code() == protocol.CLOSE_NORMAL  # closed on the way out


async def test_the_subscription_handshakes_delivers_runs_and_carries_reports(fake: MemorySockets) -> None:
    client = subscription_client(fake, api_key="secret", credit=3, prefetch=1)
    send, receive = trio.open_memory_channel[TaskRun](10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run, send)
        session = await fake.next()
        assert fake.opened == [("server.test", 4300, False)]
        assert session.path == "/api" + protocol.SUBSCRIPTION_PATH
        assert await session.receive() == {"type": "auth", "token": "secret"}
        await session.send({"type": "auth_success"})
        assert await session.receive() == {
            "type": "subscribe",
            "keys": ["m.k"],
            "client_id": "w-1",
            "credit": 3,
            "prefetch": 1,
            "held": [],
        }
        runs = [delivered("m.k", {"n": 1}), delivered("m.k", {"n": 2})]
        await session.send({"type": "task_runs", "task_runs": runs})
        got = [await receive.receive(), await receive.receive()]
        assert [str(run.id) for run in got] == [run["id"] for run in runs]
        assert got[1].parameters == {"n": 2}
        assert is_connected(client)

        answers = []

        async def report() -> None:
            answers.append(await client.report(got[0].id, make_state(StateType.RUNNING)))

        nursery.start_soon(report)
        [entry] = (await session.receive_type("states"))["states"]
        assert (entry["id"], entry["state"]["type"]) == (runs[0]["id"], "RUNNING")
        await session.send(
            {
                "type": "state_results",
                "results": [{"ref": entry["ref"], "status": "REJECT", "details": "taken elsewhere"}],
            }
        )
        client.quit()
        await quit_when_asked(session)
    [answer] = answers
    assert answer.status is SetStateStatus.REJECT
    assert answer.state.type is StateType.RUNNING and answer.details == "taken elsewhere"
    assert not is_connected(client) and client.reconnects == 0


async def test_a_cancel_from_the_server_reaches_the_worker(fake: MemorySockets) -> None:
    cancelled: list[uuid.UUID] = []
    told = trio.Event()

    def on_cancel(ids: list[uuid.UUID]) -> None:
        cancelled.extend(ids)
        told.set()

    client = subscription_client(fake, on_cancel=on_cancel)
    send, _receive = trio.open_memory_channel[TaskRun](10)
    run_id = uuid.uuid4()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run, send)
        session = await fake.next()
        await session.accept_subscription()
        await session.send({"type": "cancel", "ids": [str(run_id)]})
        with trio.fail_after(10):
            await told.wait()
        assert cancelled == [run_id]
        client.quit()
        await quit_when_asked(session)


async def test_a_cut_connection_is_made_again_with_the_runs_still_held(
    fake: MemorySockets, autojump_clock: trio.testing.MockClock
) -> None:
    held: set[uuid.UUID] = set()
    client = subscription_client(fake, held=lambda: set(held))
    send, receive = trio.open_memory_channel[TaskRun](10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run, send)
        first = await fake.next()
        await first.accept_subscription()
        run = delivered("m.k")
        await first.send({"type": "task_runs", "task_runs": [run]})
        run_id = (await receive.receive()).id
        held.add(run_id)
        answers = []

        async def report() -> None:
            answers.append(await client.report(run_id, make_state(StateType.COMPLETED, data=7)))

        nursery.start_soon(report)
        [lost] = (await first.receive_type("states"))["states"]
        cut_at = trio.current_time()
        await first.cut()  # the report is never answered on this connection

        second = await fake.next()
        assert trio.current_time() > cut_at  # after a backoff
        subscribe = await second.accept_subscription()
        assert subscribe["held"] == [run["id"]]  # the server learns the run is still ours
        [again] = (await second.receive_type("states"))["states"]
        assert again == lost  # the same report, sent again
        await second.send(
            {"type": "state_results", "results": [{"ref": again["ref"], "status": "ACCEPT", "details": None}]}
        )
        client.quit()
        await quit_when_asked(second)
    assert [a.status for a in answers] == [SetStateStatus.ACCEPT]
    assert client.reconnects == 1
    assert len(fake.opened) == 2


@pytest.mark.parametrize("frame", ["{nope", '{"type": "dance"}', b'{"type": "cancel", "ids": []}'])
async def test_a_malformed_message_closes_with_1002_and_the_subscription_is_made_again(
    fake: MemorySockets, autojump_clock: trio.testing.MockClock, frame: str | bytes
) -> None:
    client = subscription_client(fake)
    send, receive = trio.open_memory_channel[TaskRun](10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run, send)
        first = await fake.next()
        await first.accept_subscription()
        await first.send(frame)
        assert await first.close_code() == protocol.CLOSE_PROTOCOL_ERROR
        second = await fake.next()
        await second.accept_subscription()
        run = delivered("m.k")
        await second.send({"type": "task_runs", "task_runs": [run]})
        assert str((await receive.receive()).id) == run["id"]
        client.quit()
        await quit_when_asked(second)
    assert client.reconnects == 1


async def test_each_message_pushes_the_ping_back_and_an_unanswered_ping_drops_the_connection(
    fake: MemorySockets, autojump_clock: trio.testing.MockClock
) -> None:
    """The keepalive pings keepalive_idle seconds after the last message from the server, not
    before; without a pong within keepalive_timeout the connection is dropped. Here nothing
    the client sends reaches the server once subscribed (its pings get no pong), so the
    moment of the drop tells when it pinged."""
    held_back = False

    async def open_stream(host: str, port: int, secure: bool) -> trio.abc.Stream:
        to_server, server_reads = trio.testing.memory_stream_one_way_pair()
        server_writes, from_server = trio.testing.memory_stream_one_way_pair()
        pump = to_server.send_all_hook
        assert pump is not None

        async def pump_unless_held_back() -> None:
            if not held_back:
                await pump()

        to_server.send_all_hook = pump_unless_held_back
        fake.nursery.start_soon(fake._serve, trio.StapledStream(server_writes, server_reads), fake.send)
        return trio.StapledStream(to_server, from_server)

    client = subscription_client(fake, open_stream=open_stream, keepalive_idle=20, keepalive_timeout=10)
    send, _receive = trio.open_memory_channel[TaskRun](10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run, send)
        session = await fake.next()
        await session.accept_subscription()
        held_back = True
        for _ in range(3):  # 45 s in all, never 20 s of silence
            await trio.sleep(15)
            await session.send({"type": "cancel", "ids": []})
        await trio.sleep(29)  # pinged at 20 s, still waiting for the pong
        assert is_connected(client) and client.reconnects == 0
        await trio.sleep(2)  # no pong 30 s after the last message: dropped
        assert not is_connected(client) and client.reconnects >= 1
        nursery.cancel_scope.cancel()


# -- the whole worker


async def accept_worker(fake: MemorySockets) -> tuple[Session, dict[str, Any]]:
    """Play the server while a worker starts: its client channel first, then its
    subscription. Returns the subscription's session and subscribe message."""
    channel = await fake.next()
    assert channel.path == "/api" + protocol.CHANNEL_PATH
    await channel.accept_channel()
    subscription = await fake.next()
    assert subscription.path == "/api" + protocol.SUBSCRIPTION_PATH
    return subscription, await subscription.accept_subscription()


@task(key="m.add")
async def add(a: int, b: int) -> int:
    return a + b


@task(key="m.shout")
def shout(text: str) -> str:
    assert threading.current_thread() is not threading.main_thread()
    return text.upper() + "!"


async def test_a_worker_runs_async_and_sync_tasks_without_a_socket(fake: MemorySockets) -> None:
    worker = TaskWorker(add, shout, api_url=API_URL, client_id="w-1", limit=4, open_stream=fake.open_stream)
    reported: dict[str, list[str]] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.start)
        session, subscribe = await accept_worker(fake)
        assert (subscribe["keys"], subscribe["credit"], subscribe["client_id"]) == (
            ["m.add", "m.shout"],
            4,
            "w-1",
        )
        added, shouted = delivered("m.add", {"a": 2, "b": 3}), delivered("m.shout", {"text": "hi"})
        await session.send({"type": "task_runs", "task_runs": [added, shouted]})
        last = await answer_states(
            session, {added["id"]: "COMPLETED", shouted["id"]: "COMPLETED"}, [], reported
        )
        assert is_connected(worker)
        worker.stop()
        await quit_when_asked(session)
    assert (last[added["id"]]["data"], last[shouted["id"]]["data"]) == (5, "HI!")
    assert reported == {added["id"]: ["RUNNING", "COMPLETED"], shouted["id"]: ["RUNNING", "COMPLETED"]}
    assert worker.finished_task_runs == {"m.add": 1, "m.shout": 1}
    assert not is_connected(worker)
    assert fake.opened == [("server.test", 4300, False)] * 2  # the channel and the subscription


async def test_no_worker_thread_runs_after_serve_returns(fake: MemorySockets) -> None:
    """After ``serve()`` returns, no code of a sync task runs on any thread, and Trio waits
    for no thread of this run (``active_thread_count() == 0``): sync runs still going when
    the stop came were waited for, within the grace period.

    Precisely: the OS threads that ran the tasks belong to Trio's thread cache, which keeps
    them idle for reuse (and ends them after 10 s unused); they run nothing of the worker.
    The one exception, a sync task still running when the grace period runs out, is the
    next test.
    """
    running: set[int] = set()  # threads inside the task's code right now
    ran_on: set[int] = set()
    entered = [threading.Event(), threading.Event()]
    gate = threading.Event()

    @task(key="m.work")
    def work(n: int) -> int:
        running.add(threading.get_ident())
        try:
            ran_on.add(threading.get_ident())
            if n < len(entered):  # still running when the worker is told to stop
                entered[n].set()
                gate.wait()
            return n * n
        finally:
            running.discard(threading.get_ident())

    runs = [delivered("m.work", {"n": n}) for n in range(8)]
    gated, quick = runs[: len(entered)], runs[len(entered) :]

    async def play_server() -> None:
        session, _ = await accept_worker(fake)
        await session.send({"type": "task_runs", "task_runs": runs})
        until = {run["id"]: "COMPLETED" for run in quick} | {run["id"]: "RUNNING" for run in gated}
        await answer_states(session, until, [])
        for event in entered:
            await trio.to_thread.run_sync(event.wait)
        signal.raise_signal(signal.SIGINT)  # serve() stops, with the grace period
        await session.receive_type("quit")
        gate.set()  # the two runs end within the grace period
        await answer_states(session, {run["id"]: "COMPLETED" for run in gated}, [])
        await session.ws.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(play_server)
        try:
            await serve(work, limit=4, api_url=API_URL, open_stream=fake.open_stream)
        finally:
            gate.set()
        assert running == set()
        assert trio.testing.active_thread_count() == 0
        assert ran_on and threading.get_ident() not in ran_on  # the runs did use threads


async def test_a_sync_task_that_ignores_cancellation_outlives_serve(
    fake: MemorySockets, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented exception: a sync task's thread that is still running when the grace
    period is over is not waited for. ``serve()`` returns while it runs on, and
    ``active_thread_count()`` does not count it (Trio stopped waiting for it too), so only
    the task's own code can tell it still runs."""
    entered, release, returned = threading.Event(), threading.Event(), threading.Event()
    stubborn_thread: list[threading.Thread] = []

    @task(key="m.stubborn")
    def stubborn() -> None:
        stubborn_thread.append(threading.current_thread())
        entered.set()
        release.wait()  # ignores trio.from_thread.check_cancelled()
        returned.set()

    run = delivered("m.stubborn")
    grace = 5.0

    async def play_server() -> None:
        session, _ = await accept_worker(fake)
        await session.send({"type": "task_runs", "task_runs": [run]})
        await answer_states(session, {run["id"]: "RUNNING"}, [])
        await trio.to_thread.run_sync(entered.wait)
        signal.raise_signal(signal.SIGINT)  # stop, with the grace period
        seen: list[dict[str, Any]] = []
        await session.receive_type("quit", seen)
        await trio.testing.wait_all_tasks_blocked()  # the worker waits for the thread ...
        mock_clock.jump(grace)  # ... until the grace period is over
        release_message = await session.receive_type("release", seen)
        assert release_message["ids"] == [run["id"]]  # handed back to the queue
        await session.ws.aclose()

    caplog.set_level(logging.WARNING, "trioworker")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(play_server)
            await serve(stubborn, api_url=API_URL, open_stream=fake.open_stream, shutdown_grace_seconds=grace)
            assert not returned.is_set() and stubborn_thread[0].is_alive()  # it runs on
            assert trio.testing.active_thread_count() == 0  # ... and Trio no longer counts it
            assert any("it runs on" in r.getMessage() for r in caplog.records)
    finally:
        release.set()
    assert await trio.to_thread.run_sync(returned.wait, 10)  # it ends when its code returns


async def test_runs_delivered_together_start_together_and_report_in_one_message(fake: MemorySockets) -> None:
    """The runs of one delivery start in the step that read it while slots are free, and a
    run that ends without waiting (an async task that never yields) has queued RUNNING and
    its end by the time the reports go out: one message carries both reports of each."""
    worker = TaskWorker(add, api_url=API_URL, client_id="w-1", limit=4, open_stream=fake.open_stream)
    runs = [delivered("m.add", {"a": n, "b": 1}) for n in range(3)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.start)
        session, _ = await accept_worker(fake)
        await session.send({"type": "task_runs", "task_runs": runs})
        message = await session.receive_type("states")
        entries = [(entry["id"], entry["state"]["type"]) for entry in message["states"]]
        both = [(run["id"], kind) for run in runs for kind in ("RUNNING", "COMPLETED")]
        assert sorted(entries) == sorted(both)
        for run in runs:
            assert entries.index((run["id"], "RUNNING")) < entries.index((run["id"], "COMPLETED"))
        results = [{"ref": entry["ref"], "status": "ACCEPT", "details": None} for entry in message["states"]]
        await session.send({"type": "state_results", "results": results})
        worker.stop()
        await quit_when_asked(session)
    assert worker.finished_task_runs == {"m.add": 3}


async def test_runs_that_wait_for_a_slot_start_in_the_order_they_came(fake: MemorySockets) -> None:
    """A run delivered while others wait for a slot queues behind them: runs start in the
    order they were delivered, whether they started at once or waited."""
    gate = trio.Event()
    started: list[int] = []

    @task(key="m.queued")
    async def queued(n: int) -> int:
        started.append(n)
        if n == 0:
            await gate.wait()
        return n

    worker = TaskWorker(queued, api_url=API_URL, limit=1, prefetch=3, open_stream=fake.open_stream)
    runs = [delivered("m.queued", {"n": n}) for n in range(4)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.start)
        session, _ = await accept_worker(fake)
        await session.send({"type": "task_runs", "task_runs": runs[:1]})
        await answer_states(session, {runs[0]["id"]: "RUNNING"}, [])
        await session.send({"type": "task_runs", "task_runs": runs[1:3]})
        await session.send({"type": "task_runs", "task_runs": runs[3:]})
        await trio.testing.wait_all_tasks_blocked()
        assert started == [0]  # the slot is taken: the rest wait
        gate.set()
        await answer_states(session, {run["id"]: "COMPLETED" for run in runs}, [])
        worker.stop()
        await quit_when_asked(session)
    assert started == [0, 1, 2, 3]


@pytest.mark.parametrize("frozen_before", [False, True])
async def test_serve_freezes_the_start_up_heap_while_it_serves(
    fake: MemorySockets, frozen_before: bool
) -> None:
    """``serve()`` moves the objects alive when it starts out of the collector's sight while
    it serves (``gc.freeze()``) and back when it returns; it leaves alone a process whose
    objects were frozen already (the application manages that)."""
    seen: list[int] = []

    @task(key="m.look")
    async def look() -> int:
        seen.append(gc.get_freeze_count())
        return 0

    run = delivered("m.look")

    async def play_server() -> None:
        session, _ = await accept_worker(fake)
        await session.send({"type": "task_runs", "task_runs": [run]})
        await answer_states(session, {run["id"]: "COMPLETED"}, [])
        signal.raise_signal(signal.SIGINT)
        await quit_when_asked(session)

    if frozen_before:
        gc.freeze()
    before = gc.get_freeze_count()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(play_server)
            await serve(look, api_url=API_URL, open_stream=fake.open_stream)
        after = gc.get_freeze_count()
    finally:
        gc.unfreeze()
    [during] = seen
    if frozen_before:  # nothing more frozen (frozen objects that died leave the count), nothing unfrozen
        assert before >= during >= after > 0
    else:
        assert (before, after) == (0, 0) and during > 0
