"""Several servers (replicas) on one PostgreSQL database.

The store's part, with two or three stores on one database, each registered as a
server: leases held by (server, client), the reaper, claims from the ready table, notices.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import pytest
import trio

from trioworker.models import SetStateRequest, SetStateStatus, StateType, TaskRunCreate, make_state
from trioworker.server.store.base import LEASED_ELSEWHERE, Notice
from trioworker.server.store.postgres import NOTICE_BYTES, PostgresStore, decode_notice, encode_notices

from .test_postgres import sql

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
            beats.append(await store.heartbeat(max_deliveries=5))

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
        assert not (await dead.heartbeat(max_deliveries=5)).alive
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
            beat = await live.heartbeat(max_deliveries=2)
            expected = StateType.SCHEDULED if attempt == 0 else StateType.CRASHED
            assert [(o.id, o.state_type) for o in beat.reaped] == [(run.id, expected)]
        [crashed] = await live.read_runs([run.id])
        assert crashed.state.message == "delivered 2 times without finishing"


async def test_runs_held_through_no_live_server_are_handed_back(postgres_url: str) -> None:
    async with server_store(postgres_url) as (a, _), server_store(postgres_url) as (b, _):
        created = await a.create_runs([TaskRunCreate(task_key="k") for _ in range(2)])
        await b.claim_ready(["k"], 2, "w", time.time())
        await b.unregister_replica()  # b stopped, and what it held was not handed back
        beat = await a.heartbeat(max_deliveries=5)
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
