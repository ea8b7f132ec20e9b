"""Several servers: the REST clients' failover rule, call by call, without a network.

Each client gets an ``httpx.MockTransport`` that plays two replicas, ``a.test`` and
``b.test``, each as the test says (answering, refusing the connection, losing it after the
request went out, or answering with a status). What is checked: which server each attempt
went to, what the call returns or raises, and which server the next call uses.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from trioworker.client.rest import CREATE_ATTEMPTS, SyncTaskRunClient, TaskRunClient
from trioworker.errors import ApiError, NotFound, ServerUnavailable
from trioworker.models import (
    SetStateResult,
    SetStateStatus,
    StateType,
    TaskRun,
    TaskRunCreate,
    WaitResult,
    converter,
    make_state,
)

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
