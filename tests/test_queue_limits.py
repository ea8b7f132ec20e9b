"""Queue limits (``trioworker server --max-queued N``): a create beyond N runs of one task key
waiting for a worker answers 429 with ``Retry-After`` (REST and the client channel), and
clients wait and send it again (backpressure): ``.delay()`` within its timeout, ``map``
sending what fits first. Nothing is lost and nothing is made twice.

Real servers and workers; the waits run on a ``MockClock`` where the test does not say so.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import trio
import trio.testing

import trioworker
from trioworker.client.rest import SyncTaskRunClient, TaskRunClient
from trioworker.errors import QueueFull, api_error
from trioworker.models import TaskRunCreate
from trioworker.server import RunningServer
from trioworker.server.limits import QueueLimit
from trioworker.tasks import task
from trioworker.testing import ServerControl
from trioworker.worker.task_worker import TaskWorker

from .test_channel import AUTH, talk

KEY = "q.echo"


@task(key=KEY)
async def echo(n: int) -> int:
    return n


async def limited(control: ServerControl, monkeypatch: pytest.MonkeyPatch, max_queued: int) -> RunningServer:
    server = await control.start(max_queued=max_queued)
    monkeypatch.setenv("TRIOWORKER_API_URL", server.api_url)
    return server


def body(*numbers: int, **fields: Any) -> list[dict[str, Any]]:
    return [{"task_key": KEY, "parameters": {"n": n}, **fields} for n in numbers]


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


async def test_a_repeated_create_gets_its_run_back_even_when_the_queue_is_full(
    trioworker_server_control: ServerControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await limited(trioworker_server_control, monkeypatch, 1)
    run_id = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        first = await api.post("/task_runs", json={**body(1)[0], "id": run_id})
        assert first.status_code == 201
        again = await api.post("/task_runs", json={**body(1)[0], "id": run_id})  # its answer was lost
        assert (again.status_code, again.json()["id"]) == (200, run_id)
        batch = await api.post("/task_runs/batch", json=[{**body(1)[0], "id": run_id}, *body(2)])
        assert batch.status_code == 429  # the new one does not fit; the repeat is not counted
        assert batch.json()["room"] == 1
    assert await count_runs(server) == 1


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
    entered = trio.Event()
    release = trio.Event()

    @task(key="q.hold")
    async def hold(n: int) -> int:
        entered.set()
        await release.wait()
        return n

    async with httpx.AsyncClient(base_url=server.api_url) as api:

        async def create(n: int) -> int:
            return (
                await api.post("/task_runs", json={"task_key": "q.hold", "parameters": {"n": n}})
            ).status_code

        assert [await create(1), await create(2), await create(3)] == [201, 201, 429]
        async with TaskWorker(hold, api_url=server.api_url, limit=1):
            with trio.fail_after(10):
                await entered.wait()
            # One run was delivered (the worker holds it, running): one queued, room for one.
            assert [await create(3), await create(4)] == [201, 429]
            release.set()


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        QueueLimit(0)


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
    assert (full.status_code, full.task_key, full.room, full.retry_after) == (429, KEY, 0, 1.0)
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
            # Retry-After (1 s) is longer than its timeout: it gives up at once.
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
    full = api_error(429, "full", {"task_key": "k", "room": 2, "retry_after": 3})
    assert isinstance(full, QueueFull) and (full.task_key, full.room, full.retry_after) == ("k", 2, 3.0)
    odd = api_error(429, "full", {"room": "many", "retry_after": True})
    assert isinstance(odd, QueueFull) and (odd.task_key, odd.room, odd.retry_after) == (None, 0, 1.0)
    assert type(api_error(404, "gone")).__name__ == "NotFound"
    assert type(api_error(409, "taken")) is trioworker.ApiError
