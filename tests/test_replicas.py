"""Several servers (replicas) on one PostgreSQL database.

First the store's part, with two or three stores on one database, each registered as a
server: leases held by (server, client), the reaper, claims from the ready table, notices.
Then real servers (in-process, each its own replica) and real workers on one database.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

import trioworker
from trioworker import protocol
from trioworker.models import (
    ScheduleCreate,
    SetStateRequest,
    SetStateStatus,
    StateType,
    TaskRunCreate,
    make_state,
)
from trioworker.schedules import checked
from trioworker.server import RunningServer, ServerConfig
from trioworker.server.queue import trio_anchored_clock
from trioworker.server.store.base import (
    LEASED_ELSEWHERE,
    ConnectedWorker,
    Fired,
    LiveServer,
    Notice,
    SharedStore,
)
from trioworker.server.store.postgres import NOTICE_BYTES, PostgresStore, decode_notice, encode_notices
from trioworker.tasks import Task, task
from trioworker.testing import AUTOJUMP_THRESHOLD, ServerControl
from trioworker.worker.task_worker import TaskWorker

from .fakes import outage_proxy
from .helpers import LogEvents, history, submit, wait_all
from .raw import connect, subscribe
from .test_cli_tools import make_cli
from .test_postgres import port_of, sql, through

DEADLINE = 30


def report(state_type: StateType) -> SetStateRequest:
    return SetStateRequest(make_state(state_type))


@asynccontextmanager
async def server_store(url: str) -> AsyncIterator[tuple[PostgresStore, uuid.UUID]]:
    """A store on ``url`` registered as a server of its own (silent for a minute at most)."""
    async with PostgresStore.open(url, exclusive=False) as store:
        replica = uuid.uuid4()
        await store.register_replica(replica, 60, None)
        yield store, replica


async def declare_dead(url: str, replica: uuid.UUID) -> None:
    """The server ``replica`` was last heard of an hour ago."""
    await sql(
        url,
        "UPDATE trioworker_replicas SET heartbeat_at = now() - interval '1 hour' WHERE id = %s",
        (replica,),
    )


async def leases(url: str, ids: Sequence[uuid.UUID]) -> list[tuple[str, str | None, uuid.UUID | None]]:
    """``(state type, client, server)`` of each run, in the order of ``ids``."""
    rows = await sql(
        url,
        "SELECT id, state_type, client_id, replica_id FROM trioworker_task_runs WHERE id = ANY(%s)",
        (list(ids),),
    )
    by_id = {run_id: (state, client, replica) for run_id, state, client, replica in rows}
    return [by_id[run_id] for run_id in ids]


# --------------------------------------------------------------------------- leases


async def test_a_report_changes_a_run_only_through_its_server_from_its_client(postgres_url: str) -> None:
    async with server_store(postgres_url) as (a, a_id), server_store(postgres_url) as (b, b_id):
        [(run, _)] = await a.create_runs([TaskRunCreate(task_key="k")])
        claimed = await a.claim_ready(["k"], 10, "w", time.time())
        assert [r.id for r in claimed.runs] == [run.id]
        assert await leases(postgres_url, [run.id]) == [("PENDING", "w", a_id)]

        elsewhere = [
            await b.set_states([(run.id, report(StateType.RUNNING))], now=time.time(), holder="w"),
            await a.set_states([(run.id, report(StateType.RUNNING))], now=time.time(), holder="other"),
        ]
        for [change] in elsewhere:
            assert change.result.status is SetStateStatus.ABORT
            assert change.result.details == LEASED_ELSEWHERE
            assert change.result.state.type is StateType.PENDING
        [requeued] = await b.requeue([run.id], reason="redelivery", max_deliveries=5, holder="w")
        assert (requeued.state_type, requeued.queued) == (StateType.PENDING, None)
        assert await leases(postgres_url, [run.id]) == [("PENDING", "w", a_id)]  # nothing changed

        [change] = await a.set_states([(run.id, report(StateType.RUNNING))], now=time.time(), holder="w")
        assert change.result.status is SetStateStatus.ACCEPT
        # A change from elsewhere (REST, no holder) through another server keeps the lease where it is.
        [change] = await b.set_states(
            [(run.id, SetStateRequest(make_state(StateType.RUNNING, "Resumed"), force=True))], now=time.time()
        )
        assert change.result.status is SetStateStatus.ACCEPT
        assert await leases(postgres_url, [run.id]) == [("RUNNING", "w", a_id)]
        [change] = await a.set_states([(run.id, report(StateType.COMPLETED))], now=time.time(), holder="w")
        assert change.result.status is SetStateStatus.ACCEPT
        assert await leases(postgres_url, [run.id]) == [("COMPLETED", None, None)]
        assert b_id != a_id


async def test_a_reconnected_worker_takes_its_runs_to_the_server_it_reached(postgres_url: str) -> None:
    async with server_store(postgres_url) as (a, _), server_store(postgres_url) as (b, b_id):
        created = await a.create_runs([TaskRunCreate(task_key="k") for _ in range(3)])
        mine, requeued, someone_elses = (run.id for run, _ in created)
        await a.claim_ready(["k"], 2, "w", time.time())
        await a.claim_ready(["k"], 1, "x", time.time())
        await a.requeue([requeued], reason="redelivery", max_deliveries=5, holder="w")

        kept, lost = await b.reclaim([mine, requeued, someone_elses], "w")
        assert (kept, lost) == ([mine, requeued], [someone_elses])
        assert await leases(postgres_url, [mine, requeued]) == [
            ("PENDING", "w", b_id),
            ("RUNNING", "w", b_id),
        ]
        # From now on its reports go through b only.
        [late] = await a.set_states([(mine, report(StateType.RUNNING))], now=time.time(), holder="w")
        assert late.result.details == LEASED_ELSEWHERE
        [change] = await b.set_states([(mine, report(StateType.RUNNING))], now=time.time(), holder="w")
        assert change.result.status is SetStateStatus.ACCEPT


# --------------------------------------------------------------------------- the reaper


async def test_one_server_hands_back_the_runs_of_a_dead_one_and_a_late_report_changes_nothing(
    postgres_url: str,
) -> None:
    async with (
        server_store(postgres_url) as (dead, dead_id),
        server_store(postgres_url) as (b, b_id),
        server_store(postgres_url) as (c, _),
    ):
        created = await dead.create_runs([TaskRunCreate(task_key="k") for _ in range(3)])
        ids = [run.id for run, _ in created]
        await dead.claim_ready(["k"], 2, "w", time.time())
        await dead.set_states([(ids[0], report(StateType.RUNNING))], now=time.time(), holder="w")
        kept = await b.claim_ready(["k"], 1, "v", time.time())  # held through a live server
        assert [r.id for r in kept.runs] == [ids[2]]

        await declare_dead(postgres_url, dead_id)
        beats = []

        async def beat(store: PostgresStore) -> None:
            beats.append(await store.heartbeat(max_deliveries=5, workers=[]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(beat, b)
            nursery.start_soon(beat, c)
        assert sorted(len(beat.dead) for beat in beats) == [0, 1]  # one of them reaped it
        [reaping] = [beat for beat in beats if beat.dead]
        assert reaping.dead == [dead_id]
        assert all(beat.alive for beat in beats)
        assert sorted(o.id for o in reaping.reaped) == sorted(ids[:2])
        assert {o.state_type for o in reaping.reaped} == {StateType.SCHEDULED}
        assert await leases(postgres_url, ids) == [
            ("SCHEDULED", None, None),
            ("SCHEDULED", None, None),
            ("PENDING", "v", b_id),
        ]
        assert await sql(
            postgres_url, "SELECT count(*) FROM trioworker_replicas WHERE id = %s", (dead_id,)
        ) == [(0,)]

        # The dead server was only slow: its next heartbeat hears it, its late report is refused.
        assert not (await dead.heartbeat(max_deliveries=5, workers=[])).alive
        [late] = await dead.set_states([(ids[0], report(StateType.COMPLETED))], now=time.time(), holder="w")
        assert (late.result.status, late.result.details) == (SetStateStatus.ABORT, LEASED_ELSEWHERE)
        [run] = await b.read_runs([ids[0]])
        assert (run.state.type, run.state.name, run.delivery_count) == (StateType.SCHEDULED, "Redelivered", 1)
        assert [h.type for h in await b.history(ids[0]) or []][-1] is StateType.SCHEDULED


async def test_a_run_delivered_too_often_by_dead_servers_crashes(postgres_url: str) -> None:
    async with server_store(postgres_url) as (live, _):
        [(run, _)] = await live.create_runs([TaskRunCreate(task_key="k")])
        for attempt in range(2):
            async with server_store(postgres_url) as (dying, dying_id):
                assert len((await dying.claim_ready(["k"], 1, "w", time.time())).runs) == 1
            await declare_dead(postgres_url, dying_id)
            beat = await live.heartbeat(max_deliveries=2, workers=[])
            expected = StateType.SCHEDULED if attempt == 0 else StateType.CRASHED
            assert [(o.id, o.state_type) for o in beat.reaped] == [(run.id, expected)]
        [crashed] = await live.read_runs([run.id])
        assert crashed.state.message == "delivered 2 times without finishing"


async def test_runs_held_through_no_live_server_are_handed_back(postgres_url: str) -> None:
    async with server_store(postgres_url) as (a, _), server_store(postgres_url) as (b, _):
        created = await a.create_runs([TaskRunCreate(task_key="k") for _ in range(2)])
        await b.claim_ready(["k"], 2, "w", time.time())
        await b.unregister_replica()  # b stopped, and what it held was not handed back
        beat = await a.heartbeat(max_deliveries=5, workers=[])
        assert sorted(o.id for o in beat.reaped) == sorted(run.id for run, _ in created)
        assert beat.dead == []


async def test_a_server_starting_recovers_only_what_dead_servers_held(postgres_url: str) -> None:
    async with server_store(postgres_url) as (live, live_id), server_store(postgres_url) as (dead, dead_id):
        created = await live.create_runs([TaskRunCreate(task_key="k") for _ in range(3)])
        ids = [run.id for run, _ in created]
        await live.claim_ready(["k"], 1, "w", time.time())
        await dead.claim_ready(["k"], 1, "v", time.time())
        await declare_dead(postgres_url, dead_id)
        async with server_store(postgres_url) as (starting, _):
            queued = await starting.recover(max_deliveries=5)
        assert [q.id for q in queued] == [ids[1], ids[2]]  # the dead one's run first: it is older
        assert await leases(postgres_url, ids) == [
            ("PENDING", "w", live_id),
            ("SCHEDULED", None, None),
            ("SCHEDULED", None, None),
        ]


# --------------------------------------------------------------------------- claims from the ready table


async def test_claims_take_due_runs_oldest_first_and_say_when_the_next_is_due(postgres_url: str) -> None:
    async with server_store(postgres_url) as (store, replica):
        now = time.time()
        later = datetime.fromtimestamp(now + 600, UTC)
        [(upstream, _)] = await store.create_runs([TaskRunCreate(task_key="u")])
        created = await store.create_runs(
            [
                TaskRunCreate(task_key="k", scheduled_time=later),
                TaskRunCreate(task_key="k", wait_for=[upstream.id]),
                TaskRunCreate(task_key="k"),
                TaskRunCreate(task_key="j"),
            ]
        )
        delayed, waiting, due, other_key = (run.id for run, _ in created)
        assert await store.count_queued(now) == (3, 1)  # the waiting run is not counted
        claimed = await store.claim_ready(["k"], 10, "w", now)
        assert [r.id for r in claimed.runs] == [due]
        assert claimed.runs[0].state.type is StateType.PENDING
        assert claimed.next_due == pytest.approx(later.timestamp())
        assert [q.id for q in await store.waiting_runs()] == [waiting]

        await store.release_waiting([waiting])
        assert await store.waiting_runs() == []
        both = await store.claim_ready(["j", "k"], 10, "w", now + 601)
        assert [r.id for r in both.runs] == [delayed, waiting, other_key]  # oldest first across keys
        assert both.next_due is None
        assert {lease[2] for lease in await leases(postgres_url, [delayed, waiting, other_key])} == {replica}


async def test_two_servers_claim_each_ready_run_once(postgres_url: str) -> None:
    async with server_store(postgres_url) as (a, _), server_store(postgres_url) as (b, _):
        created = await a.create_runs([TaskRunCreate(task_key="k") for _ in range(300)])
        claimed: list[uuid.UUID] = []

        async def claim_all(store: PostgresStore, client: str) -> None:
            while runs := (await store.claim_ready(["k"], 7, client, time.time())).runs:
                claimed.extend(run.id for run in runs)

        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(claim_all, a, f"a{n}")
                nursery.start_soon(claim_all, b, f"b{n}")
        assert sorted(claimed) == sorted(run.id for run, _ in created)


async def test_a_claim_whose_outcome_was_not_heard_is_delivered_by_the_next(postgres_url: str) -> None:
    async with server_store(postgres_url) as (store, _):
        created = await store.create_runs([TaskRunCreate(task_key="k") for _ in range(4)])
        ids = [run.id for run, _ in created]
        first = await store.claim_ready(["k"], 1, "w", time.time())
        await store.claim_ready(["k"], 1, "w", time.time())  # its answer "lost"
        await store.claim_ready(["k"], 1, "other", time.time())
        retried = await store.claim_ready(["k"], 2, "w", time.time(), known=[r.id for r in first.runs])
        assert [r.id for r in retried.runs] == [ids[1], ids[3]]  # the lost one first, then a new one


# --------------------------------------------------------------------------- notices


def test_notices_fit_in_a_notification_and_read_back() -> None:
    origin = uuid.uuid4()
    keys = [f"key-{n}-\u00e9\"'" * 5 for n in range(100)]
    ids = [uuid.uuid4() for _ in range(1000)]
    payloads = encode_notices(origin, keys, ids)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= NOTICE_BYTES for p in payloads)
    notices = [decode_notice(p) for p in payloads]
    assert all(n is not None and n.origin == origin for n in notices)
    assert [k for n in notices if n for k in n.keys] == keys
    assert [i for n in notices if n for i in n.changed] == ids
    assert decode_notice("not json") is None
    assert decode_notice('{"o": "zz", "k": [], "c": []}') is None


async def test_a_listener_hears_what_another_server_committed(postgres_url: str) -> None:
    async with server_store(postgres_url) as (a, a_id), server_store(postgres_url) as (b, _):
        listener = b.listener()
        await listener.connect()
        try:
            heard: list[Notice] = []

            async def hear(*, until: int) -> None:
                with trio.fail_after(DEADLINE):
                    while len(heard) < until:
                        heard.extend(await listener.receive())

            created = await a.create_runs([TaskRunCreate(task_key="k"), TaskRunCreate(task_key="j")])
            await hear(until=1)
            assert heard == [Notice(a_id, ("j", "k"), ())]  # one notice per commit, each key once
            [run, other] = (run.id for run, _ in created)
            await a.set_states([(run, report(StateType.CANCELLED))], now=time.time())
            await a.delete_run(other)
            await hear(until=3)
            assert heard[1:] == [Notice(a_id, (), (run,)), Notice(a_id, (), (other,))]
            # A transaction that rolls back announces nothing.
            with pytest.raises(ZeroDivisionError):
                await a._run(lambda ops: (ops.create_runs([TaskRunCreate(task_key="k")]), 1 / 0))
            await a.create_runs([TaskRunCreate(task_key="after")])
            await hear(until=4)
            assert heard[3] == Notice(a_id, ("after",), ())
        finally:
            listener.close()


# ------------------------------------------------------------------ what each server shows of the others


def connected(client_id: str, server: uuid.UUID, *keys: str, in_flight: int = 0) -> ConnectedWorker:
    return ConnectedWorker(client_id, list(keys), 4, 0, in_flight, datetime.now(UTC), server)


def here(server: uuid.UUID, *workers: ConnectedWorker) -> LiveServer:
    return LiveServer(server, "here", datetime.now(UTC), "http://here", None, list(workers))


async def test_each_server_lists_the_live_servers_with_their_workers(postgres_url: str) -> None:
    async with server_store(postgres_url) as (a, a_id), server_store(postgres_url) as (b, b_id):
        mine = connected("on-a", a_id, "k")
        [alone, other] = await a.live_servers(here(a_id, mine))
        assert (alone.id, alone.version, alone.workers) == (a_id, "here", [mine])
        assert alone.heartbeat is not None  # as its row holds it
        assert (other.id, other.version, other.url, other.workers) == (b_id, trioworker.__version__, None, [])

        theirs = [connected("on-b", b_id, "k", "j", in_flight=2), connected("also-on-b", b_id, "j")]
        await b.publish_workers(theirs)
        [_, other] = await a.live_servers(here(a_id))
        assert other.workers == theirs
        beat = await b.heartbeat(max_deliveries=5, workers=theirs[:1])  # the heartbeat writes them too
        assert beat.alive
        [_, other] = await a.live_servers(here(a_id))
        assert other.workers == theirs[:1] and other.heartbeat is not None

        await declare_dead(postgres_url, b_id)  # silent too long: not shown, reaped or not
        assert [server.id for server in await a.live_servers(here(a_id))] == [a_id]
        assert [server.id for server in await b.live_servers(here(b_id))] == [b_id, a_id]  # as b sees it


async def test_workers_a_server_cannot_read_are_left_out_and_said_so(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with server_store(postgres_url) as (a, a_id), server_store(postgres_url) as (_, b_id):
        await sql(postgres_url, "UPDATE trioworker_replicas SET workers = %s WHERE id = %s", (b"[{}]", b_id))
        [_, other] = await a.live_servers(here(a_id))
        assert (other.id, other.workers) == (b_id, [])
        assert f"the workers of server {b_id} cannot be read" in caplog.text


async def test_a_server_tells_the_others_when_its_workers_changed(postgres_url: str) -> None:
    async with server_store(postgres_url) as (a, a_id), server_store(postgres_url) as (b, b_id):
        listener = a.listener()
        await listener.connect()
        try:
            heard: list[Notice] = []

            async def hear() -> Notice:
                with trio.fail_after(DEADLINE):
                    while not heard:
                        heard.extend(await listener.receive())
                return heard.pop(0)

            workers = [connected("on-b", b_id, "k")]
            await b.publish_workers(workers)
            assert await hear() == Notice(b_id, workers=True)
            await b.heartbeat(max_deliveries=5, workers=workers)  # the same again: nothing to tell
            await b.create_runs([TaskRunCreate(task_key="k")])
            assert await hear() == Notice(b_id, ("k",))
            await b.heartbeat(max_deliveries=5, workers=[])  # they left
            assert await hear() == Notice(b_id, workers=True)
            async with server_store(postgres_url) as (c, c_id):
                await c.publish_workers([])
                assert await hear() == Notice(c_id, workers=True)
                assert (await c.heartbeat(max_deliveries=5, workers=[])).dead == []
                await declare_dead(postgres_url, b_id)
                assert (await c.heartbeat(max_deliveries=5, workers=[])).dead == [b_id]
                assert await hear() == Notice(c_id, workers=True)  # b is gone, with its workers
            assert a_id not in (b_id, c_id)
        finally:
            listener.close()


# --------------------------------------------------------------------------- servers and workers


@attrs.define(eq=False)
class Replicas:
    """Starts servers on one database, each a replica of its own. ``replica_timeout`` is 10 s
    unless a test needs a server found dead (or fenced) sooner: on a loaded machine a
    heartbeat can come a second late, and the server would close its sockets meanwhile."""

    nursery: trio.Nursery
    url: str
    controls: list[ServerControl] = attrs.field(factory=list)

    async def start(
        self, *, db: str | None = None, replica_timeout: float = 10.0
    ) -> tuple[ServerControl, RunningServer]:
        config = ServerConfig(db_path=db or self.url, port=0, replica_timeout=replica_timeout)
        control = ServerControl(self.nursery, config)
        self.controls.append(control)
        return control, await control.start()


@pytest.fixture
async def replicas(postgres_url: str) -> AsyncIterator[Replicas]:
    async with trio.open_nursery() as nursery:
        yield Replicas(nursery, postgres_url)
        nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class Record:
    """What the tasks of this module did (:meth:`reset` before each test)."""

    ran: list[str] = attrs.field(factory=list)
    started: trio.Event = attrs.field(factory=trio.Event)
    stopped: trio.Event = attrs.field(factory=trio.Event)
    stopped_at: float = 0.0

    def reset(self) -> None:
        self.ran.clear()
        self.started = trio.Event()
        self.stopped = trio.Event()


record = Record()


@pytest.fixture(autouse=True)
def _fresh_record() -> None:
    record.reset()


@task(key="r.echo")
async def echo(text: str) -> str:
    record.ran.append(text)
    return text


@task(key="r.block")
async def block() -> None:
    record.started.set()
    try:
        await trio.sleep_forever()
    finally:
        record.stopped_at = time.monotonic()
        record.stopped.set()


@task(key="r.fail")
async def fail() -> None:
    raise ValueError("upstream failed")


@asynccontextmanager
async def connect_channel(server: RunningServer) -> AsyncIterator[WebSocketConnection]:
    """A client channel to ``server``, authenticated."""
    url = server.url.replace("http://", "ws://", 1) + "/api/task_runs/channel"
    async with open_websocket_url(url) as ws:
        try:
            await ws.send_message('{"type": "auth", "token": null}')
            assert await ws.get_message() == '{"type":"auth_success"}'
            yield ws
        finally:
            await trio.aclose_forcefully(ws._stream)


def worker(server: RunningServer, *tasks: Task[..., Any], **options: Any) -> TaskWorker:
    return TaskWorker(*tasks, api_url=server.api_url, shutdown_grace_seconds=5.0, **options)


async def test_a_run_created_on_one_server_runs_on_a_worker_of_another(replicas: Replicas) -> None:
    _, a = await replicas.start()
    _, b = await replicas.start()
    async with (
        httpx.AsyncClient(base_url=a.api_url, timeout=DEADLINE) as api_a,
        worker(b, echo) as on_b,
    ):
        started = time.monotonic()
        [run_id] = await submit(api_a, "r.echo", {"text": "hello"})
        [run] = await wait_all(api_a, [run_id])  # the wait on a sees the end reported through b
        latency = time.monotonic() - started
    assert run["state"]["type"] == "COMPLETED" and run["state"]["data"] == "hello"
    assert on_b.finished_task_runs == {"r.echo": 1}
    assert latency < 2  # no safety-net round: the notice woke b (measured: about 10 ms)


async def test_a_future_on_one_server_resolves_when_the_run_ends_through_another(replicas: Replicas) -> None:
    _, a = await replicas.start()
    _, b = await replicas.start()
    async with trioworker.connect(a.api_url) as client, worker(b, echo):
        assert client.channel is not None and client.channel.usable  # the future waits on a's channel
        future = await echo.delay("over there")
        with trio.fail_after(DEADLINE):
            assert await future.result(timeout=DEADLINE) == "over there"


async def test_a_cancel_sent_to_one_server_reaches_a_worker_on_another_within_a_second(
    replicas: Replicas,
) -> None:
    _, a = await replicas.start()
    _, b = await replicas.start()
    async with httpx.AsyncClient(base_url=a.api_url, timeout=DEADLINE) as api_a, worker(b, block):
        [run_id] = await submit(api_a, "r.block", {})
        with trio.fail_after(DEADLINE):
            await record.started.wait()
        sent = time.monotonic()
        response = await api_a.post(f"/task_runs/{run_id}/cancel")
        assert response.status_code == 200
        with trio.fail_after(DEADLINE):
            await record.stopped.wait()
        assert record.stopped_at - sent < 1.0
        [run] = await wait_all(api_a, [run_id])
    assert run["state"]["type"] == "CANCELLED"


async def test_wait_for_holds_across_servers(replicas: Replicas) -> None:
    _, a = await replicas.start()
    _, b = await replicas.start()
    async with (
        httpx.AsyncClient(base_url=a.api_url, timeout=DEADLINE) as api_a,
        httpx.AsyncClient(base_url=b.api_url, timeout=DEADLINE) as api_b,
    ):
        [upstream, doomed_upstream] = [(await submit(api_a, key, {}))[0] for key in ("r.block", "r.fail")]
        [dependent] = await submit(api_b, "r.echo", {"text": "after"}, wait_for=[upstream])
        [doomed] = await submit(api_b, "r.echo", {"text": "never"}, wait_for=[doomed_upstream])
        async with worker(a, block, fail), worker(b, echo) as on_b:
            with trio.fail_after(DEADLINE):
                await record.started.wait()
            [failed] = await wait_all(api_b, [doomed])  # failed through a, seen by b, which fails it
            assert failed["state"]["type"] == "FAILED"
            assert failed["state"]["message"].startswith(
                f"not started: a run it waits for ({doomed_upstream}) "
            )
            waiting = (await api_b.get(f"/task_runs/{dependent}")).json()
            assert waiting["state"]["type"] == "SCHEDULED"  # held back while the upstream runs
            assert (
                await api_a.post(
                    f"/task_runs/{upstream}/set_state", json={"state": {"type": "COMPLETED"}, "force": True}
                )
            ).status_code == 200
            [after] = await wait_all(api_b, [dependent])
        assert after["state"]["data"] == "after"
        assert on_b.finished_task_runs == {"r.echo": 1}
        assert record.ran == ["after"]


async def test_an_idempotency_key_makes_one_run_across_servers(replicas: Replicas) -> None:
    servers = [(await replicas.start())[1] for _ in range(2)]
    ids: list[str] = []
    async with trio.open_nursery() as nursery:
        for n in range(20):

            async def create(server: RunningServer, n: int) -> None:
                async with httpx.AsyncClient(base_url=server.api_url, timeout=DEADLINE) as api:
                    body = {"task_key": "r.echo", "idempotency_key": "once", "parameters": {"text": str(n)}}
                    response = await api.post("/task_runs", json=body)
                    assert response.status_code in (200, 201)
                    ids.append(response.json()["id"])

            nursery.start_soon(create, servers[n % 2], n)
    assert len(set(ids)) == 1
    assert await sql(replicas.url, "SELECT count(*) FROM trioworker_task_runs") == [(1,)]


async def test_runs_of_one_cache_key_on_two_servers_run_the_function_once(replicas: Replicas) -> None:
    _, a = await replicas.start()
    _, b = await replicas.start()
    async with (
        httpx.AsyncClient(base_url=a.api_url, timeout=DEADLINE) as api_a,
        httpx.AsyncClient(base_url=b.api_url, timeout=DEADLINE) as api_b,
    ):
        ids: list[str] = []
        async with trio.open_nursery() as nursery:
            for n in range(10):

                async def create(api: httpx.AsyncClient) -> None:
                    ids.extend(await submit(api, "r.block", {}, cache_key="once"))

                nursery.start_soon(create, (api_a, api_b)[n % 2])
        listed = (await api_a.get("/task_runs", params={"limit": 100})).json()
        computing = [run["id"] for run in listed if "cache_owner" not in run["state"]["state_details"]]
        assert len(computing) == 1 and sorted(run["id"] for run in listed) == sorted(ids)
        async with worker(a, block), worker(b, block):
            with trio.fail_after(DEADLINE):
                await record.started.wait()
            # It completes through a; the runs created through b wait on b's side.
            done = {"state": {"type": "COMPLETED", "data": "made once"}, "force": True}
            assert (await api_a.post(f"/task_runs/{computing[0]}/set_state", json=done)).status_code == 200
            runs = await wait_all(api_b, ids, seconds=DEADLINE)
        assert {run["state"]["data"] for run in runs} == {"made once"}
        assert sorted(run["state"]["name"] for run in runs) == ["Cached"] * 9 + ["Completed"]


async def test_many_runs_on_two_servers_each_run_once(replicas: Replicas) -> None:
    _, a = await replicas.start()
    _, b = await replicas.start()
    texts = [str(n) for n in range(300)]
    async with (
        httpx.AsyncClient(base_url=a.api_url, timeout=DEADLINE) as api_a,
        httpx.AsyncClient(base_url=b.api_url, timeout=DEADLINE) as api_b,
        worker(a, echo, limit=5) as on_a,
        worker(b, echo, limit=5) as on_b,
    ):
        ids = await submit(api_a, "r.echo", *({"text": t} for t in texts[:150]))
        ids += await submit(api_b, "r.echo", *({"text": t} for t in texts[150:]))
        runs = await wait_all(api_b, ids, seconds=DEADLINE)
    assert all(run["state"]["type"] == "COMPLETED" for run in runs)
    assert sorted(record.ran) == sorted(texts)  # each once
    assert on_a.finished_task_runs["r.echo"] + on_b.finished_task_runs["r.echo"] == len(texts)
    assert min(on_a.finished_task_runs["r.echo"], on_b.finished_task_runs["r.echo"]) > 0


@asynccontextmanager
async def tab(server: RunningServer) -> AsyncIterator[WebSocketConnection]:
    """A dashboard tab's live feed on ``server``, authenticated (no message read yet)."""
    async with connect(server, protocol.API_PREFIX + protocol.EVENTS_PATH) as ws:
        await ws.send_message('{"type": "auth", "token": null}')
        assert await ws.get_message() == '{"type":"auth_success"}'
        yield ws


async def pushed_overview(ws: WebSocketConnection, shows: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first overview the feed pushes that ``shows`` what the test waits for."""
    with trio.fail_after(DEADLINE):
        while True:
            message = orjson.loads(await ws.get_message())
            if message["type"] == "overview" and shows(message["overview"]):
                overview: dict[str, Any] = message["overview"]
                return overview


def clients(workers: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(client id, server id)`` of each worker listed."""
    return [(w["client_id"], w["server"]) for w in workers]


async def test_any_server_lists_every_server_and_the_workers_of_each(replicas: Replicas) -> None:
    _, a = await replicas.start()
    _, b = await replicas.start()
    a_id, b_id = str(a.service.server_id), str(b.service.server_id)
    async with (
        httpx.AsyncClient(base_url=a.api_url, timeout=DEADLINE) as api_a,
        tab(a) as feed,
        worker(a, echo, client_id="on-a", limit=2),
        worker(b, block, client_id="on-b", limit=3),
    ):
        [run_id] = await submit(api_a, "r.block", {})  # runs on b's worker
        with trio.fail_after(DEADLINE):
            await record.started.wait()

        def on_b_holds_it(overview: dict[str, Any]) -> bool:  # once b's heartbeat said so
            return any(w["client_id"] == "on-b" and w["runs_in_flight"] == 1 for w in overview["workers"])

        overview = await pushed_overview(feed, on_b_holds_it)
        assert clients(overview["workers"]) == [("on-a", a_id), ("on-b", b_id)]  # longest connected first
        [on_a, on_b] = overview["workers"]
        assert (on_b["task_keys"], on_b["limit"], on_b["runs_in_flight"]) == (["r.block"], 3, 1)
        assert (on_a["task_keys"], on_a["limit"], on_a["runs_in_flight"]) == (["r.echo"], 2, 0)
        servers = overview["servers"]
        assert [(s["id"], s["url"], s["answering"], s["workers"], s["store"]) for s in servers] == [
            (a_id, a.url, True, 1, "postgresql"),
            (b_id, b.url, False, 1, "postgresql"),
        ]
        assert all(s["version"] == trioworker.__version__ and s["heartbeat"] for s in servers)
        by_key = {k["task_key"]: k["workers"] for k in overview["task_keys"]}
        assert (by_key["r.block"], by_key["r.echo"]) == (1, 1)
        assert (await api_a.get("/overview")).json()["servers"][1]["id"] == b_id

        listed = (await api_a.get("/task_workers")).json()
        assert listed == overview["workers"]
        assert clients((await api_a.get("/task_workers", params={"task_key": "r.block"})).json()) == [
            ("on-b", b_id)
        ]
        assert clients((await api_a.get("/task_workers", params={"task_key": "r.echo"})).json()) == [
            ("on-a", a_id)
        ]

        cli = make_cli(a.url)
        as_json = await cli("workers", "--api-url", a.url, "--json")
        assert as_json.returncode == 0, as_json.stderr
        assert clients(json.loads(as_json.stdout)) == [("on-a", a_id), ("on-b", b_id)]
        table = await cli("workers", "--api-url", a.url)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.decode().splitlines()
        [row_a] = [line for line in lines if "on-a" in line]
        [row_b] = [line for line in lines if "on-b" in line]
        assert (a_id[:8] in row_a, b_id[:8] in row_b) == (True, True)  # the server each is connected to
        assert lines[-1] == "2 workers on 2 servers"

        assert (await api_a.post(f"/task_runs/{run_id}/cancel")).status_code == 200
        with trio.fail_after(DEADLINE):
            await record.stopped.wait()


async def test_a_server_that_died_is_listed_no_more_after_its_timeout(replicas: Replicas) -> None:
    _, a = await replicas.start()
    dying, b = await replicas.start(replica_timeout=4.0)  # a heartbeat every second
    b_id = str(b.service.server_id)
    async with httpx.AsyncClient(base_url=a.api_url, timeout=DEADLINE) as api_a, tab(a) as feed:
        async with subscribe(b, ["k"], client_id="on-b"):
            await pushed_overview(feed, lambda overview: clients(overview["workers"]) == [("on-b", b_id)])
            await dying.stop()  # as a crash would: b's row stays, with its worker
        # Until its timeout (4 s) has passed since its last heartbeat, it is listed still.
        await sql(replicas.url, "UPDATE trioworker_replicas SET heartbeat_at = now() WHERE id = %s", (b_id,))
        assert clients((await api_a.get("/task_workers")).json()) == [("on-b", b_id)]
        assert len((await api_a.get("/overview")).json()["servers"]) == 2
        overview = await pushed_overview(feed, lambda overview: len(overview["servers"]) == 1)
        assert overview["workers"] == []
        assert [s["id"] for s in overview["servers"]] == [str(a.service.server_id)]
        assert (await api_a.get("/task_workers")).json() == []


# ------------------------------------------------------------------ servers that die, or lose the database


#: The history of a run handed back once (its server died, or its worker left), then run by another worker.
HANDED_BACK = ["Scheduled", "Pending", "Running", "Redelivered", "Pending", "Running", "Completed"]


async def replica_rows(url: str) -> int:
    [(count,)] = await sql(url, "SELECT count(*) FROM trioworker_replicas")
    return int(count)


@attrs.frozen
class Death:
    """Servers ``a`` and ``b`` on one database; a worker ``"w"`` ran the run ``run_id``
    through ``a``, then ``a`` lost its database and died (leaving its row and its lease)."""

    a: RunningServer
    b: RunningServer
    api_b: httpx.AsyncClient
    run_id: str


@asynccontextmanager
async def a_server_died_with_a_run(replicas: Replicas) -> AsyncIterator[Death]:
    async with outage_proxy(port_of(replicas.url)) as proxy:
        dying, a = await replicas.start(db=through(proxy, replicas.url), replica_timeout=1)
        _, b = await replicas.start(replica_timeout=1)
        async with httpx.AsyncClient(base_url=b.api_url, timeout=DEADLINE) as api_b:
            [run_id] = await submit(api_b, "k", {})
            async with subscribe(a, ["k"], credit=1, client_id="w") as on_a:
                assert [r["id"] for r in await on_a.runs()] == [run_id]
                await on_a.report([run_id], "RUNNING")
                proxy.refusing = True  # a loses its database, then dies: nothing is handed back
                proxy.drop()
                await dying.stop()
            assert await leases(replicas.url, [uuid.UUID(run_id)]) == [("RUNNING", "w", a.service.replica_id)]
            yield Death(a, b, api_b, run_id)


async def test_the_runs_of_a_server_that_died_run_elsewhere_after_its_timeout(replicas: Replicas) -> None:
    async with a_server_died_with_a_run(replicas) as death:
        died = time.monotonic()
        async with subscribe(death.b, ["k"], credit=1, client_id="x") as on_b:
            [again] = await on_b.runs()
            waited = time.monotonic() - died
            assert (again["id"], again["delivery_count"]) == (death.run_id, 2)
            await on_b.finish([death.run_id])
        assert waited < 5  # a's timeout (1 s), then b's next heartbeat (every 1.25 s)
        names = [name for _, name in await history(death.api_b, death.run_id)]
        assert names == HANDED_BACK
    assert await replica_rows(replicas.url) == 1  # a's row went with its runs


async def test_a_worker_that_reaches_another_server_before_the_timeout_keeps_its_run(
    replicas: Replicas,
) -> None:
    async with a_server_died_with_a_run(replicas) as death:
        run_id, b = death.run_id, death.b
        # The worker fails over to b at once, with the run it still works on.
        async with subscribe(b, ["k"], credit=1, client_id="w", held=[run_id]) as back:
            [again] = await back.report([run_id], "RUNNING")  # a repeat: its run, through b now
            assert again["status"] == "ACCEPT"
            assert await leases(replicas.url, [uuid.UUID(run_id)]) == [("RUNNING", "w", b.service.replica_id)]
            # b finds a dead (now, rather than in a second) ...
            assert death.a.service.replica_id is not None and isinstance(b.service.store, SharedStore)
            await declare_dead(replicas.url, death.a.service.replica_id)
            await b.service.store.heartbeat(max_deliveries=5, workers=[])
            assert await replica_rows(replicas.url) == 1
            # ... and leaves the run alone: the next run of the key goes to another worker first.
            async with subscribe(b, ["k"], credit=1, client_id="x") as other:
                [next_id] = await submit(death.api_b, "k", {})
                assert [r["id"] for r in await other.runs()] == [next_id]
                await other.finish([next_id])
            [done] = await back.report([run_id], "COMPLETED")
            assert done["status"] == "ACCEPT"
        names = [name for _, name in await history(death.api_b, run_id)]
        assert names == ["Scheduled", "Pending", "Running", "Completed"]  # delivered once


async def test_a_server_that_cannot_heartbeat_closes_its_sockets_until_it_can(
    replicas: Replicas, postgres_url: str
) -> None:
    async with outage_proxy(port_of(postgres_url)) as proxy:
        _, a = await replicas.start(db=through(proxy, postgres_url), replica_timeout=1)
        async with httpx.AsyncClient(base_url=a.api_url, timeout=DEADLINE) as api:
            async with subscribe(a, ["k"], credit=1) as sub, connect_channel(a) as channel:
                proxy.refusing = True
                proxy.drop()
                cut = time.monotonic()
                for ws in (sub.ws, channel):
                    with trio.fail_after(DEADLINE), pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
                    assert closed.value.reason is not None
                    assert (closed.value.reason.code, closed.value.reason.reason) == (
                        1012,
                        "the server cannot reach its database",
                    )
                assert time.monotonic() - cut < 1.5  # within the timeout (1 s) of its last heartbeat
            response = await api.get("/health")
            assert response.status_code == 503
            assert response.json()["detail"] == "the server cannot reach its database; use another server"
            async with connect(a) as refused:
                with trio.fail_after(DEADLINE), pytest.raises(ConnectionClosed) as closed:
                    await refused.get_message()
                assert closed.value.reason is not None and closed.value.reason.code == 1012

            proxy.refusing = False
            with trio.fail_after(DEADLINE):
                await a.service.fence.wait_lowered()
            assert (await api.get("/health")).status_code == 200
            [run_id] = await submit(api, "k", {})
            async with subscribe(a, ["k"], credit=1) as sub:
                assert [r["id"] for r in await sub.runs()] == [run_id]


async def test_a_server_that_lost_its_connections_catches_up(replicas: Replicas, postgres_url: str) -> None:
    async with outage_proxy(port_of(postgres_url)) as proxy:
        _, a = await replicas.start()
        _, b = await replicas.start(db=through(proxy, postgres_url), replica_timeout=30)
        async with httpx.AsyncClient(base_url=a.api_url, timeout=DEADLINE) as api_a:
            [held] = await submit(api_a, "k", {})
            async with subscribe(b, ["k"], credit=2, client_id="w") as on_b:
                assert [r["id"] for r in await on_b.runs()] == [held]
                await on_b.report([held], "RUNNING")
                proxy.refusing = True  # as a database restart would, for b only
                proxy.drop()
                # Meanwhile, through a: the held run is cancelled, another is queued. b hears nothing.
                assert (await api_a.post(f"/task_runs/{held}/cancel")).status_code == 200
                [queued] = await submit(api_a, "k", {})
                proxy.refusing = False
                # b's listener connects again and reads what it missed: its socket kept open.
                seen: list[dict[str, Any]] = []
                with trio.fail_after(DEADLINE):
                    while {m["type"] for m in seen} < {"cancel", "task_runs"}:
                        seen.append(await on_b.receive())
                by_type = {m["type"]: m for m in seen}
                assert by_type["cancel"]["ids"] == [held]
                assert [r["id"] for r in by_type["task_runs"]["task_runs"]] == [queued]
                [answer] = await on_b.report([held], "CANCELLED")
                assert answer["status"] == "ACCEPT"  # a repeat of the state it has
                await on_b.finish([queued])


async def test_the_runs_of_a_worker_that_left_while_the_database_was_away_go_back_once_it_is_back(
    replicas: Replicas, postgres_url: str, logs: LogEvents
) -> None:
    async with outage_proxy(port_of(postgres_url)) as proxy:
        _, a = await replicas.start(db=through(proxy, postgres_url), replica_timeout=2)
        _, b = await replicas.start(replica_timeout=30)
        async with httpx.AsyncClient(base_url=b.api_url, timeout=DEADLINE) as api_b:
            [run_id] = await submit(api_b, "k", {})
            async with subscribe(a, ["k"], credit=1, client_id="w") as on_a:
                assert [r["id"] for r in await on_a.runs()] == [run_id]
                await on_a.report([run_id], "RUNNING")
                proxy.refusing = True
                proxy.drop()
            # The worker is gone for good; a cannot hand its run back yet ...
            await logs.wait_for("1 run\\(s\\) of w not handed back yet .*cannot connect to PostgreSQL")
            proxy.refusing = False
            # ... and does after its next heartbeat (every 0.5 s): the run goes to another worker.
            async with subscribe(b, ["k"], credit=1, client_id="x") as on_b:
                [again] = await on_b.runs()
                assert (again["id"], again["delivery_count"]) == (run_id, 2)
                await on_b.finish([run_id])
            names = [name for _, name in await history(api_b, run_id)]
            assert names == HANDED_BACK


# --------------------------------------------------------------------------- schedules


async def test_servers_firing_one_schedule_at_once_make_one_run(postgres_url: str) -> None:
    async with server_store(postgres_url) as (a, a_id), server_store(postgres_url) as (b, _):
        listener = b.listener()
        await listener.connect()
        try:
            start = datetime(2030, 1, 1, 9, 30, tzinfo=UTC)
            create = checked(ScheduleCreate(name="s", task_key="k", interval=60))
            await a.upsert_schedule(create, start)
            heard = await listener.receive()
            assert heard == [Notice(a_id, (), (), schedules=True)]  # b's timer wakes
            tick = start.timestamp() + 60  # 9:31, the first tick
            fired: list[Fired] = []

            async def fire(store: PostgresStore) -> None:
                fired.append(await store.fire_schedules(tick + 0.5))

            for _ in range(5):  # each time both at once
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(fire, a)
                    nursery.start_soon(fire, b)
                tick += 60
            runs = await a.list_runs(task_key="k", limit=100)
            assert len(runs) == 5 == sum(len(f.runs) for f in fired)
            assert len({run.idempotency_key for run in runs}) == 5
            [schedule] = await b.read_schedules()
            assert schedule.last_run_id == runs[-1].id
        finally:
            listener.close()


@task(key="r.tick")
async def tick() -> None:
    record.ran.append(str(trioworker.current_run()))
    record.started.set()


async def test_two_servers_make_one_run_per_tick_and_either_fires_alone(
    postgres_url: str, trioworker_autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        servers: list[tuple[ServerControl, RunningServer]] = []
        for _ in range(2):
            config = ServerConfig(db_path=postgres_url, port=0, clock=trio_anchored_clock())
            control = ServerControl(nursery, config)
            servers.append((control, await control.start()))
        (control_a, a), (_, b) = servers

        async def ticks(n: int) -> None:
            with trio.fail_after(3600):
                while len(record.ran) < n:
                    record.started = trio.Event()
                    await record.started.wait()

        async with worker(b, tick), httpx.AsyncClient(base_url=a.api_url, timeout=DEADLINE) as api_a:
            body = {"name": "minutely", "task_key": "r.tick", "interval": 60}
            trioworker_autojump_clock.autojump_threshold = math.inf  # a slow answer is no timeout
            assert (await api_a.post("/schedules", json=body)).status_code == 201
            trioworker_autojump_clock.autojump_threshold = AUTOJUMP_THRESHOLD
            await ticks(3)
            await control_a.stop()  # the server it was registered through: b fires on alone
            await ticks(6)
            trioworker_autojump_clock.autojump_threshold = math.inf  # no tick more
        async with httpx.AsyncClient(base_url=b.api_url, timeout=DEADLINE) as api_b:
            runs = (await api_b.get("/task_runs", params={"task_key": "r.tick"})).json()
        keys = [run["idempotency_key"] for run in runs]
        assert len(runs) >= 6 and len(set(keys)) == len(keys)  # one run per tick
        minutes = [datetime.fromisoformat(key.rsplit("/", 1)[1]) for key in keys]
        assert [b - a for a, b in itertools.pairwise(minutes)] == [timedelta(minutes=1)] * (len(minutes) - 1)
        nursery.cancel_scope.cancel()


@task(key="r.spawn")
async def spawn() -> None:
    """Submits a child (a run of ``block``, which a worker of another server takes), then waits."""
    await block.delay()
    await trio.sleep_forever()


async def test_a_cancel_through_one_server_reaches_the_children_held_through_another(
    replicas: Replicas,
) -> None:
    _, a = await replicas.start()
    _, b = await replicas.start()
    async with worker(a, spawn), worker(b, block), trioworker.connect(a.api_url) as client:
        parent = await spawn.delay()
        with trio.fail_after(DEADLINE):
            await record.started.wait()
            answer = await client.cancel(parent.task_run_id)  # decided by a, in the database
            await record.stopped.wait()  # b heard of it and told its worker
        [child_id] = answer.cancelled_descendants
        async with httpx.AsyncClient(base_url=b.api_url, timeout=DEADLINE) as api_b:
            child_run = (await api_b.get(f"/task_runs/{child_id}")).json()
        assert child_run["state"]["type"] == "CANCELLED"
        assert child_run["parent_task_run_id"] == str(parent.task_run_id)

        # A run group cancelled through a (its block was cancelled): its run on b's worker stops.
        record.reset()
        with trio.fail_after(DEADLINE):
            with trio.CancelScope() as scope:
                async with trioworker.open_run_group() as group:
                    grouped = await block.delay()
                    await record.started.wait()
                    scope.cancel()
            await record.stopped.wait()
        [ended] = await client.read_task_runs(group_id=group.id)
        assert ended.id == grouped.task_run_id and ended.state.type is StateType.CANCELLED
