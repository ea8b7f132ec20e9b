"""The PostgreSQL store on its own: its schema, two stores on one database, the SQL that
decides (conditional writes, the ready table, skipped locks), and the database restarting
or going away. What every store does is tested in ``test_store_contract.py``; the
end-to-end modules marked ``every_store`` run on it too."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import psycopg
import pytest
import trio
from psycopg.conninfo import conninfo_to_dict

from trioworker.models import (
    ScheduleCreate,
    SetStateRequest,
    StateType,
    TaskRun,
    TaskRunCreate,
    make_state,
    utcnow,
)
from trioworker.server.store import DatabaseInUse, LiveServer, StoreError
from trioworker.server.store import postgres as postgres_store
from trioworker.server.store.postgres import _SERVER_LOCK, SCHEMA_VERSION, PostgresStore, PostgresTarget
from trioworker.testing import ServerControl

from .fakes import OutageProxy, outage_proxy
from .helpers import LogEvents, submit
from .postgres import (
    PASSWORD_ROLE,
    Unavailable,
    binaries,
    fresh_schema,
    throwaway_cluster,
    unavailable,
    with_params,
)
from .raw import subscribe
from .test_cli import read_until, refused, server_command

DEADLINE = 30
TABLES = {
    "trioworker_schema",
    "trioworker_task_runs",
    "trioworker_ready",
    "trioworker_task_run_states",
    "trioworker_replicas",
    "trioworker_task_run_tags",
    "trioworker_cache",
    "trioworker_schedules",
    "trioworker_task_run_groups",
}

#: Undoes schema step 7 (a database of schema 6).
SCHEMA_7_UNDONE = (
    "DROP TABLE trioworker_task_run_groups",
    "DROP INDEX trioworker_task_runs_group",
    "ALTER TABLE trioworker_task_runs DROP COLUMN group_id",
    "ALTER TABLE trioworker_task_runs DROP COLUMN detached",
)
#: Undoes schema steps 7 and 6 (a database of schema 5).
SCHEMA_6_UNDONE = (*SCHEMA_7_UNDONE, "DROP TABLE trioworker_schedules")
#: Undoes schema steps 7 to 5 (a database of schema 4).
SCHEMA_5_UNDONE = (*SCHEMA_6_UNDONE, "DROP TABLE trioworker_task_run_tags", "DROP TABLE trioworker_cache")
#: Undoes schema steps 7 to 4 (a database of schema 3).
SCHEMA_4_UNDONE = (
    *SCHEMA_5_UNDONE,
    "ALTER TABLE trioworker_replicas DROP COLUMN version, DROP COLUMN workers",
)
#: Undoes schema steps 7 to 3 (a database of schema 2).
SCHEMA_3_UNDONE = (
    *SCHEMA_4_UNDONE,
    "DROP TABLE trioworker_replicas",
    "ALTER TABLE trioworker_ready DROP COLUMN waiting",
)


async def sql(url: str, query: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of its own (in a thread); its rows."""

    def run() -> list[tuple[Any, ...]]:
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    return await trio.to_thread.run_sync(run)


def cancel() -> SetStateRequest:
    return SetStateRequest(make_state(StateType.CANCELLED))


def port_of(url: str) -> int:
    return int(conninfo_to_dict(url).get("port") or 5432)


def through(proxy: OutageProxy, url: str) -> str:
    """``url``, reached through ``proxy``."""
    return with_params(url, host="127.0.0.1", port=str(proxy.port))


# --------------------------------------------------------------------------- schema


async def test_the_schema_is_created_versioned_and_a_newer_one_refused(postgres_url: str) -> None:
    async with PostgresStore.open(postgres_url):
        pass
    tables = await sql(postgres_url, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    assert {name for (name,) in tables} == TABLES
    assert await sql(postgres_url, "SELECT version FROM trioworker_schema") == [(SCHEMA_VERSION,)]
    async with PostgresStore.open(postgres_url):  # opening it again changes nothing
        pass
    assert await sql(postgres_url, "SELECT version FROM trioworker_schema") == [(SCHEMA_VERSION,)]
    await sql(postgres_url, "UPDATE trioworker_schema SET version = 99")
    with pytest.raises(
        StoreError, match=f"schema version 99, newer than this trioworker knows \\({SCHEMA_VERSION}\\)"
    ):
        async with PostgresStore.open(postgres_url):
            pytest.fail("opened a schema from a newer trioworker")


async def test_servers_starting_together_create_the_schema_once(postgres_url: str) -> None:
    async def start() -> None:
        async with PostgresStore.open(postgres_url, exclusive=False) as store:
            await store.create_runs([TaskRunCreate(task_key="k")])

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(start)
    assert await sql(postgres_url, "SELECT version FROM trioworker_schema") == [(SCHEMA_VERSION,)]
    assert await sql(postgres_url, "SELECT count(*) FROM trioworker_task_runs") == [(4,)]


async def test_a_search_path_without_a_schema_is_a_clear_error(postgres_url: str) -> None:
    nowhere = with_params(postgres_url, options="-csearch_path=no_such_schema")
    with pytest.raises(StoreError, match="search_path names no schema that exists"):
        async with PostgresStore.open(nowhere):
            pytest.fail("opened a database with nowhere to create tables")


async def test_a_schema_1_database_is_migrated_and_keeps_its_runs(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with PostgresStore.open(postgres_url) as store:
        [(parent, _)] = await store.create_runs([TaskRunCreate(task_key="p")])
        created = await store.create_runs(
            [
                TaskRunCreate(task_key="c", parent_task_run_id=parent.id),
                TaskRunCreate(task_key="c", parameters={"text": '"parent_task_run_id":"'}),
                TaskRunCreate(task_key="c", parent_task_run_id=parent.id),
            ]
        )
        first, plain, second = (run.id for run, _ in created)
        nul = SetStateRequest(make_state(StateType.CANCELLED, message='nul \x00 "parent_task_run_id":"x"'))
        [ended] = await store.set_states([(plain, nul)], now=0.0)
        assert ended.run is not None
    for statement in (  # back to schema 1
        *SCHEMA_3_UNDONE,
        "DROP INDEX trioworker_task_runs_parent",
        "DROP INDEX trioworker_task_run_states_ended",
        "DROP INDEX trioworker_task_runs_counts",
        "ALTER TABLE trioworker_task_runs DROP COLUMN parent_id",
        "UPDATE trioworker_schema SET version = 1",
    ):
        await sql(postgres_url, statement)
    monkeypatch.setattr(postgres_store, "_FILL_BATCH", 1)  # a batch per run with a parent
    async with PostgresStore.open(postgres_url) as store:
        assert [r.id for r in await store.list_runs(parent_task_run_id=parent.id)] == [first, second]
        assert await store.read_run(plain) == ended.run
        assert [(c.task_key, c.count) for c in await store.count_ended(ended.run.state.timestamp)] == [
            ("c", 1)
        ]
    assert await sql(postgres_url, "SELECT version FROM trioworker_schema") == [(SCHEMA_VERSION,)]
    indexes = await sql(postgres_url, "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")
    assert {
        "trioworker_task_runs_parent",
        "trioworker_task_run_states_ended",
        "trioworker_task_runs_counts",
    } <= {name for (name,) in indexes}


async def test_a_schema_2_database_is_migrated_and_its_runs_that_wait_still_wait(postgres_url: str) -> None:
    async with PostgresStore.open(postgres_url) as store:
        [(upstream, _)] = await store.create_runs([TaskRunCreate(task_key="u")])
        [(waiting, _)] = await store.create_runs([TaskRunCreate(task_key="w", wait_for=[upstream.id])])
    for statement in (
        *SCHEMA_3_UNDONE,
        "UPDATE trioworker_schema SET version = 2",
    ):
        await sql(postgres_url, statement)
    async with PostgresStore.open(postgres_url) as store:
        assert [q.id for q in await store.recover(5) if q.wait_for] == [waiting.id]
        claimed = await store.claim_ready(["w"], 10, "worker", time.time())
        assert claimed.runs == []  # it waits for its upstream, as before the migration
        assert await store.read_run(waiting.id) == waiting
    assert await sql(postgres_url, "SELECT version FROM trioworker_schema") == [(SCHEMA_VERSION,)]


async def test_a_schema_3_database_is_migrated_and_keeps_the_rows_of_its_servers(postgres_url: str) -> None:
    server = uuid.uuid4()
    async with PostgresStore.open(postgres_url, exclusive=False) as store:
        await store.register_replica(server, 60, "http://a:4300")
        [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
    for statement in (
        *SCHEMA_4_UNDONE,
        "UPDATE trioworker_schema SET version = 3",
    ):
        await sql(postgres_url, statement)
    async with PostgresStore.open(postgres_url, exclusive=False) as store:
        here = LiveServer(uuid.uuid4(), "here", utcnow(), None, None, [])
        [_, other] = await store.live_servers(here)
        # A row a server of schema 3 wrote: no version, no workers, until it heartbeats again.
        assert (other.id, other.url, other.version, other.workers) == (server, "http://a:4300", "unknown", [])
        assert await store.read_run(run.id) == run
    assert await sql(postgres_url, "SELECT version FROM trioworker_schema") == [(SCHEMA_VERSION,)]


async def test_a_schema_3_database_is_migrated_and_its_runs_are_found_by_tag(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with PostgresStore.open(postgres_url) as store:
        created = await store.create_runs(
            [
                TaskRunCreate(task_key="k", tags=["a", "b"]),
                TaskRunCreate(task_key="k", parameters={"text": '"tags":["a"]'}),
                TaskRunCreate(task_key="k", tags=["b"]),
            ]
        )
        both, none, only_b = (run.id for run, _ in created)
    for statement in (
        *SCHEMA_4_UNDONE,
        "UPDATE trioworker_schema SET version = 3",
    ):
        await sql(postgres_url, statement)
    monkeypatch.setattr(postgres_store, "_FILL_BATCH", 1)  # a batch per tagged run
    async with PostgresStore.open(postgres_url) as store:
        assert [r.id for r in await store.list_runs(tags=["a"])] == [both]
        assert [r.id for r in await store.list_runs(tags=["b"])] == [both, only_b]
        assert [r.id for r in await store.list_runs(tags=["b", "a"])] == [both]
        assert none not in {r.id for r in await store.list_runs(tags=["a"])}
    assert await sql(postgres_url, "SELECT version FROM trioworker_schema") == [(SCHEMA_VERSION,)]


async def test_two_servers_creating_runs_of_one_cache_key_at_once_let_one_compute_it(
    postgres_url: str,
) -> None:
    created: list[TaskRun] = []

    async def create(store: PostgresStore) -> None:
        for _ in range(10):
            results = await store.create_runs([TaskRunCreate(task_key="k", cache_key="c")], now=time.time())
            created.extend(run for run, _ in results)

    async with (
        PostgresStore.open(postgres_url, exclusive=False) as a,
        PostgresStore.open(postgres_url, exclusive=False) as b,
        trio.open_nursery() as nursery,
    ):
        for store in (a, b, a, b, a, b):
            nursery.start_soon(create, store)
    computing = [run for run in created if run.state.state_details.cache_owner is None]
    assert len(created) == 60 and len(computing) == 1
    assert {run.state.state_details.cache_owner for run in created} == {None, computing[0].id}
    assert await sql(postgres_url, "SELECT run_id FROM trioworker_cache") == [(computing[0].id,)]


async def test_a_schema_6_database_is_migrated_and_its_runs_cancel_their_children(postgres_url: str) -> None:
    async with PostgresStore.open(postgres_url) as store:
        [(parent, _)] = await store.create_runs([TaskRunCreate(task_key="p")])
        [(child, _)] = await store.create_runs([TaskRunCreate(task_key="c", parent_task_run_id=parent.id)])
    for statement in (*SCHEMA_7_UNDONE, "UPDATE trioworker_schema SET version = 6"):
        await sql(postgres_url, statement)
    async with PostgresStore.open(postgres_url) as store:
        assert await store.read_run(child.id) == child
        [change] = await store.set_states([(parent.id, cancel())], now=0.0)
        assert [d.run.id for d in change.descendants if d.run] == [child.id]
        [(grouped, _)] = await store.create_runs([TaskRunCreate(task_key="g", group_id=uuid.uuid4())])
        assert [r.id for r in await store.list_runs(group_id=grouped.group_id)] == [grouped.id]
    assert await sql(postgres_url, "SELECT version FROM trioworker_schema") == [(SCHEMA_VERSION,)]


def test_the_location_never_shows_the_password() -> None:
    target = PostgresTarget.parse("postgresql://queue:s3cret@db.example:6543/runs?sslmode=require")
    assert target.location == "postgresql://queue@db.example:6543/runs"
    assert target.described == "PostgreSQL at db.example:6543 (database 'runs', user 'queue')"
    assert "s3cret" not in repr(target)
    assert PostgresTarget.parse("postgres://h/db").location.endswith("@h:5432/db")
    with pytest.raises(ValueError, match=r"^not a PostgreSQL URL"):
        PostgresTarget.parse("mysql://h/db")


# --------------------------------------------------------------------------- two stores, one database


async def test_one_server_per_database(postgres_url: str, postgres_session: str) -> None:
    async with PostgresStore.open(postgres_url) as first:
        [(run, _)] = await first.create_runs([TaskRunCreate(task_key="k")])
        with pytest.raises(
            DatabaseInUse, match=r"^the database postgresql://.* is in use by another trioworker"
        ):
            async with PostgresStore.open(postgres_url):
                pytest.fail("opened a database another server has")
        with fresh_schema(postgres_session) as other_schema:
            async with PostgresStore.open(other_schema):  # the lock is the schema's
                pass
        assert await first.read_run(run.id) == run  # the first goes on
    async with PostgresStore.open(postgres_url) as again:  # closed: the lock went with it
        assert await again.read_run(run.id) == run


async def test_two_stores_make_one_run_per_idempotency_key(postgres_url: str) -> None:
    results: list[tuple[uuid.UUID, bool]] = []
    async with (
        PostgresStore.open(postgres_url, exclusive=False) as a,
        PostgresStore.open(postgres_url, exclusive=False) as b,
    ):

        async def create(store: PostgresStore, i: int) -> None:
            [(run, queued)] = await store.create_runs(
                [TaskRunCreate(task_key="k", idempotency_key="once", parameters={"i": i})]
            )
            results.append((run.id, queued is not None))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(create, a if i % 2 else b, i)
        assert len({run_id for run_id, _ in results}) == 1
        assert [new for _, new in results].count(True) == 1
        assert len(await a.list_runs()) == len(await b.list_runs()) == 1


async def test_two_stores_claim_each_run_once(postgres_url: str) -> None:
    async with (
        PostgresStore.open(postgres_url, exclusive=False) as a,
        PostgresStore.open(postgres_url, exclusive=False) as b,
    ):
        created = await a.create_runs([TaskRunCreate(task_key="k") for _ in range(300)])
        ids = [run.id for run, _ in created]
        claimed: dict[str, list[uuid.UUID]] = {"a": [], "b": []}

        async def claim(store: PostgresStore, name: str, chunk: list[uuid.UUID]) -> None:
            claimed[name] += [run.id for run in await store.claim_runs(chunk, name)]

        async with trio.open_nursery() as nursery:
            for start in range(0, 300, 30):
                chunk = ids[start : start + 60]  # overlapping: every run is asked for twice
                nursery.start_soon(claim, a, "a", chunk)
                nursery.start_soon(claim, b, "b", chunk[::-1])
        assert sorted(claimed["a"] + claimed["b"]) == sorted(ids)  # each once, none lost
        runs = await b.read_runs(ids)
        holders = {run.id: run.state.state_details.client_id for run in runs}
        assert {run_id: "a" for run_id in claimed["a"]} | {run_id: "b" for run_id in claimed["b"]} == holders


async def test_a_run_another_transaction_is_claiming_is_skipped_not_waited_for(postgres_url: str) -> None:
    async with PostgresStore.open(postgres_url) as store:
        [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
        other = await trio.to_thread.run_sync(partial(psycopg.connect, postgres_url))
        try:
            locked = "SELECT run_id FROM trioworker_ready WHERE run_id = %s FOR UPDATE"
            rows = await trio.to_thread.run_sync(lambda: other.execute(locked, (run.id,)).fetchall())
            assert rows == [(run.id,)]
            with trio.fail_after(DEADLINE):
                assert await store.claim_runs([run.id], "c") == []
            await trio.to_thread.run_sync(other.rollback)
            [claimed] = await store.claim_runs([run.id], "c")
            assert claimed.state.type is StateType.PENDING
        finally:
            await trio.to_thread.run_sync(other.close)


async def test_the_ready_table_holds_the_scheduled_runs_and_numbers_each_queueing(postgres_url: str) -> None:
    async def ready() -> dict[uuid.UUID, int]:
        return dict(await sql(postgres_url, "SELECT run_id, queued_seq FROM trioworker_ready"))

    async with PostgresStore.open(postgres_url) as store:
        created = await store.create_runs([TaskRunCreate(task_key="k") for _ in range(4)])
        held, cancelled, deleted, waiting = (run.id for run, _ in created)
        first = await ready()
        assert set(first) == {held, cancelled, deleted, waiting}
        await store.claim_runs([held], "c")
        await store.set_states([(cancelled, cancel())], now=time.time())
        await store.delete_run(deleted)
        assert set(await ready()) == {waiting}
        await store.requeue([held], reason="redelivery", max_deliveries=5)
        again = await ready()
        assert set(again) == {waiting, held}
        assert again[held] > max(first.values())  # queued again: numbered after every earlier queueing
        scheduled = {run.id for run in await store.list_runs(state=StateType.SCHEDULED)}
        assert scheduled == set(again)


async def test_a_write_from_a_stale_read_changes_nothing(postgres_url: str) -> None:
    async with (
        PostgresStore.open(postgres_url, exclusive=False) as a,
        PostgresStore.open(postgres_url, exclusive=False) as b,
    ):
        [(run, _)] = await a.create_runs([TaskRunCreate(task_key="k")])
        [row] = (await a._run(lambda ops: ops._fetch([run.id], lock=False))).values()
        [change] = await b.set_states([(run.id, cancel())], now=time.time())  # elsewhere
        assert change.run is not None
        # What a holds in its cache is stale now: it reads the row again, not its copy.
        assert await a.read_run(run.id) == change.run
        late = make_state(StateType.RUNNING)
        with pytest.raises(StoreError, match="1 of 1 runs changed in the database"):
            await a._run(lambda ops: ops._save([row._replace(run=attrs.evolve(row.run, state=late))], []))
        assert await b.read_run(run.id) == change.run
        rows = await sql(postgres_url, "SELECT state_type, client_id FROM trioworker_task_runs")
        assert rows == [("CANCELLED", None)]


async def test_leases_are_columns(postgres_url: str) -> None:
    async with PostgresStore.open(postgres_url) as store:
        [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
        query = "SELECT state_type, client_id, replica_id FROM trioworker_task_runs"
        await store.claim_runs([run.id], "worker-1")
        assert await sql(postgres_url, query) == [("PENDING", "worker-1", None)]
        await store.set_states([(run.id, SetStateRequest(make_state(StateType.RUNNING)))], now=time.time())
        assert await sql(postgres_url, query) == [("RUNNING", "worker-1", None)]
        await store.set_states([(run.id, SetStateRequest(make_state(StateType.COMPLETED)))], now=time.time())
        assert await sql(postgres_url, query) == [("COMPLETED", None, None)]


# --------------------------------------------------------------------------- the database restarts, goes away


async def test_a_restarted_database_is_invisible_to_the_next_operation(postgres_url: str) -> None:
    async with (
        outage_proxy(port_of(postgres_url)) as proxy,
        PostgresStore.open(through(proxy, postgres_url)) as store,
    ):
        [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
        assert proxy.accepted == 1
        proxy.drop()  # every connection cut, as a restart does
        assert await store.read_run(run.id) == run  # on a new connection, at once
        [(other, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
        assert proxy.accepted == 2
        assert [r.id for r in await store.list_runs()] == [run.id, other.id]


#: Who holds the lock of a server on the test's schema (other tests' servers use the database too).
OUR_LOCK = (
    f"SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = {_SERVER_LOCK}"
    " AND objid = (hashtext(current_schema())::bigint & 4294967295)::text::oid"
)


async def test_counts_read_beside_the_committer_on_a_connection_of_their_own(postgres_url: str) -> None:
    async with (
        outage_proxy(port_of(postgres_url)) as proxy,
        PostgresStore.open(through(proxy, postgres_url)) as store,
    ):
        await store.create_runs([TaskRunCreate(task_key="k")])
        held, release = threading.Event(), threading.Event()

        def hold(ops: Any) -> None:  # the committer waits here, in its transaction
            held.set()
            release.wait(DEADLINE)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._run, hold)
            try:
                await trio.to_thread.run_sync(held.wait, DEADLINE)
                with trio.fail_after(DEADLINE):
                    counts = await store.count_runs()  # not queued behind the committer
            finally:
                release.set()
        assert [(c.task_key, c.state_type, c.count) for c in counts] == [("k", StateType.SCHEDULED, 1)]
        assert proxy.accepted == 2  # the committer's connection, and the counts' own
        await proxy.cut()  # as a restart does
        assert [c.count for c in await store.count_runs()] == [1]  # on a new connection, at once
        assert proxy.accepted == 3
    with pytest.raises(StoreError, match="the store is closed"):
        await store.count_runs()


async def test_a_session_left_behind_by_a_network_failure_is_ended(postgres_url: str) -> None:
    async with (
        outage_proxy(port_of(postgres_url)) as proxy,
        PostgresStore.open(through(proxy, postgres_url)) as store,
    ):
        [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
        [(old,)] = await sql(postgres_url, OUR_LOCK)
        proxy.sever()  # the database's side lives on, and holds the lock
        assert await store.read_run(run.id) == run  # a new session, which took the lock over
        [(new,)] = await sql(postgres_url, OUR_LOCK)
        assert new != old
        gone = await sql(postgres_url, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (old,))
        assert gone == [(0,)]


async def test_a_connection_lost_in_a_transaction_is_retried_once_on_a_new_one(postgres_url: str) -> None:
    async with (
        outage_proxy(port_of(postgres_url)) as proxy,
        PostgresStore.open(through(proxy, postgres_url)) as store,
    ):
        [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
        cuts: list[int] = []

        def cut_then_read(ops: Any, times: int) -> Any:
            if len(cuts) < times:
                cuts.append(1)
                trio.from_thread.run(proxy.cut)  # the connection goes, mid-transaction
            return ops.read_runs([run.id])

        assert await store._run(lambda ops: cut_then_read(ops, 1)) == [run]  # the second attempt
        cuts.clear()
        with pytest.raises(StoreError, match=r"was lost \(.*\); nothing of the operation was saved$"):
            await store._run(lambda ops: cut_then_read(ops, 2))
        assert len(cuts) == 2
        assert await store.read_run(run.id) == run


async def test_a_connection_lost_at_commit_is_an_outcome_not_known(postgres_url: str) -> None:
    async with (
        outage_proxy(port_of(postgres_url)) as proxy,
        PostgresStore.open(through(proxy, postgres_url)) as store,
    ):

        def create_then_cut(ops: Any) -> Any:
            created = ops.create_runs([TaskRunCreate(task_key="k")])
            trio.from_thread.run(proxy.cut)  # then the commit is sent on a closed connection
            return created

        with pytest.raises(StoreError, match=r"lost while committing .*may or may not have been saved$"):
            await store._run(create_then_cut)
        assert await store.list_runs() == []  # here it was not: the commit never arrived


async def test_a_deadlock_runs_the_group_again(postgres_url: str) -> None:
    async with PostgresStore.open(postgres_url) as store:
        attempts: list[int] = []

        def deadlocked_once(ops: Any, times: int) -> Any:
            attempts.append(1)
            created = ops.create_runs([TaskRunCreate(task_key="k")])
            if len(attempts) <= times:
                raise psycopg.errors.DeadlockDetected("deadlock detected")
            return created

        [(run, _)] = await store._run(lambda ops: deadlocked_once(ops, 1))
        assert len(attempts) == 2 and [r.id for r in await store.list_runs()] == [run.id]
        attempts.clear()
        with pytest.raises(StoreError, match=r"could not commit: DeadlockDetected\('deadlock detected'\)"):
            await store._run(lambda ops: deadlocked_once(ops, 3))
        assert len(attempts) == 3 and [r.id for r in await store.list_runs()] == [run.id]


async def test_while_the_database_is_down_operations_fail_then_resume(postgres_url: str) -> None:
    async with (
        outage_proxy(port_of(postgres_url)) as proxy,
        PostgresStore.open(through(proxy, postgres_url)) as store,
    ):
        [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
        proxy.refusing = True
        proxy.drop()
        where = f"PostgreSQL at 127.0.0.1:{proxy.port} \\(database '\\w+', user 'postgres'\\)"
        with pytest.raises(StoreError, match=f"^cannot connect to {where}: "):
            await store.create_runs([TaskRunCreate(task_key="lost")])
        with pytest.raises(StoreError, match=f"^cannot connect to {where}: "):
            await store.read_run(run.id)
        proxy.refusing = False
        [(after, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
        assert [r.id for r in await store.list_runs()] == [run.id, after.id]  # the failed create left nothing


async def test_the_server_answers_503_while_the_database_is_down_and_keeps_its_sockets(
    postgres_url: str, trioworker_server_control: ServerControl
) -> None:
    async with outage_proxy(port_of(postgres_url)) as proxy:
        server = await trioworker_server_control.start(db_path=through(proxy, postgres_url))
        async with httpx.AsyncClient(base_url=server.api_url, timeout=DEADLINE) as api:
            async with subscribe(server, ["k"], credit=5) as sub:
                [first] = await submit(api, "k", {"n": 1})
                assert [r["id"] for r in await sub.runs()] == [first]
                await sub.report([first], "RUNNING")  # answered: its claim is committed
                proxy.refusing = True
                proxy.drop()
                response = await api.post("/task_runs", json={"task_key": "k"})
                assert response.status_code == 503
                assert response.json()["detail"].startswith(
                    f"the server's store failed: cannot connect to PostgreSQL at 127.0.0.1:{proxy.port} "
                )
                proxy.refusing = False
                [second] = await submit(api, "k", {"n": 2})
                # The same socket, open all along, gets the next run.
                assert [r["id"] for r in await sub.runs()] == [second]
                await sub.finish([first, second])
            states = [(await api.get(f"/task_runs/{i}")).json()["state"]["type"] for i in (first, second)]
            assert states == ["COMPLETED", "COMPLETED"]
            assert len((await api.get("/task_runs")).json()) == 2


async def test_a_report_sent_while_the_database_is_down_is_answered_on_the_same_socket_once_it_is_back(
    postgres_url: str, trioworker_server_control: ServerControl, logs: LogEvents
) -> None:
    async with outage_proxy(port_of(postgres_url)) as proxy:
        server = await trioworker_server_control.start(db_path=through(proxy, postgres_url))
        async with httpx.AsyncClient(base_url=server.api_url, timeout=DEADLINE) as api:
            [run_id] = await submit(api, "k", {})
            async with subscribe(server, ["k"], credit=1) as sub:
                assert [r["id"] for r in await sub.runs()] == [run_id]
                await sub.report([run_id], "RUNNING")
                proxy.refusing = True
                proxy.drop()
                await sub.send({"type": "states", "states": [{"id": run_id, "state": {"type": "COMPLETED"}}]})
                await logs.wait_for("its reports of test-1 failed .*cannot connect to PostgreSQL")
                proxy.refusing = False
                answer = await sub.receive()  # on the socket open all along
                assert answer["type"] == "state_results"
                assert [(r["id"], r["status"]) for r in answer["results"]] == [(run_id, "ACCEPT")]
            assert (await api.get(f"/task_runs/{run_id}")).json()["state"]["type"] == "COMPLETED"
            assert logs.matching("its reports of test-1 stored")


# --------------------------------------------------------------------------- the command line


async def test_the_server_runs_on_postgresql_and_never_prints_the_password(postgres_url: str) -> None:
    db = with_params(postgres_url, password="s3cret")  # the test servers trust: any password does
    async with trio.open_nursery() as nursery:
        run = partial(trio.run_process, server_command("--db", db), stderr=subprocess.PIPE, check=False)
        process = await nursery.start(run)
        assert process.stderr is not None
        match, seen = await read_until(process.stderr, r"listening on (http://\S+)(?s:.*), 0 runs queued")
        info = conninfo_to_dict(postgres_url)
        assert f"database postgresql://{info['user']}@{info['host']}:{info['port']}/{info['dbname']}," in seen
        async with httpx.AsyncClient(base_url=match.group(1) + "/api") as api:
            run_id = (await api.post("/task_runs", json={"task_key": "k"})).json()["id"]
        process.send_signal(signal.SIGTERM)
        _, rest = await read_until(process.stderr, r"server stopped")
        with trio.fail_after(10):
            assert await process.wait() == 0
    assert "s3cret" not in seen + rest
    assert await sql(postgres_url, "SELECT id::text FROM trioworker_task_runs") == [(run_id,)]


@pytest.fixture(scope="module")
def password_cluster() -> Iterator[str | Unavailable]:
    """A cluster of the module's own where :data:`PASSWORD_ROLE` needs its password."""
    bin_dir = binaries()
    if bin_dir is None:
        yield Unavailable("no initdb to start a cluster that checks passwords")
        return
    with throwaway_cluster(bin_dir, passwords=True) as cluster:
        yield cluster.url


@pytest.mark.parametrize("fault", ["refused", "no database", "no role", "wrong password", "newer schema"])
async def test_a_database_the_server_cannot_use_is_named_in_one_line(
    fault: str, postgres_url: str, refused_port: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    info = conninfo_to_dict(postgres_url)
    if fault == "refused":
        db = f"postgresql://queue:s3cret@127.0.0.1:{refused_port}/runs"
        expected = (
            f"cannot connect to PostgreSQL at 127.0.0.1:{refused_port} (database 'runs', user 'queue'): "
        )
        reason = "Connection refused"
    elif fault == "wrong password":
        cluster = request.getfixturevalue("password_cluster")
        if isinstance(cluster, Unavailable):
            unavailable(str(cluster))
        role = PASSWORD_ROLE[0]
        db = with_params(cluster, user=role, password="s3cret")
        port = conninfo_to_dict(cluster)["port"]
        expected = f"cannot connect to PostgreSQL at 127.0.0.1:{port} (database 'postgres', user '{role}')"
        reason = f'password authentication failed for user "{role}"'
    elif fault == "newer schema":
        db = postgres_url
        async with PostgresStore.open(db):
            pass
        await sql(db, "UPDATE trioworker_schema SET version = %s", (SCHEMA_VERSION + 1,))
        expected = f"the database has trioworker schema version {SCHEMA_VERSION + 1}, newer than "
        reason = "upgrade trioworker"
    else:
        user, dbname = ("queue", str(info["dbname"])) if fault == "no role" else (str(info["user"]), "no_db")
        db = with_params(postgres_url, user=user, dbname=dbname, password="s3cret")
        at = f"{info['host']}:{info['port']}"
        expected = f"cannot connect to PostgreSQL at {at} (database '{dbname}', user '{user}')"
        reason = (
            f'role "{user}" does not exist' if fault == "no role" else f'database "{dbname}" does not exist'
        )
    line = await refused(tmp_path, "--db", db)
    assert line.startswith(f"trioworker: {expected}") and line.endswith(reason), line
    assert "s3cret" not in line


def test_the_sqlite_server_does_not_import_psycopg() -> None:
    code = "import sys, trioworker.server, trioworker.cli.server; print('psycopg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


async def test_a_schema_5_database_gets_the_schedules_table(postgres_url: str) -> None:
    async with PostgresStore.open(postgres_url) as store:
        [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
    for statement in (*SCHEMA_6_UNDONE, "UPDATE trioworker_schema SET version = 5"):
        await sql(postgres_url, statement)
    async with PostgresStore.open(postgres_url) as store:
        assert await store.read_run(run.id) == run
        assert await store.read_schedules() == []
        create = ScheduleCreate(name="s", task_key="k", interval=60)
        made, new = await store.upsert_schedule(create, datetime(2030, 1, 1, tzinfo=UTC))
        assert new and await store.read_schedules() == [made]
    assert await sql(postgres_url, "SELECT version FROM trioworker_schema") == [(SCHEMA_VERSION,)] == [(7,)]
