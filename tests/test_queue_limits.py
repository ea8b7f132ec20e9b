"""Queue limits (``trioworker server --max-queued N``): a create beyond N runs of one task key
waiting for a worker answers 429 with ``Retry-After`` (REST and the client channel), and
clients wait and send it again (backpressure): ``.delay()`` within its timeout, ``map``
sending what fits first. Nothing is lost and nothing is made twice. A partial request has
what fits made and only the rest refused; the wait is judged from how fast workers take
runs, and the channel (or a long-poll) is told when there is room. A create that repeats a
run already made (by id or idempotency key) is never held back.

Real servers and workers; the waits run on a ``MockClock`` where the test does not say so.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import cattrs
import httpx
import orjson
import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url

import trioworker
from trioworker.client.rest import SyncTaskRunClient, TaskRunClient
from trioworker.client.submission import build_create
from trioworker.errors import QueueFull, api_error
from trioworker.models import StateType, TaskRun, TaskRunCreate, converter, make_state
from trioworker.server import RunningServer
from trioworker.server.limits import QueueLimit
from trioworker.tasks import task
from trioworker.testing import ServerControl
from trioworker.worker.task_worker import TaskWorker

from .test_channel import AUTH, channel_url, talk
from .test_openapi import check

KEY = "q.echo"


@task(key=KEY)
async def echo(n: int) -> int:
    return n


HOLD = "q.hold"


@attrs.define(eq=False)
class Gate:
    """What runs of :func:`hold` do: they note that they started, then wait for ``release``."""

    release: trio.Event = attrs.field(factory=trio.Event)
    started: list[int] = attrs.field(factory=list)
    _counts: dict[int, trio.Event] = attrs.field(factory=dict)

    def started_runs(self, count: int) -> trio.Event:
        """Set once ``count`` runs started."""
        event = self._counts.setdefault(count, trio.Event())
        if len(self.started) >= count:
            event.set()
        return event

    def reset(self) -> None:
        self.release = trio.Event()
        self.started.clear()
        self._counts.clear()

    def start(self, n: int) -> None:
        self.started.append(n)
        for count, event in self._counts.items():
            if len(self.started) >= count:
                event.set()


gate = Gate()


@pytest.fixture(autouse=True)
def _fresh_gate() -> None:
    gate.reset()


@task(key=HOLD)
async def hold(n: int) -> int:
    gate.start(n)
    await gate.release.wait()
    return n


def held(*numbers: int) -> list[dict[str, Any]]:
    """Creates of :func:`hold` runs."""
    return [{"task_key": HOLD, "parameters": {"n": n}} for n in numbers]


async def limited(control: ServerControl, monkeypatch: pytest.MonkeyPatch, max_queued: int) -> RunningServer:
    server = await control.start(max_queued=max_queued)
    monkeypatch.setenv("TRIOWORKER_API_URL", server.api_url)
    return server


def body(*numbers: int, **fields: Any) -> list[dict[str, Any]]:
    return [{"task_key": KEY, "parameters": {"n": n}, **fields} for n in numbers]


async def api_create(server: RunningServer, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        created = await api.post("/task_runs/batch", json=items)
        assert created.status_code == 201, created.text
        runs: list[dict[str, Any]] = created.json()
        return runs


async def count_runs(server: RunningServer, key: str = KEY) -> int:
    return len(await server.service.list_runs(task_key=key, state=None, limit=1000, offset=0))


# -- the server


async def test_a_create_beyond_the_limit_answers_429_with_retry_after(
    trioworker_server_control: ServerControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 3)
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        assert (await api.post("/task_runs/batch", json=body(1, 2))).status_code == 201
        full = await api.post("/task_runs/batch", json=body(3, 4, 5))
        assert full.status_code == 429
        assert full.headers["Retry-After"] == "1"
        assert full.json() == {
            "detail": "the queue of task 'q.echo' is full: 2 runs wait for a worker (--max-queued 3)",
            "task_key": KEY,
            "max_queued": 3,
            "room": 1,  # the first of the three would have fit
            "retry_after": 1,
        }
        assert await count_runs(server) == 2  # a batch is all or nothing: none of the three
        assert (await api.post("/task_runs", json=body(3)[0])).status_code == 201
        one_more = await api.post("/task_runs", json=body(4)[0])
        assert (one_more.status_code, one_more.json()["room"]) == (429, 0)
        # Other keys, runs due later and runs waiting for others are not held back.
        assert (await api.post("/task_runs", json={"task_key": "q.other"})).status_code == 201
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        assert (await api.post("/task_runs/batch", json=body(5, 6, scheduled_time=later))).status_code == 201
        upstream = (await api.get("/task_runs", params={"task_key": KEY, "limit": 1})).json()[0]["id"]
        assert (await api.post("/task_runs", json=body(7, wait_for=[upstream])[0])).status_code == 201
        health = (await api.get("/health")).json()
        assert health["ready"] == 4  # three of q.echo and one of q.other wait for a worker


@pytest.mark.every_store
async def test_a_repeated_create_gets_its_run_back_even_when_the_queue_is_full(
    trioworker_server_control: ServerControl, monkeypatch: pytest.MonkeyPatch, store_kind: str
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 2)
    assert store_kind in ("sqlite", "postgres")
    run_id = str(uuid.uuid4())
    by_id = {**body(1)[0], "id": run_id}
    by_key = {**body(1)[0], "idempotency_key": "once"}  # a new id each time, as a client sends it
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        assert (await api.post("/task_runs", json=by_id)).status_code == 201
        keyed_run = (await api.post("/task_runs", json={**by_key, "id": str(uuid.uuid4())})).json()
        assert (await api.post("/task_runs", json=body(2)[0])).status_code == 429  # full
        fresh = await api.post("/task_runs", json={**body(2)[0], "idempotency_key": "fresh"})
        assert fresh.status_code == 429  # a key's first use is a new run
        # REST, one create: a repeat by id (its answer was lost) or by idempotency key.
        again = await api.post("/task_runs", json=by_id)
        assert (again.status_code, again.json()["id"]) == (200, run_id)
        again = await api.post("/task_runs", json={**by_key, "id": str(uuid.uuid4())})
        assert (again.status_code, again.json()["id"]) == (200, keyed_run["id"])
        # REST, a batch: repeats fit, whole or partial; a new create does not.
        repeats = [by_id, {**by_key, "id": str(uuid.uuid4())}]
        batch = await api.post("/task_runs/batch", json=repeats)
        assert [run["id"] for run in batch.json()] == [run_id, keyed_run["id"]]
        batch = await api.post("/task_runs/batch", json=[*repeats, *body(3)])
        assert (batch.status_code, batch.json()["room"]) == (429, 2)  # the repeats are not counted
        batch = await api.post("/task_runs/batch?partial=true", json=[*repeats, *body(3), by_id])
        made = batch.json()
        assert (batch.status_code, made["room"]) == (429, 2)
        assert [run["id"] for run in made["created"]] == [run_id, keyed_run["id"]]
    # The client channel, in a batch with a new one: the repeats are made, the new one waits.
    channel_batch = {"type": "create", "ref": 1, "task_runs": [*repeats, *body(4)], "partial": True}
    [_, refused] = await talk(server, [AUTH, channel_batch], 2)
    assert (refused["status"], [run["id"] for run in refused["created"]]) == (429, [run_id, keyed_run["id"]])
    assert await count_runs(server) == 2
    # Within one request, a create that repeats an earlier one counts once.
    twice = {"task_key": "q.twice", "idempotency_key": "k"}
    await api_create(server, [{"task_key": "q.twice"}])  # one place left of two
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        both = await api.post("/task_runs/batch", json=[twice, twice, {**twice, "idempotency_key": None}])
        assert both.status_code == 429 and both.json()["room"] == 2
        both = await api.post("/task_runs/batch", json=[twice, twice])
        assert both.status_code == 201 and both.json()[0]["id"] == both.json()[1]["id"]


async def test_the_channel_answers_a_full_queue_with_429(
    trioworker_server_control: ServerControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 2)
    create = {"type": "create", "ref": 1, "task_runs": body(1, 2, 3)}
    [_, refused] = await talk(server, [AUTH, create], 2)
    assert refused == {
        "type": "error",
        "ref": 1,
        "status": 429,
        "detail": "the queue of task 'q.echo' is full: 0 runs wait for a worker (--max-queued 2)",
        "task_key": KEY,
        "max_queued": 2,
        "room": 2,
        "retry_after": 1,
    }
    assert await count_runs(server) == 0


async def test_runs_taken_by_a_worker_make_room(
    trioworker_server_control: ServerControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 2)
    async with httpx.AsyncClient(base_url=server.api_url) as api:

        async def create(n: int) -> int:
            return (await api.post("/task_runs", json=held(n)[0])).status_code

        assert [await create(1), await create(2), await create(3)] == [201, 201, 429]
        async with TaskWorker(hold, api_url=server.api_url, limit=1):
            with trio.fail_after(10):
                await gate.started_runs(1).wait()
            # One run was delivered (the worker holds it, running): one queued, room for one.
            assert [await create(3), await create(4)] == [201, 429]
            gate.release.set()


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        QueueLimit(0)


async def test_a_partial_batch_makes_what_fits_and_refuses_the_rest(
    trioworker_server_control: ServerControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 3)
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        assert (await api.post("/task_runs/batch", json=body(1))).status_code == 201
        refused = await api.post("/task_runs/batch", params={"partial": "true"}, json=body(2, 3, 4, 5))
        answer = refused.json()
        check(answer, {"$ref": "#/components/schemas/QueueFull"})  # as the API document says
        assert (refused.status_code, refused.headers["Retry-After"]) == (429, "1")
        assert [run["parameters"]["n"] for run in answer.pop("created")] == [2, 3]  # made
        assert answer == {
            "detail": "the queue of task 'q.echo' is full: 3 runs wait for a worker (--max-queued 3)",
            "task_key": KEY,
            "max_queued": 3,
            "room": 2,
            "retry_after": 1.0,  # no worker took any run lately
        }
        assert await count_runs(server) == 3  # the two that fitted, not the two refused
        nothing = await api.post("/task_runs/batch?partial=true", json=body(4))
        assert (nothing.status_code, nothing.json()["created"]) == (429, [])
        fits = await api.post(
            "/task_runs/batch?partial=true", json=body(4, scheduled_time="2999-01-01T00:00:00Z")
        )
        assert fits.status_code == 201  # a run due later is never held back
        odd = await api.post("/task_runs/batch?partial=yes", json=body(4))
        assert (odd.status_code, odd.json()["detail"]) == (422, "partial must be true or false, got 'yes'")


async def test_the_wait_follows_how_fast_workers_take_runs(
    trioworker_autojump_clock: trio.testing.MockClock,
    trioworker_server_control: ServerControl,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 4)
    async with (
        httpx.AsyncClient(base_url=server.api_url) as api,
        TaskWorker(hold, api_url=server.api_url, limit=8, shutdown_grace_seconds=0),
    ):
        for start in (0, 4):  # the worker takes eight runs at once, and has no room left
            assert (
                await api.post("/task_runs/batch", json=held(*range(start, start + 4)))
            ).status_code == 201
            with trio.fail_after(10):
                await gate.started_runs(start + 4).wait()
        assert (await api.post("/task_runs/batch", json=held(8, 9, 10, 11))).status_code == 201  # full
        await trio.sleep(1)
        refused = await api.post("/task_runs/batch?partial=true", json=held(*range(12, 18)))
        # Eight runs taken in the last second: 8/s. For room for two (half the bound) two
        # must be taken: a quarter of a second. The header says it in whole seconds.
        assert (refused.json()["retry_after"], refused.headers["Retry-After"]) == (0.25, "1")
        await trio.sleep(3)  # nothing taken for longer than the window looks back
        assert (await api.post("/task_runs", json=held(12)[0])).json()["retry_after"] == 1.0
        gate.release.set()


@pytest.mark.every_store
async def test_a_partial_create_on_the_channel_is_told_when_there_is_room(
    trioworker_autojump_clock: trio.testing.MockClock,
    trioworker_server_control: ServerControl,
    monkeypatch: pytest.MonkeyPatch,
    store_kind: str,
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 2)

    def create(ref: int, *numbers: int) -> dict[str, Any]:
        return {"type": "create", "ref": ref, "task_runs": held(*numbers), "partial": True}

    async with open_websocket_url(channel_url(server)) as ws:

        async def receive() -> dict[str, Any]:
            with trio.fail_after(10):
                message: dict[str, Any] = orjson.loads(await ws.get_message())
                return message

        async def send(message: dict[str, Any]) -> None:
            await ws.send_message(orjson.dumps(message).decode())

        await send(AUTH)
        assert (await receive())["type"] == "auth_success"
        await send(create(1, 1, 2, 3))
        first = await receive()
        await send(create(2, 4))
        second = await receive()
        assert [run["parameters"]["n"] for run in first["created"]] == [1, 2]
        assert (first["status"], first["room"], second["created"]) == (429, 2, [])
        shared = store_kind == "postgres"  # several servers may share its queue: no room is announced
        assert (
            (first.get("room_announced"), second.get("room_announced")) == (None, None)
            if shared
            else (
                True,
                True,
            )
        )
        async with TaskWorker(hold, api_url=server.api_url, limit=1, shutdown_grace_seconds=0):
            if shared:
                with trio.move_on_after(5) as quiet:
                    await ws.get_message()
                assert quiet.cancelled_caught  # nothing comes
            else:  # the worker took one run: room for one, and both refused creates are told
                assert await receive() == {"type": "room", "task_key": HOLD, "room": 1, "refs": [1, 2]}
            gate.release.set()
        await trio.aclose_forcefully(ws._stream)


@pytest.mark.every_store
async def test_room_in_a_queue_can_be_waited_for_over_http(
    trioworker_autojump_clock: trio.testing.MockClock,
    trioworker_server_control: ServerControl,
    monkeypatch: pytest.MonkeyPatch,
    store_kind: str,
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 2)
    await api_create(server, held(1, 2))
    async with httpx.AsyncClient(base_url=server.api_url, timeout=60) as api:
        now = await api.get("/task_runs/room", params={"task_key": HOLD, "timeout": 0})
        assert now.json() == {"task_key": HOLD, "room": 0}
        other = await api.get("/task_runs/room", params={"task_key": "q.other", "wanted": 5})
        assert other.json() == {"task_key": "q.other", "room": 2}  # at once: there is room
        answers: list[dict[str, Any]] = []
        answered = trio.Event()
        async with trio.open_nursery() as nursery:

            async def wait_for_room() -> None:
                answer = await api.get("/task_runs/room", params={"task_key": HOLD, "timeout": 30})
                answers.append(answer.json())
                answered.set()

            nursery.start_soon(wait_for_room)
            await trio.sleep(5)
            if store_kind == "postgres":  # several servers may share the queue: it answers at once
                assert answers == [{"task_key": HOLD, "room": 0}]
            else:
                assert answers == []  # waiting: nothing made room
                async with TaskWorker(hold, api_url=server.api_url, limit=1, shutdown_grace_seconds=0):
                    with trio.fail_after(10):
                        await answered.wait()
                    gate.release.set()
                assert answers == [{"task_key": HOLD, "room": 1}]
        for params, detail in (
            ({}, "task_key is required"),
            ({"task_key": "k", "wanted": "0"}, "wanted must be an integer between 1"),
            ({"task_key": "k", "timeout": "-1"}, "timeout must be between 0 and 300"),
        ):
            bad = await api.get("/task_runs/room", params=params)
            assert bad.status_code == 422 and bad.json()["detail"].startswith(detail), bad.text


async def test_without_a_limit_there_is_always_room(trioworker_server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=trioworker_server.api_url) as api:
        answer = await api.get("/task_runs/room", params={"task_key": KEY})
        assert answer.json() == {"task_key": KEY, "room": None}


# -- the clients: backpressure


async def test_delay_waits_for_room_and_then_submits(
    trioworker_autojump_clock: trio.testing.MockClock,
    trioworker_server_control: ServerControl,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 2)
    queued = [await echo.delay(1), await echo.delay(2)]
    submitted: list[trioworker.TaskRunFuture[int]] = []
    async with trioworker.connect() as client, trio.open_nursery() as nursery:
        assert client.channel is not None and client.channel.usable  # over the channel

        done = trio.Event()

        async def submit() -> None:
            submitted.append(await echo.delay(3))
            done.set()

        nursery.start_soon(submit)
        await trio.sleep(20)  # the queue stays full: it waits (and asks again every second or so)
        assert submitted == [] and await count_runs(server) == 2
        started = trio.current_time()
        async with TaskWorker(echo, api_url=server.api_url):
            with trio.fail_after(10):
                await done.wait()
            assert trio.current_time() - started < 3  # within one Retry-After of the room
            assert [await f.result(timeout=10) for f in (*queued, *submitted)] == [1, 2, 3]
    assert await count_runs(server) == 3


async def test_map_sends_what_fits_and_waits_for_the_rest(
    trioworker_autojump_clock: trio.testing.MockClock,
    trioworker_server_control: ServerControl,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 5)
    futures: list[trioworker.TaskRunFuture[int]] = []
    async with trio.open_nursery() as nursery:
        mapped = trio.Event()

        async def submit() -> None:
            futures.extend(await echo.map(range(12)))
            mapped.set()

        nursery.start_soon(submit)
        await trio.sleep(10)
        assert futures == []
        runs = await server.service.list_runs(task_key=KEY, state=None, limit=100, offset=0)
        assert sorted(run.parameters["n"] for run in runs) == [0, 1, 2, 3, 4]  # the first five, sent
        async with TaskWorker(echo, api_url=server.api_url, limit=2):
            with trio.fail_after(60):
                await mapped.wait()
            assert [await f.result(timeout=10) for f in futures] == list(range(12))
    runs = await server.service.list_runs(task_key=KEY, state=None, limit=100, offset=0)
    assert len(runs) == 12 and len({run.id for run in runs}) == 12  # nothing twice, nothing lost
    assert {run.id for run in runs} == {f.task_run_id for f in futures}


@attrs.define(eq=False)
class Creates:
    """The creates a client sent over HTTP, request by request, and the runs each answer
    made (an httpx event hook on both sides)."""

    sent: list[list[str]] = attrs.field(factory=list)
    made: list[list[str]] = attrs.field(factory=list)

    async def request(self, request: httpx.Request) -> None:
        if request.url.path.endswith("/task_runs/batch"):
            self.sent.append([item["id"] for item in orjson.loads(request.content)])

    async def response(self, response: httpx.Response) -> None:
        if response.request.url.path.endswith("/task_runs/batch"):
            answer = orjson.loads(await response.aread())
            runs = answer if isinstance(answer, list) else answer.get("created", [])
            self.made.append([run["id"] for run in runs])


async def test_map_over_http_sends_again_only_what_was_refused(
    trioworker_autojump_clock: trio.testing.MockClock,
    trioworker_server_control: ServerControl,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 5)
    creates = Creates()
    futures: list[trioworker.TaskRunFuture[int]] = []
    async with trioworker.connect(channel=False) as client, trio.open_nursery() as nursery:
        client._http.event_hooks["request"].append(creates.request)
        client._http.event_hooks["response"].append(creates.response)
        mapped = trio.Event()

        async def submit() -> None:
            futures.extend(await echo.map(range(40)))
            mapped.set()

        nursery.start_soon(submit)
        await trio.sleep(10)  # no worker: the first five were made, the rest waits for room
        assert [len(ids) for ids in creates.made] == [5] and await count_runs(server) == 5
        async with TaskWorker(echo, api_url=server.api_url, limit=2):
            with trio.fail_after(60):
                await mapped.wait()
            assert [await f.result(timeout=10) for f in futures] == list(range(40))
    made: set[str] = set()
    for sent, answered in zip(creates.sent, creates.made, strict=True):
        assert not made & set(sent)  # nothing made is sent again
        made |= set(answered)
    assert len(creates.sent[0]) == 40 and max(len(ids) for ids in creates.sent[1:]) <= 5  # the bound
    assert made == {str(f.task_run_id) for f in futures}
    assert await count_runs(server) == 40


async def create_waiting(
    server: RunningServer, creates: list[TaskRunCreate], *, channel: bool
) -> list[TaskRun]:
    """``create_task_runs(creates)``; when the queue is full (nothing made after 10 s), with
    a worker started to make room."""
    made: list[TaskRun] = []
    done = trio.Event()
    async with trioworker.connect(channel=channel) as client, trio.open_nursery() as nursery:

        async def create() -> None:
            made.extend(await client.create_task_runs(creates))
            done.set()

        nursery.start_soon(create)
        with trio.move_on_after(10):
            await done.wait()
        if not done.is_set():
            async with TaskWorker(echo, api_url=server.api_url, limit=1):
                with trio.fail_after(30):
                    await done.wait()
    return made


@pytest.mark.every_store
async def test_a_repeat_is_never_held_back_and_new_runs_wait_for_room(
    trioworker_autojump_clock: trio.testing.MockClock,
    trioworker_server_control: ServerControl,
    monkeypatch: pytest.MonkeyPatch,
    store_kind: str,
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 2)
    assert store_kind in ("sqlite", "postgres")
    first = await echo.apply_async(args=[1], idempotency_key="once")
    second = await echo.delay(2)  # the queue is full now, and no worker ever makes room
    # A create held back would wait the client's timeout, then raise QueueFull.
    async with trioworker.connect() as client:
        assert client.channel is not None and client.channel.usable
        over_channel = await echo.apply_async(args=[1], idempotency_key="once")
    over_http = await echo.apply_async(args=[1], idempotency_key="once")
    blocking = await trio.to_thread.run_sync(
        lambda: echo.sync.apply_async(args=[1], idempotency_key="once").task_run_id
    )
    assert over_channel.task_run_id == over_http.task_run_id == blocking == first.task_run_id
    assert await count_runs(server) == 2
    # A batch of repeats and new runs: the repeats are made, the new ones wait for room.
    batch = [
        build_create(echo, [1], {}, idempotency_key="once"),
        build_create(echo, [3], {}),
        TaskRunCreate(task_key=KEY, parameters={"n": 2}, id=second.task_run_id),  # its answer was lost
        build_create(echo, [4], {}),
    ]
    over_channel_batch = await create_waiting(server, batch, channel=True)
    assert await count_runs(server) == 4
    again_over_http = await create_waiting(server, batch, channel=False)  # the same ids: no wait
    for made in (over_channel_batch, again_over_http):
        ids = [run.id for run in made]
        assert ids[0] == first.task_run_id and ids[2] == second.task_run_id
        assert ids[1] == batch[1].id and ids[3] == batch[3].id
    assert await count_runs(server) == 4


async def test_a_create_waiting_for_room_survives_the_loss_of_the_channel(
    trioworker_autojump_clock: trio.testing.MockClock,
    trioworker_server_control: ServerControl,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 1)
    await echo.delay(1)
    async with trioworker.connect() as client, trio.open_nursery() as nursery:
        assert client.channel is not None
        submitted: list[trioworker.TaskRunFuture[int]] = []
        done = trio.Event()

        async def submit() -> None:
            submitted.append(await echo.delay(2))
            done.set()

        nursery.start_soon(submit)
        await trio.sleep(5)  # refused over the channel, told it will hear of room
        port = int(server.url.rsplit(":", 1)[1])
        await trioworker_server_control.stop()  # the channel is lost
        server = await trioworker_server_control.start(port=port, max_queued=1)
        await trio.sleep(5)
        assert not done.is_set()
        async with TaskWorker(echo, api_url=server.api_url):
            with trio.fail_after(30):
                await done.wait()
            assert await submitted[0].result(timeout=10) == 2
    assert await count_runs(server) == 2


async def test_a_queue_that_stays_full_ends_the_wait_after_the_clients_timeout(
    trioworker_autojump_clock: trio.testing.MockClock,
    trioworker_server_control: ServerControl,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 3)
    started = trio.current_time()
    async with TaskRunClient(timeout=10) as client:
        with pytest.raises(QueueFull) as caught:
            await client.create_task_runs([TaskRunCreate(task_key=KEY) for _ in range(5)])
    # It gives up when one more wait would take it past its timeout: never later.
    assert 10 - 1.2 <= trio.current_time() - started <= 10
    full = caught.value
    assert str(full) == (
        "429: the queue of task 'q.echo' is full: 3 runs wait for a worker (--max-queued 3); it stayed "
        "full for 10 s: 3 of 5 runs were created"
    )
    assert (full.status_code, full.task_key, full.max_queued, full.retry_after) == (429, KEY, 3, 1.0)
    assert isinstance(full, trioworker.ApiError)
    made = await server.service.list_runs(task_key=KEY, state=None, limit=100, offset=0)
    assert [run.id for run in full.created] == [run.id for run in made]  # what it made, in order


async def test_the_blocking_client_waits_for_room_too(
    trioworker_server_control: ServerControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 1)
    with SyncTaskRunClient(timeout=0.5) as impatient:
        await trio.to_thread.run_sync(
            impatient.create_task_run, TaskRunCreate(task_key=KEY, parameters={"n": 1})
        )
        with pytest.raises(QueueFull, match=r"it stayed full for 0\.5 s: nothing was created"):
            # No worker takes runs: it waits for room for its timeout, then gives up.
            await trio.to_thread.run_sync(impatient.create_task_run, TaskRunCreate(task_key=KEY))
    assert await count_runs(server) == 1

    def submit() -> int:
        with SyncTaskRunClient() as client:
            return int(
                client.create_task_run(TaskRunCreate(task_key=KEY, parameters={"n": 2})).parameters["n"]
            )

    async with trio.open_nursery() as nursery:
        results: list[int] = []
        returned = trio.Event()

        async def in_a_thread() -> None:
            results.append(await trio.to_thread.run_sync(submit))
            returned.set()

        nursery.start_soon(in_a_thread)
        async with TaskWorker(echo, api_url=server.api_url):
            with trio.fail_after(20):
                await returned.wait()
    assert results == [2]
    assert await count_runs(server) == 2


def test_a_429_answer_becomes_queue_full() -> None:
    full = api_error(429, "full", {"task_key": "k", "room": 2, "retry_after": 3, "max_queued": 5})
    assert isinstance(full, QueueFull) and (full.task_key, full.room, full.retry_after) == ("k", 2, 3.0)
    assert (full.max_queued, full.partial, full.created, full.room_announced) == (5, False, [], False)
    odd = api_error(429, "full", {"room": "many", "retry_after": True, "max_queued": 0, "room_announced": 1})
    assert isinstance(odd, QueueFull) and (odd.task_key, odd.room, odd.retry_after) == (None, 0, 1.0)
    assert (odd.max_queued, odd.room_announced) == (None, False)
    run = TaskRun(uuid.uuid4(), "k", "k-1", make_state(StateType.SCHEDULED))
    made = api_error(429, "full", {"created": [converter.unstructure(run)], "room_announced": True})
    assert isinstance(made, QueueFull) and (made.created, made.partial, made.room_announced) == (
        [run],
        True,
        True,
    )
    with pytest.raises(cattrs.BaseValidationError):
        api_error(429, "full", {"created": [{"not": "a run"}]})
    assert type(api_error(404, "gone")).__name__ == "NotFound"
    assert type(api_error(409, "taken")) is trioworker.ApiError
