"""Several servers: the failover rule of the REST clients, the subscription and the whole
worker, without a network.

REST: each client gets an ``httpx.MockTransport`` that plays two replicas, ``a.test`` and
``b.test``, each as the test says (answering, refusing the connection, losing it after the
request went out, or answering with a status). What is checked: which server each attempt
went to, what the call returns or raises, and which server the next call uses.

Websockets: the subscription and the worker open theirs through the ``open_stream`` seam
to :func:`tests.fakes.memory_sockets`, which records the host of each connection; the test
plays both replicas, closes a socket with 1012 as a stopping server does, and reads what
the worker says to the next one. Time passes on Trio's mock clock.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing

from trioworker import protocol
from trioworker.client.rest import CREATE_ATTEMPTS, SyncTaskRunClient, TaskRunClient, connect
from trioworker.errors import ApiError, NotFound, ServerUnavailable, SubscriptionRefused
from trioworker.models import (
    SetStateResult,
    SetStateStatus,
    State,
    StateType,
    TaskRun,
    TaskRunCreate,
    WaitResult,
    converter,
    make_state,
)
from trioworker.tasks import task
from trioworker.worker.subscription import SubscriptionClient
from trioworker.worker.task_worker import TaskWorker

from .fakes import MemorySockets, Session, answer_states, delivered, memory_sockets, quit_when_asked
from .test_in_memory import subscription_client

A, B = "http://a.test:4300", "http://b.test:4300"
A_API, B_API = f"{A}/api", f"{B}/api"

Behaviour = Callable[[httpx.Request], httpx.Response]


def answer(code: int, data: Any) -> httpx.Response:
    return httpx.Response(code, content=orjson.dumps(data), headers={"Content-Type": "application/json"})


def answering(request: httpx.Request) -> httpx.Response:
    """A replica that works: answers every call the tests make."""
    path = request.url.path
    if path == "/api/health":
        return answer(200, {"status": "ok", "host": request.url.host})
    if path.endswith("/cancel"):
        result = SetStateResult(SetStateStatus.ACCEPT, make_state(StateType.CANCELLED))
        return answer(200, converter.unstructure(result))
    if path == "/api/task_runs/wait":
        return answer(200, converter.unstructure(WaitResult([], [], [])))
    if path in ("/api/task_runs", "/api/task_runs/batch"):
        body = orjson.loads(request.content)
        runs = [
            converter.unstructure(
                TaskRun(
                    uuid.UUID(item["id"]), item["task_key"], item["task_key"], make_state(StateType.PENDING)
                )
            )
            for item in (body if isinstance(body, list) else [body])
        ]
        return answer(201, runs if isinstance(body, list) else runs[0])
    raise AssertionError(f"unexpected request {request.method} {path}")


def refusing(request: httpx.Request) -> httpx.Response:
    """Nothing listens: the request never left."""
    raise httpx.ConnectError("connection refused", request=request)


def losing(request: httpx.Request) -> httpx.Response:
    """The connection drops after the request went out: it may have been applied."""
    raise httpx.ReadError("connection reset by peer", request=request)


def status(code: int) -> Behaviour:
    return lambda request: answer(code, {"detail": f"status {code}"})


class Replicas:
    """Two replicas behind one mock transport; ``hosts`` lists each request's host."""

    def __init__(self, a: Behaviour, b: Behaviour = answering) -> None:
        self.by_host = {"a.test": a, "b.test": b}
        self.hosts: list[str] = []
        self.bodies: list[Any] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.hosts.append(request.url.host)
        self.bodies.append(orjson.loads(request.content) if request.content else None)
        return self.by_host[request.url.host](request)


class EitherClient:
    """The async or the blocking client, called the same way (``await client.call(name, ...)``)."""

    def __init__(self, kind: str, replicas: Replicas, urls: str | list[str] = f"{A},{B}") -> None:
        transport = httpx.MockTransport(replicas)
        self.client: TaskRunClient | SyncTaskRunClient
        if kind == "async":
            self.client = TaskRunClient(urls, "key", transport=transport)
        else:
            self.client = SyncTaskRunClient(urls, "key", transport=transport)

    async def call(self, name: str, *args: Any) -> Any:
        result = getattr(self.client, name)(*args)
        if isinstance(self.client, TaskRunClient):
            result = await result
        return result


RUN_ID = uuid.UUID(int=7)
CREATE = TaskRunCreate(task_key="k", id=uuid.UUID(int=8))


@pytest.fixture(params=["async", "sync"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize(
    ("a", "call", "args", "hosts", "now"),
    [
        # Reads are sent to the next server after any connection-level failure.
        (refusing, "health", (), ["a.test", "b.test"], B_API),
        (losing, "health", (), ["a.test", "b.test"], B_API),
        (status(503), "health", (), ["a.test", "b.test"], B_API),
        (status(502), "wait_many", ([RUN_ID],), ["a.test", "b.test"], B_API),
        (losing, "wait_many", ([RUN_ID],), ["a.test", "b.test"], B_API),
        # Any call is sent on when it surely did not reach the server.
        (refusing, "cancel", (RUN_ID,), ["a.test", "b.test"], B_API),
        # Creates carry their ids: sent again to the next server, whatever happened.
        (losing, "create_task_run", (CREATE,), ["a.test", "b.test"], B_API),
        (status(504), "create_task_run", (CREATE,), ["a.test", "b.test"], B_API),
        (refusing, "create_task_runs", ([CREATE],), ["a.test", "b.test"], B_API),
    ],
)
async def test_a_call_goes_to_the_next_server_and_the_next_calls_stay_there(
    kind: str, a: Behaviour, call: str, args: tuple[Any, ...], hosts: list[str], now: str
) -> None:
    replicas = Replicas(a)
    client = EitherClient(kind, replicas)
    assert (client.client.api_url, client.client.api_urls) == (A_API, (A_API, B_API))
    await client.call(call, *args)
    assert replicas.hosts == hosts
    assert client.client.api_url == now
    if call.startswith("create"):
        assert replicas.bodies[0] == replicas.bodies[1]  # the same ids, sent again
    await client.call("health")
    assert replicas.hosts[len(hosts) :] == ["b.test"]  # the next call goes to B at once


@pytest.mark.parametrize(
    ("a", "error"),
    [(losing, ServerUnavailable), (status(503), ApiError), (status(502), ApiError)],
)
async def test_a_call_that_may_have_arrived_is_not_sent_again_but_the_next_goes_elsewhere(
    kind: str, a: Behaviour, error: type[Exception]
) -> None:
    """A cancel that may have been applied raises as with one server; the server is left."""
    replicas = Replicas(a)
    client = EitherClient(kind, replicas)
    with pytest.raises(error):
        await client.call("cancel", RUN_ID)
    assert replicas.hosts == ["a.test"]
    assert client.client.api_url == B_API
    result = await client.call("cancel", RUN_ID)
    assert result.status is SetStateStatus.ACCEPT
    assert replicas.hosts == ["a.test", "b.test"]


@pytest.mark.parametrize(
    ("a", "error", "detail"),
    [
        (status(401), ApiError, "status 401"),
        (status(404), NotFound, "status 404"),
        (status(422), ApiError, "status 422"),
        (status(500), ApiError, "status 500"),
    ],
)
@pytest.mark.parametrize("call", ["health", "create_task_run"])
async def test_an_answer_of_the_application_never_fails_over(
    kind: str, a: Behaviour, error: type[ApiError], detail: str, call: str
) -> None:
    replicas = Replicas(a)
    client = EitherClient(kind, replicas)
    with pytest.raises(error) as caught:
        await client.call(call, *((CREATE,) if call == "create_task_run" else ()))
    assert caught.value.detail == detail
    assert replicas.hosts == ["a.test"]
    assert client.client.api_url == A_API


async def test_a_whole_round_of_refusals_is_one_error_naming_every_server(kind: str) -> None:
    replicas = Replicas(refusing, refusing)
    client = EitherClient(kind, replicas)
    with pytest.raises(ServerUnavailable) as caught:
        await client.call("health")
    assert str(caught.value).startswith(f"cannot reach the trioworker servers at {A_API}, {B_API}: ")
    assert replicas.hosts == ["a.test", "b.test"]
    assert client.client.api_url == A_API  # round the list once: back at the first
    with pytest.raises(ServerUnavailable, match="servers at"):
        await client.call("create_task_run", CREATE)  # refused everywhere: nothing created
    assert replicas.hosts[2:] == ["a.test", "b.test"]


async def test_a_whole_round_of_gateway_errors_raises_the_last(kind: str) -> None:
    replicas = Replicas(status(502), status(503))
    client = EitherClient(kind, replicas)
    with pytest.raises(ApiError) as caught:
        await client.call("health")
    assert caught.value.status_code == 503
    assert replicas.hosts == ["a.test", "b.test"]


async def test_one_server_behaves_as_before(kind: str) -> None:
    """One URL: a refused call raises at once; a 503 is the answer, not sent again."""
    for behaviour, error in ((refusing, ServerUnavailable), (status(503), ApiError)):
        replicas = Replicas(behaviour)
        client = EitherClient(kind, replicas, urls=A)
        with pytest.raises(error) as caught:
            await client.call("health")
        assert replicas.hosts == ["a.test"]
        assert client.client.api_urls == (A_API,)
        if error is ServerUnavailable:
            assert str(caught.value).startswith(f"cannot reach the trioworker server at {A_API}: ")


async def test_a_lost_create_goes_round_the_servers_until_one_answers(
    autojump_clock: object,
) -> None:
    """A create whose outcome is unknown is sent round the list, with backoff between
    rounds, until a server answers; every attempt carries the same ids."""
    answers = iter([losing, losing, refusing, losing, answering])
    replicas = Replicas(lambda r: next(answers)(r), lambda r: next(answers)(r))
    client = EitherClient("async", replicas)
    run = await client.call("create_task_run", CREATE)
    assert run.id == CREATE.id
    assert replicas.hosts == ["a.test", "b.test", "a.test", "b.test", "a.test"]
    assert all(body == replicas.bodies[0] for body in replicas.bodies)
    assert client.client.api_url == A_API


async def test_a_lost_create_gives_up_after_its_rounds(autojump_clock: object) -> None:
    replicas = Replicas(losing, losing)
    client = EitherClient("async", replicas)
    with pytest.raises(ServerUnavailable, match=r"to confirm a create .* read them by id"):
        await client.call("create_task_run", CREATE)
    assert len(replicas.hosts) <= CREATE_ATTEMPTS * 2
    assert replicas.hosts[:4] == ["a.test", "b.test", "a.test", "b.test"]


# -- websockets


def hosts(fake: MemorySockets) -> list[str]:
    """The host of each connection made to the fake, in order."""
    return [host for host, _, _ in fake.opened]


def subscription(fake: MemorySockets, held: set[uuid.UUID], **options: Any) -> SubscriptionClient:
    """A subscription to replicas A and B, for runs of ``f.k``."""
    return subscription_client(
        fake, api_url=[A, B], keys=("f.k",), held=lambda: set(held), rng=random.Random(2), **options
    )


async def test_the_subscription_moves_to_the_next_server_with_the_runs_it_holds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    held: set[uuid.UUID] = set()
    async with memory_sockets() as fake:
        client = subscription(fake, held)
        send, receive = trio.open_memory_channel[TaskRun](math.inf)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run, send)
            on_a = await fake.next()
            await on_a.accept_subscription()
            run = delivered("f.k")
            await on_a.send({"type": "task_runs", "task_runs": [run]})
            run_id = (await receive.receive()).id
            held.add(run_id)
            answers: list[SetStateResult] = []

            async def report(state: State) -> None:
                answers.append(await client.report(run_id, state))

            nursery.start_soon(report, make_state(StateType.COMPLETED, data=1))
            [unanswered] = (await on_a.receive_type("states"))["states"]
            closed_at = trio.current_time()
            await on_a.ws.aclose(protocol.CLOSE_RESTART, "the server is stopping")  # replica A stops

            on_b = await fake.next()
            assert hosts(fake) == ["a.test", "b.test"]
            assert trio.current_time() == closed_at  # at once: B was not tried in this round
            assert client.api_url == B_API
            subscribe = await on_b.accept_subscription()
            assert subscribe["held"] == [run["id"]]  # B learns the run is this worker's
            [again] = (await on_b.receive_type("states"))["states"]
            assert again == unanswered  # the report, sent again to B
            await on_b.send({"type": "state_results", "results": [{"ref": again["ref"], "status": "ACCEPT"}]})
            await on_b.cut()  # B goes too: a whole round failed, so the next try waits

            on_a_again = await fake.next()
            assert hosts(fake) == ["a.test", "b.test", "a.test"]
            assert trio.current_time() > closed_at
            await on_a_again.accept_subscription()
            client.quit()
            await quit_when_asked(on_a_again)
    assert [answer.status for answer in answers] == [SetStateStatus.ACCEPT]
    assert client.reconnects == 2


async def test_a_refused_api_key_does_not_move_the_subscription() -> None:
    async with memory_sockets() as fake:
        client = subscription(fake, set())
        send, _ = trio.open_memory_channel[TaskRun](math.inf)
        async with trio.open_nursery() as nursery:

            async def play_a() -> None:
                on_a = await fake.next()
                assert (await on_a.receive())["type"] == "auth"
                await on_a.ws.aclose(protocol.CLOSE_POLICY, "Unauthorized: missing or wrong API key")

            nursery.start_soon(play_a)
            with pytest.raises(SubscriptionRefused, match=f"the server at {A_API} refused"):
                await client.run(send)
    assert hosts(fake) == ["a.test"]
    assert client.api_url == A_API


async def test_a_dead_first_server_is_skipped_at_start(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_sockets() as fake:

        async def a_is_down(host: str, port: int, secure: bool) -> trio.abc.Stream:
            if host == "a.test":
                raise OSError("connection refused")
            return await fake.open_stream(host, port, secure)

        client = subscription(fake, set(), open_stream=a_is_down)
        send, _ = trio.open_memory_channel[TaskRun](math.inf)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run, send)
            on_b = await fake.next()
            assert trio.current_time() == 0  # no backoff: B was next
            await on_b.accept_subscription()
            client.quit()
            await quit_when_asked(on_b)
    assert hosts(fake) == ["b.test"]
    assert client.api_url == B_API and client.reconnects == 1


async def test_a_worker_whose_server_stops_keeps_its_run_on_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Replica A stops (its sockets close with 1012) while the worker runs a run: the worker
    subscribes to B at once naming the run, finishes it, and reports to B; its client
    channel moves to B as well."""
    release = trio.Event()

    @task(key="f.slow")
    async def slow() -> str:
        await release.wait()
        return "done"

    async with memory_sockets() as fake:
        worker = TaskWorker(slow, api_url=f"{A},{B}", client_id="w-1", limit=2, open_stream=fake.open_stream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.start)
            channel_a = await fake.next()
            await channel_a.accept_channel()
            on_a = await fake.next()
            await on_a.accept_subscription()
            run = delivered("f.slow")
            await on_a.send({"type": "task_runs", "task_runs": [run]})
            await answer_states(on_a, {run["id"]: "RUNNING"}, [])

            stopped_at = trio.current_time()
            await on_a.ws.aclose(protocol.CLOSE_RESTART, "the server is stopping")
            await channel_a.ws.aclose(protocol.CLOSE_RESTART, "the server is stopping")
            by_path = {}
            for _ in range(2):  # the subscription and the channel, in either order
                session = await fake.next()
                by_path[session.path] = session
            assert trio.current_time() == stopped_at  # no backoff
            assert hosts(fake)[2:] == ["b.test", "b.test"]
            await by_path["/api" + protocol.CHANNEL_PATH].accept_channel()
            on_b = by_path["/api" + protocol.SUBSCRIPTION_PATH]
            subscribe = await on_b.accept_subscription()
            assert subscribe["held"] == [run["id"]]
            assert worker.api_url == B_API and worker.api_urls == (A_API, B_API)

            release.set()
            reported: dict[str, list[str]] = {}
            last = await answer_states(on_b, {run["id"]: "COMPLETED"}, [], reported)
            assert reported == {run["id"]: ["COMPLETED"]}  # ran once: no second RUNNING
            assert last[run["id"]]["data"] == "done"
            worker.stop()
            await quit_when_asked(on_b)
    assert worker.started_task_runs == {"f.slow": 1}


async def test_the_client_channel_skips_a_dead_server_and_moves_on_1012(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At start the channel opens on the first server that takes it; when that one stops,
    on the next at once; a refused API key (1008) keeps it where it is."""
    down = {"a.test"}
    async with memory_sockets() as fake:

        async def open_stream(host: str, port: int, secure: bool) -> trio.abc.Stream:
            if host in down:
                raise OSError("connection refused")
            return await fake.open_stream(host, port, secure)

        c = "http://c.test:4300"
        async with trio.open_nursery() as nursery:
            sessions = trio.open_memory_channel[Session](math.inf)

            async def accept_channels() -> None:
                while True:
                    session = await fake.next()
                    await session.accept_channel()
                    sessions[0].send_nowait(session)

            nursery.start_soon(accept_channels)
            async with connect([A, B, c], "key", open_stream=open_stream) as client:
                assert client.channel is not None
                on_b = await sessions[1].receive()
                assert (hosts(fake), client.api_url, trio.current_time()) == (["b.test"], B_API, 0)
                await on_b.ws.aclose(protocol.CLOSE_RESTART, "the server is stopping")
                on_c = await sessions[1].receive()
                assert (hosts(fake), client.api_url) == (["b.test", "c.test"], f"{c}/api")
                assert trio.current_time() == 0  # at once
                await on_c.ws.aclose(protocol.CLOSE_POLICY, "Unauthorized: missing or wrong API key")
                await sessions[1].receive()
                assert hosts(fake)[-1] == "c.test" and trio.current_time() > 0  # stayed, after a pause
                await client.channel.wait_usable()
                assert client.channel.reopened == 2
            nursery.cancel_scope.cancel()
