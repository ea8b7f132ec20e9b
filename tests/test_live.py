"""The operator's view on the server: the live feed (coalescing, bounded buffers, the shared
overview), its websocket, and the REST routes the dashboard reads (overview, workers, retry,
runs newest first and by parent). The page itself is tested in a browser: ``test_dashboard.py``."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection

from trioworker.models import SetStateRequest, SetStateStatus, StateType, TaskRunCreate, make_state
from trioworker.server import RunningServer
from trioworker.server import overview as overview_module
from trioworker.server.live import MAX_PENDING_NOTES, MIN_OVERVIEW_SECONDS, LiveFeed, RunNote
from trioworker.server.queue import Dispatcher, Subscription
from trioworker.server.service import TaskRunService
from trioworker.server.store import EndedCount, Store
from trioworker.tasks import task
from trioworker.testing import ServerControl

from .helpers import submit, wait_all
from .raw import connect

pytestmark = pytest.mark.every_store

#: What the overview names each kind of store of the tests (``stores.py``).
STORE_NAMES = {"sqlite": "sqlite", "postgres": "postgresql"}


@task(key="live.hold")
async def hold() -> None:
    await trio.sleep_forever()


@task(key="live.echo")
def echo(x: int) -> int:
    return x


# -- the feed on its own


def test_a_feed_nobody_listens_to_does_no_work() -> None:
    feed: LiveFeed[None] = LiveFeed()

    def untouchable() -> Iterator[Any]:
        yield from ()
        raise AssertionError("the runs were looked at")

    feed.runs_changed(untouchable())
    feed.states_changed(untouchable())
    feed.deleted(untouchable())
    assert feed.version == 3  # still counted, for the overview


def test_a_listener_keeps_the_latest_note_per_run_and_resyncs_when_it_falls_behind() -> None:
    feed: LiveFeed[None] = LiveFeed()
    a, b = uuid.uuid4(), uuid.uuid4()
    with feed.listen() as listener:
        feed.states_changed([(a, StateType.SCHEDULED), (b, StateType.SCHEDULED)])
        feed.states_changed([(a, StateType.RUNNING)])
        feed.deleted([b])
        assert listener.runs_changed.is_set() and listener.overview_changed.is_set()
        notes, overflowed = listener.take()
        assert not overflowed
        assert notes == [RunNote(a, StateType.RUNNING), RunNote(b, deleted=True)]
        assert not listener.runs_changed.is_set()

        feed.states_changed((uuid.uuid4(), StateType.SCHEDULED) for _ in range(MAX_PENDING_NOTES + 1))
        feed.states_changed([(a, StateType.COMPLETED)])  # dropped too: the tab rereads anyway
        assert len(listener.pending) == 0
        assert listener.take() == ([], True)
        feed.states_changed([(a, StateType.COMPLETED)])  # after the resync, notes again
        assert listener.take() == ([RunNote(a, StateType.COMPLETED)], False)
    assert feed.listening == 0


async def test_the_overview_is_read_once_for_everyone_and_at_most_once_per_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    feed: LiveFeed[int] = LiveFeed()
    reads: list[float] = []

    async def read() -> int:
        reads.append(trio.current_time())
        await trio.sleep(0.01)  # a read that takes 10 ms: the interval stays the minimum
        return len(reads)

    results: list[int] = []

    async def get() -> None:
        results.append(await feed.overview(read, throttled=True))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(get)
    assert results == [1] * 5 and len(reads) == 1  # five tabs, one read
    assert await feed.overview(read, throttled=True) == 1  # nothing changed: no read
    feed.workers_changed()
    start = trio.current_time()
    assert await feed.overview(read, throttled=True) == 2
    assert reads[1] - reads[0] >= MIN_OVERVIEW_SECONDS  # not sooner than the interval
    assert trio.current_time() - start <= MIN_OVERVIEW_SECONDS + 0.02


async def test_the_overview_is_read_less_often_when_it_costs_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    feed: LiveFeed[None] = LiveFeed()
    reads: list[float] = []

    async def slow_read() -> None:
        reads.append(trio.current_time())
        await trio.sleep(1.0)

    await feed.overview(slow_read, throttled=True)
    feed.workers_changed()
    await feed.overview(slow_read, throttled=True)
    assert feed.overview_interval() == pytest.approx(20.0)
    assert reads[1] - reads[0] == pytest.approx(21.0)  # the read, then 20 times what it cost


async def test_a_request_for_the_overview_never_waits_for_the_tabs_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    feed: LiveFeed[int] = LiveFeed()
    reads: list[float] = []

    async def slow_read() -> int:
        reads.append(trio.current_time())
        await trio.sleep(1.0)  # the tabs' interval grows to 20 s
        return len(reads)

    assert await feed.overview(slow_read, throttled=False) == 1
    feed.workers_changed()
    tab_got: list[int] = []
    async with trio.open_nursery() as nursery:

        async def tab() -> None:
            tab_got.append(await feed.overview(slow_read, throttled=True))

        nursery.start_soon(tab)  # waits for the interval, holding nothing up
        await trio.testing.wait_all_tasks_blocked()
        asked = trio.current_time()
        assert await feed.overview(slow_read, throttled=False) == 2  # read at once
        assert reads[1] == asked
        assert await feed.overview(slow_read, throttled=False) == 2  # nothing changed since: shared
    assert tab_got == [2]  # the tab shares the read that shows what it waited for
    assert len(reads) == 2


async def test_the_service_tells_the_feed_of_every_change(store: Store) -> None:
    service = TaskRunService(store, Dispatcher())
    with service.feed.listen() as listener:
        [(run, _)] = await service.create_runs([TaskRunCreate(task_key="k")])
        assert listener.take()[0] == [RunNote.of(run)]
        sub = Subscription(client_id="w-1", keys=("k",), credit=1)
        service.subscribe(sub)
        assert listener.overview_changed.is_set()
        delivery = await service.next_runs(sub)
        await delivery.confirm()
        [note], _ = listener.take()
        assert (note.id, note.state_type) == (run.id, StateType.PENDING)
        await service.set_states([(run.id, SetStateRequest(make_state(StateType.RUNNING)))], reporter=sub)
        await service.set_states([(run.id, SetStateRequest(make_state(StateType.RUNNING)))], reporter=sub)
        [note], _ = listener.take()  # the repeat changed nothing and said nothing
        assert note.state_type is StateType.RUNNING
        listener.overview_changed = trio.Event()
        await service.disconnect(sub)  # the run goes back to the queue
        [note], _ = listener.take()
        assert (note.id, note.state_type) == (run.id, StateType.SCHEDULED)
        assert listener.overview_changed.is_set()
        await service.delete(run.id)
        assert listener.take()[0] == [RunNote(run.id, deleted=True)]


async def test_the_overview_counts_each_end_once_as_it_settles(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(overview_module, "SETTLED_AFTER", timedelta(0))  # every end is settled at once
    windows: list[tuple[datetime, datetime | None]] = []
    count_ended = store.count_ended

    async def recorded(since: datetime, until: datetime | None = None) -> list[EndedCount]:
        windows.append((since, until))
        return await count_ended(since, until)

    monkeypatch.setattr(store, "count_ended", recorded)
    service = TaskRunService(store, Dispatcher())
    runs = [run.id for run, _ in await service.create_runs([TaskRunCreate(task_key="k") for _ in range(5)])]

    async def ended() -> int:
        return sum(count.count for count in (await service.overview()).ended)

    for run_id in runs[:3]:
        await service.cancel(run_id)
    assert await ended() == 3
    for run_id in runs[3:]:
        await service.cancel(run_id)
    assert await ended() == 5
    # Each read: the ends settled since the last one, then the latest (none here).
    [(since, first_edge), (first_latest, open_1), (second_start, second_edge), (second_latest, open_2)] = (
        windows
    )
    assert open_1 is open_2 is None
    assert first_latest == first_edge == second_start  # the second read did not count the first three again
    assert first_edge is not None and since < first_edge
    assert second_edge is not None and first_edge < second_edge == second_latest


async def test_the_overview_stops_counting_ended_runs_once_they_are_deleted(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    wall = [time.time()]
    service = TaskRunService(store, Dispatcher(clock=lambda: wall[0]))
    runs = [run for run, _ in await service.create_runs([TaskRunCreate(task_key="k") for _ in range(4)])]
    for run in runs:
        assert (await service.cancel(run.id)).status is SetStateStatus.ACCEPT

    async def ended() -> int:
        return sum(count.count for count in (await service.overview()).ended)

    wall[0] += 120  # the minute they ended in is closed: the reader keeps its count
    assert await ended() == 4
    await service.delete(runs[0].id)
    assert await ended() == 3
    assert await service.purge_ended(datetime.now(UTC)) == 3  # as retention does
    assert await ended() == 0


# -- the live feed's websocket


EVENTS = "/api/events"


@asynccontextmanager
async def live_feed(server: RunningServer, token: str | None = None) -> AsyncIterator[WebSocketConnection]:
    """A tab's feed, authenticated; its first message (the overview) is read."""
    async with connect(server, EVENTS) as ws:
        await ws.send_message(orjson.dumps({"type": "auth", "token": token}).decode())
        assert orjson.loads(await ws.get_message()) == {"type": "auth_success"}
        first = orjson.loads(await ws.get_message())
        assert first["type"] == "overview"
        yield ws


async def next_message(ws: WebSocketConnection, kind: str) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = orjson.loads(await ws.get_message())
        if message["type"] == kind:
            return message


async def test_the_feed_pushes_each_run_once_per_message_and_coalesces_bursts(
    trioworker_server: RunningServer, api: httpx.AsyncClient
) -> None:
    async with live_feed(trioworker_server) as ws:
        ids = await submit(api, "live.burst", *({"i": i} for i in range(200)))
        message = await next_message(ws, "runs")  # one batch: one message
        assert [note["id"] for note in message["runs"]] == ids
        assert {note["state_type"] for note in message["runs"]} == {"SCHEDULED"}
        assert message["runs"][0]["task_key"] == "live.burst"
        for run_id in ids:  # 200 changes, one request each
            assert (await api.post(f"/task_runs/{run_id}/cancel")).status_code == 200
        latest: dict[str, str] = {}
        messages = 0
        with trio.fail_after(10):
            while len(latest) < len(ids) or set(latest.values()) != {"CANCELLED"}:
                notes = (await next_message(ws, "runs"))["runs"]
                assert len({n["id"] for n in notes}) == len(notes)  # each run once per message
                latest.update((n["id"], n["state_type"]) for n in notes)
                messages += 1
    assert set(latest) == set(ids)
    assert messages <= 20  # coalesced: far fewer messages than changes


async def test_the_overview_is_pushed_when_it_changes(
    trioworker_server: RunningServer, api: httpx.AsyncClient, trioworker_worker: Any
) -> None:
    async with live_feed(trioworker_server) as ws:
        async with trioworker_worker(echo, limit=3):
            ids = await submit(api, "live.echo", {"x": 1}, {"x": 2})
            await wait_all(api, ids)
            with trio.fail_after(10):
                while True:
                    overview = (await next_message(ws, "overview"))["overview"]
                    counts = {k["task_key"]: k["counts"] for k in overview["task_keys"]}
                    if counts.get("live.echo") == {"COMPLETED": 2}:
                        break
        assert [w["limit"] for w in overview["workers"]] == [3]
        assert sum(e["count"] for e in overview["ended"] if e["task_key"] == "live.echo") == 2


async def test_a_tab_that_falls_behind_is_told_to_resync(
    trioworker_server: RunningServer, api: httpx.AsyncClient
) -> None:
    async with live_feed(trioworker_server) as ws:
        await submit(api, "live.flood", *({} for _ in range(MAX_PENDING_NOTES + 1)))
        with trio.fail_after(10):
            assert await next_message(ws, "resync") == {"type": "resync"}


async def test_a_tab_that_reads_nothing_does_not_hold_up_the_server(
    trioworker_server: RunningServer, api: httpx.AsyncClient
) -> None:
    feed = trioworker_server.service.feed
    async with connect(trioworker_server, EVENTS, message_queue_size=0) as ws:
        await ws.send_message(orjson.dumps({"type": "auth", "token": None}).decode())
        await ws.get_message()  # auth_success
        assert orjson.loads(await ws.get_message())["type"] == "overview"  # sent once it listens
        assert feed.listening == 1
        with trio.fail_after(30):
            for _ in range(10):  # 10,000 runs while the tab reads nothing at all
                await submit(api, "live.unread", *({"payload": "x" * 200} for _ in range(1000)))
        assert all(len(listener.pending) <= MAX_PENDING_NOTES for listener in feed.listeners)


async def test_the_feed_needs_the_key_when_one_is_set(trioworker_server_control: ServerControl) -> None:
    server = await trioworker_server_control.start(api_key="s3cret")
    async with connect(server, EVENTS) as ws:
        await ws.send_message(orjson.dumps({"type": "auth", "token": "wrong"}).decode())
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
    assert closed.value.reason is not None and closed.value.reason.code == 1008
    async with live_feed(server, token="s3cret"):
        pass


async def test_a_message_from_the_tab_breaks_the_protocol(trioworker_server: RunningServer) -> None:
    async with live_feed(trioworker_server) as ws:
        await ws.send_message('{"type": "subscribe"}')
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()
    assert closed.value.reason is not None and closed.value.reason.code == 4001


# -- the REST routes the dashboard reads


async def test_the_overview_counts_runs_by_key_and_state_and_names_the_run_first_in_line(
    trioworker_server: RunningServer, api: httpx.AsyncClient, store_kind: str
) -> None:
    first_a, second_a = await submit(api, "live.a", {}, {})
    [only_b] = await submit(api, "live.b", {})
    assert (await api.post(f"/task_runs/{second_a}/cancel")).status_code == 200
    body = (await api.get("/overview")).json()
    assert [(k["task_key"], k["counts"]) for k in body["task_keys"]] == [
        ("live.a", {"SCHEDULED": 1, "CANCELLED": 1}),
        ("live.b", {"SCHEDULED": 1}),
    ]
    assert [k["oldest_waiting"]["id"] for k in body["task_keys"]] == [first_a, only_b]
    assert [(e["task_key"], e["state_type"], e["count"]) for e in body["ended"]] == [
        ("live.a", "CANCELLED", 1)
    ]
    assert body["workers"] == []
    [server] = body["servers"]
    assert (server["store"], server["workers"]) == (STORE_NAMES[store_kind], 0)
    assert (server["id"], server["url"], server["answering"]) == (
        str(trioworker_server.service.server_id),
        trioworker_server.url,
        True,
    )
    # Alone on SQLite, it sends no heartbeat; on PostgreSQL it does.
    assert (server["heartbeat"] is None) == (store_kind == "sqlite")


async def test_task_workers_lists_the_connected_workers_by_key(
    trioworker_server: RunningServer, api: httpx.AsyncClient, trioworker_worker: Any
) -> None:
    async with trioworker_worker(hold, echo, limit=4), live_feed(trioworker_server) as ws:
        [run_id] = await submit(api, "live.hold", {})
        with trio.fail_after(10):
            while not any(
                (n["id"], n["state_type"]) == (run_id, "RUNNING")
                for n in (await next_message(ws, "runs"))["runs"]
            ):
                pass
        [worker] = (await api.get("/task_workers", params={"task_key": "live.hold"})).json()
        assert sorted(worker["task_keys"]) == ["live.echo", "live.hold"]
        assert (worker["limit"], worker["runs_in_flight"]) == (4, 1)
        assert worker["client_id"] and worker["connected_since"]
        assert worker["server"] == str(trioworker_server.service.server_id)
        assert (await api.get("/task_workers", params={"task_key": "live.other"})).json() == []
        assert (await api.get("/task_workers")).json() == [worker]
        assert (await api.post(f"/task_runs/{run_id}/cancel")).status_code == 200
    assert (await api.get("/task_workers")).json() == []


async def test_retry_makes_a_new_run_with_the_same_arguments(
    trioworker_server: RunningServer, api: httpx.AsyncClient
) -> None:
    parent = str(uuid.uuid4())
    body = {"task_key": "live.r", "name": "again", "parameters": {"x": 1}, "tags": ["t"]}
    created = await api.post("/task_runs", json={**body, "parent_task_run_id": parent})
    run = created.json()
    refused = await api.post(f"/task_runs/{run['id']}/retry")
    assert refused.status_code == 409 and "cancel it first" in refused.json()["detail"]
    await api.post(f"/task_runs/{run['id']}/cancel")
    response = await api.post(f"/task_runs/{run['id']}/retry")
    assert response.status_code == 201
    new = response.json()
    assert new["id"] != run["id"] and new["state"]["type"] == "SCHEDULED"
    for field in ("task_key", "name", "parameters", "tags", "serializer", "parent_task_run_id"):
        assert new[field] == run[field]
    assert (await api.post(f"/task_runs/{uuid.uuid4()}/retry")).status_code == 404


async def test_a_retried_run_is_named_as_a_new_submission_would_be(api: httpx.AsyncClient) -> None:
    """A name the server made holds the old run's id: the new run gets its own; a name
    given at submission is kept."""
    [unnamed] = await submit(api, "live.r", {})
    run = (await api.get(f"/task_runs/{unnamed}")).json()
    assert run["name"] == f"live.r-{uuid.UUID(unnamed).hex[:8]}"
    await api.post(f"/task_runs/{unnamed}/cancel")
    new = (await api.post(f"/task_runs/{unnamed}/retry")).json()
    assert new["name"] == f"live.r-{uuid.UUID(new['id']).hex[:8]}" != run["name"]


async def test_a_summary_list_leaves_out_parameters_and_results(api: httpx.AsyncClient) -> None:
    big = {"blob": "x" * 100_000}
    [run_id] = await submit(api, "live.s", big)
    done = {"state": {"type": "COMPLETED", "name": "Completed", "data": big}, "force": True}
    assert (await api.post(f"/task_runs/{run_id}/set_state", json=done)).status_code == 200
    full = (await api.get("/task_runs", params={"task_key": "live.s"})).json()
    assert full[0]["parameters"] == big and full[0]["state"]["data"] == big
    response = await api.get("/task_runs", params={"task_key": "live.s", "fields": "summary"})
    [summary] = response.json()
    assert len(response.content) < 2000
    assert "parameters" not in summary and "data" not in summary["state"]
    assert summary["id"] == run_id and summary["state"]["type"] == "COMPLETED"
    assert {**summary, "state": {**summary["state"], "data": big}, "parameters": big} == full[0]
    refused = await api.get("/task_runs", params={"fields": "some"})
    assert refused.status_code == 422 and "summary" in refused.json()["detail"]


async def test_runs_list_newest_first_and_by_parent(
    trioworker_server: RunningServer, api: httpx.AsyncClient
) -> None:
    [parent] = await submit(api, "live.p", {})
    children = await submit(api, "live.c", {}, {}, parent_task_run_id=parent)
    newest = (await api.get("/task_runs", params={"sort": "created_desc"})).json()
    assert [run["id"] for run in newest] == [*reversed(children), parent]
    by_parent = (await api.get("/task_runs", params={"parent_task_run_id": parent})).json()
    assert [run["id"] for run in by_parent] == children
    for bad in ({"sort": "name"}, {"parent_task_run_id": "nope"}):
        response = await api.get("/task_runs", params=bad)
        assert response.status_code == 422, bad


async def test_the_page_loads_without_the_key_and_the_data_needs_it(
    trioworker_server_control: ServerControl,
) -> None:
    server = await trioworker_server_control.start(api_key="s3cret")
    async with httpx.AsyncClient(base_url=server.url) as http:
        page = await http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "{{version}}" not in page.text and "/dashboard/app.js?v=" in page.text
        for asset in ("app.js", "style.css", "favicon.svg"):
            assert (await http.get(f"/dashboard/{asset}")).status_code == 200
        missing = await http.get("/dashboard/secrets.txt")
        assert missing.status_code == 404 and missing.json()["detail"] == "no dashboard asset 'secrets.txt'"
        for path in ("/api/overview", "/api/task_workers", "/api/task_runs"):
            assert (await http.get(path)).status_code == 401, path
        authorized = await http.get("/api/overview", headers={"Authorization": "Bearer s3cret"})
        assert authorized.status_code == 200
