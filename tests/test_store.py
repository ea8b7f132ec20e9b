"""The SQLite store on its own: its file, migrations, group commit, the thread rule and its
cache. What every store does is tested in ``test_store_contract.py``."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from trioworker.models import (
    ScheduleCreate,
    SetStateRequest,
    StateType,
    TaskRun,
    TaskRunCreate,
    make_state,
    utcnow,
)
from trioworker.server.store import SCHEMA_VERSION, DatabaseInUse, SQLiteStore, StoreError, database_path
from trioworker.server.store.sqlite import CHECKPOINT_EVERY


async def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with SQLiteStore.open(path):
        pass
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with SQLiteStore.open(path):
        pass
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        async with SQLiteStore.open(path):
            pass


#: Undoes SQLite's schema step 7 (a file of schema 6).
SCHEMA_7_UNDONE = (
    "DROP INDEX ix_task_runs_group",
    "DROP TABLE task_run_groups",
    "ALTER TABLE task_runs DROP COLUMN group_id",
    "ALTER TABLE task_runs DROP COLUMN detached",
)
#: Undoes steps 7 and 6 (a file of schema 5).
SCHEMA_6_UNDONE = (*SCHEMA_7_UNDONE, "DROP TABLE schedules")
#: Undoes steps 7 to 5 (a file of schema 3: SQLite has no step 4).
SCHEMA_5_UNDONE = (*SCHEMA_6_UNDONE, "DROP TABLE task_run_tags", "DROP TABLE task_run_cache")


def _undo(conn: sqlite3.Connection, statements: tuple[str, ...]) -> None:
    for statement in statements:
        conn.execute(statement)


#: The schema of version 1, as trioworker 0.x created it (idempotency keys unique across keys).
SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS task_runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    task_key TEXT NOT NULL,
    state_type TEXT NOT NULL,
    scheduled_at REAL,
    idempotency_key TEXT UNIQUE,
    wait_for TEXT,
    parameters BLOB NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_task_runs_state ON task_runs (state_type, seq);
CREATE INDEX IF NOT EXISTS ix_task_runs_key ON task_runs (task_key, seq);
CREATE TABLE IF NOT EXISTS task_run_states (
    run_seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    name TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    message TEXT
);
CREATE INDEX IF NOT EXISTS ix_task_run_states_run ON task_run_states (run_seq);
INSERT INTO schema_version (version) VALUES (1);
"""


@pytest.mark.parametrize("with_wait_for", [True, False], ids=["v1", "v1-before-wait_for"])
async def test_a_schema_1_file_is_migrated_and_keeps_its_runs(tmp_path: Path, with_wait_for: bool) -> None:
    # Runs written by today's store, copied into a file with schema 1's tables.
    source = tmp_path / "source.db"
    async with SQLiteStore.open(source) as store:
        [(keyed, _), (plain, _), (gone, _)] = await store.create_runs(
            [
                TaskRunCreate(task_key="a", idempotency_key="once", parameters={"x": 1}),
                TaskRunCreate(task_key="a", parameters={"x": 2}),
                TaskRunCreate(task_key="z"),
            ]
        )
        await store.set_states(
            [(keyed.id, SetStateRequest(make_state(StateType.CANCELLED)))], now=time.time()
        )
        assert await store.delete_run(gone.id) is not None  # its seq (3) must never come back
        keyed_history = await store.history(keyed.id)
        keyed_now = await store.read_run(keyed.id)
        assert keyed_now is not None and keyed_now.state.type is StateType.CANCELLED
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old, isolation_level=None)
    schema = SCHEMA_1 if with_wait_for else SCHEMA_1.replace("    wait_for TEXT,\n", "")
    conn.executescript(schema)
    conn.execute("ATTACH ? AS source", (str(source),))
    columns = "seq, id, task_key, state_type, scheduled_at, idempotency_key, " + (
        "wait_for, parameters, body" if with_wait_for else "parameters, body"
    )
    conn.execute(f"INSERT INTO task_runs ({columns}) SELECT {columns} FROM source.task_runs")
    conn.execute("INSERT INTO task_run_states SELECT * FROM source.task_run_states")
    conn.execute("UPDATE sqlite_sequence SET seq = 3 WHERE name = 'task_runs'")
    conn.execute("DETACH source")
    with pytest.raises(sqlite3.IntegrityError):  # the old rule, to be sure this is schema 1
        conn.execute(
            "INSERT INTO task_runs (id, task_key, state_type, idempotency_key, parameters, body)"
            " VALUES ('x', 'b', 'SCHEDULED', 'once', '{}', '{}')"
        )
    conn.close()

    async with SQLiteStore.open(old) as store:
        assert await store.read_run(keyed.id) == keyed_now
        assert (await store.read_run(plain.id)) == plain
        assert await store.history(keyed.id) == keyed_history
        [(same, queued)] = await store.create_runs([TaskRunCreate(task_key="a", idempotency_key="once")])
        assert (same.id, queued) == (keyed.id, None)
        [(other, queued)] = await store.create_runs([TaskRunCreate(task_key="b", idempotency_key="once")])
        assert other.id != keyed.id and queued is not None
        assert queued.seq == 4
    async with SQLiteStore.open(old) as store:  # opening it again changes nothing
        [(again, queued)] = await store.create_runs([TaskRunCreate(task_key="b", idempotency_key="once")])
        assert (again.id, queued) == (other.id, None)
    conn = sqlite3.connect(old)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert conn.execute("SELECT name FROM sqlite_master WHERE name LIKE '%v2%'").fetchall() == []
    conn.close()


async def test_a_schema_2_file_gets_the_parent_column_filled(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with SQLiteStore.open(path) as store:
        [(parent, _)] = await store.create_runs([TaskRunCreate(task_key="p")])
        [(child, _), (other, _)] = await store.create_runs(
            [TaskRunCreate(task_key="c", parent_task_run_id=parent.id), TaskRunCreate(task_key="c")]
        )
    conn = sqlite3.connect(path, isolation_level=None)  # back to schema 2: no parent column
    _undo(conn, SCHEMA_5_UNDONE)
    conn.execute("DROP INDEX ix_task_runs_parent")
    conn.execute("ALTER TABLE task_runs DROP COLUMN parent_id")
    conn.execute("UPDATE schema_version SET version = 2")
    conn.close()
    async with SQLiteStore.open(path) as store:
        assert [r.id for r in await store.list_runs(parent_task_run_id=parent.id)] == [child.id]
        assert await store.read_run(other.id) == other
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


async def test_a_schema_3_file_gets_its_runs_tags_indexed(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with SQLiteStore.open(path) as store:
        created = await store.create_runs(
            [
                TaskRunCreate(task_key="k", tags=["a", "b"]),
                TaskRunCreate(task_key="k", parameters={"text": '"tags":["a"]'}),
                TaskRunCreate(task_key="k", tags=["b"]),
            ]
        )
        both, _, only_b = (run.id for run, _ in created)
    conn = sqlite3.connect(path, isolation_level=None)  # back to schema 3: no tags, no cache
    _undo(conn, SCHEMA_5_UNDONE)
    conn.execute("UPDATE schema_version SET version = 3")
    conn.close()
    async with SQLiteStore.open(path) as store:
        assert [r.id for r in await store.list_runs(tags=["a"])] == [both]
        assert [r.id for r in await store.list_runs(tags=["b"], newest_first=True)] == [only_b, both]
        assert [r.id for r in await store.list_runs(tags=["a", "b"])] == [both]
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


async def test_a_schema_5_file_gets_the_schedules_table(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with SQLiteStore.open(path) as store:
        [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
    conn = sqlite3.connect(path, isolation_level=None)  # back to schema 5: no schedules
    _undo(conn, SCHEMA_6_UNDONE)
    conn.execute("UPDATE schema_version SET version = 5")
    conn.close()
    async with SQLiteStore.open(path) as store:
        assert await store.read_run(run.id) == run and await store.read_schedules() == []
        create = ScheduleCreate(name="s", task_key="k", interval=60)
        made, _ = await store.upsert_schedule(create, datetime(2030, 1, 1, tzinfo=UTC))
        assert await store.read_schedules() == [made]
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)] == [(7,)]


async def test_a_schema_6_file_gets_the_group_columns(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with SQLiteStore.open(path) as store:
        [(parent, _)] = await store.create_runs([TaskRunCreate(task_key="p")])
        [(child, _)] = await store.create_runs([TaskRunCreate(task_key="c", parent_task_run_id=parent.id)])
    conn = sqlite3.connect(path, isolation_level=None)  # back to schema 6: no groups
    _undo(conn, SCHEMA_7_UNDONE)
    conn.execute("UPDATE schema_version SET version = 6")
    conn.close()
    async with SQLiteStore.open(path) as store:
        assert await store.read_run(child.id) == child
        [change] = await store.set_states(
            [(parent.id, SetStateRequest(make_state(StateType.CANCELLED)))], now=0.0
        )
        assert [d.run.id for d in change.descendants if d.run] == [child.id]
        group = uuid.uuid4()
        [(grouped, _)] = await store.create_runs([TaskRunCreate(task_key="g", group_id=group)])
        assert [r.id for r in await store.list_runs(group_id=group)] == [grouped.id]
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


async def test_counts_read_beside_the_committer_and_stop_with_the_store(tmp_path: Path) -> None:
    async with SQLiteStore.open(tmp_path / "db.sqlite") as store:
        await store.create_runs([TaskRunCreate(task_key="k")])
        commits = store.statistics().commits
        [count] = await store.count_runs()
        assert (count.task_key, count.count) == ("k", 1)
        assert store.statistics().commits == commits  # the committer was not asked
    with pytest.raises(StoreError, match="the store is closed"):
        await store.count_runs()


async def test_one_file_is_open_in_one_store_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with SQLiteStore.open(path) as store:
        [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
        spellings: list[str | Path] = [path, str(path), f"sqlite:///{path}", tmp_path / "." / "db.sqlite"]
        for spelling in spellings:
            with pytest.raises(DatabaseInUse, match=f"^the database {path} is in use by another"):
                async with SQLiteStore.open(spelling):
                    pytest.fail("opened a file another store has open")
        hard = tmp_path / "hard.sqlite"
        os.link(path, hard)  # another name, the same file: the lock is the file's
        with pytest.raises(DatabaseInUse, match=f"^the database {hard} is in use by another"):
            async with SQLiteStore.open(hard):
                pytest.fail("opened a hard link of a file another store has open")
        for uri in [f"file:{path}", f"file:{path}?mode=rwc", "file:./db.sqlite"]:
            with pytest.raises(ValueError, match=r"^unsupported database URL scheme 'file'"):
                async with SQLiteStore.open(uri):
                    pytest.fail("opened a file: URI")
        assert await store.read_run(run.id) == run  # the first store goes on
    async with SQLiteStore.open(f"sqlite:///{path}") as store:  # closed: the lock went with it
        assert await store.read_run(run.id) == run
    async with SQLiteStore.open(":memory:"), SQLiteStore.open(":memory:"):
        pass  # nothing to share, nothing to lock


_TRY_WRITE = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
try:
    conn.execute("BEGIN IMMEDIATE")
except sqlite3.OperationalError as exc:
    print(exc)
else:
    print("wrote")
"""


async def test_sqlite_still_locks_across_processes_beside_the_store_lock(tmp_path: Path) -> None:
    """The store's flock on the file leaves SQLite's own (fcntl) locks working, even after a
    refused second open in this process closed a descriptor of the file."""
    path = tmp_path / "db.sqlite"

    async def other_process_writes() -> str:
        with trio.fail_after(30):
            done = await trio.run_process([sys.executable, "-c", _TRY_WRITE, str(path)], capture_stdout=True)
        return done.stdout.decode().strip()

    async with SQLiteStore.open(path) as store:
        await store.create_runs([TaskRunCreate(task_key="k")])
        writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            writer.execute("BEGIN IMMEDIATE")
            assert await other_process_writes() == "database is locked"
            with pytest.raises(DatabaseInUse):
                async with SQLiteStore.open(path):
                    pytest.fail("opened a file another store has open")
            assert await other_process_writes() == "database is locked"
            writer.execute("ROLLBACK")
            assert await other_process_writes() == "wrote"
        finally:
            writer.close()
        assert len(await store.list_runs()) == 1


@pytest.mark.parametrize(
    ("db", "path"),
    [
        ("queue.db", "queue.db"),
        ("/var/lib/queue.db", "/var/lib/queue.db"),
        ("~/queue.db", str(Path("~/queue.db").expanduser())),
        (Path("a/b.db"), "a/b.db"),
        (":memory:", ":memory:"),
        ("sqlite://", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
        ("sqlite:///queue.db", "queue.db"),
        ("sqlite:///data/queue.db", "data/queue.db"),
        ("sqlite:////var/lib/queue.db", "/var/lib/queue.db"),
        ("SQLite:////var/lib/my%20queue.db", "/var/lib/my queue.db"),
        ("postgresql:queue.db", "postgresql:queue.db"),  # no "://": a file name like any other
        (Path("file:queue.db"), "./file:queue.db"),  # a Path is a file name: not a URI to SQLite
        ("sqlite:///file:queue.db", "./file:queue.db"),
        ("sqlite:////data/file:queue.db", "/data/file:queue.db"),
    ],
)
def test_database_path(db: str | Path, path: str) -> None:
    assert database_path(db) == path


async def test_only_small_groups_of_light_operations_run_on_the_trio_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's create, claim and reports commit on the Trio thread (no thread hop); a big
    create, a list and a cancel that may cascade go to a worker thread, and so does every
    checkpoint (the committer's connection never checkpoints on its own)."""
    trio_thread = threading.get_ident()
    statements: list[tuple[bool, str]] = []  # (on the Trio thread, SQL)
    real_execute = sqlite3.Connection.execute

    class Spy(sqlite3.Connection):
        def execute(self, *args, **kwargs):
            statements.append((threading.get_ident() == trio_thread, str(args[0])))
            return real_execute(self, *args, **kwargs)

    def on_trio_thread(marker: str) -> set[bool]:
        return {here for here, sql in statements if marker in sql}

    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: real_connect(*a, factory=Spy, **kw))
    async with SQLiteStore.open(tmp_path / "db.sqlite") as store:
        statements.clear()
        [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
        await store.claim_runs([run.id], "c")
        await store.set_states([(run.id, SetStateRequest(make_state(StateType.RUNNING)))], now=time.time())
        assert on_trio_thread("INSERT INTO task_runs") == {True}
        assert on_trio_thread("UPDATE task_runs") == {True}
        statements.clear()
        await store.create_runs([TaskRunCreate(task_key="k") for _ in range(100)])
        await store.list_runs(limit=10)
        await store.set_states([(run.id, SetStateRequest(make_state(StateType.CANCELLED)))], now=time.time())
        assert on_trio_thread("BEGIN") == {False}
        checkpointed = store._checkpoint_done
        for _ in range(CHECKPOINT_EVERY):
            await store.states_of([run.id])
        with trio.fail_after(10):
            await checkpointed.wait()
        assert on_trio_thread("wal_checkpoint") == {False}
    assert store.statistics().inline_commits >= 3


def test_in_flight_runs_reach_the_committed_view_only_with_their_commit() -> None:
    from trioworker.server.store.sqlite import _InFlight

    run = TaskRun(id=uuid.uuid4(), task_key="k", name="k", state=make_state(StateType.PENDING), parameters={})
    done = attrs.evolve(run, state=make_state(StateType.COMPLETED))
    cache = _InFlight()
    cache.wrote(run.id, 1, run)
    assert cache.get(run.id) == (1, run)  # later operations of the transaction see it
    cache.op_done(ok=False)  # the operation rolled back
    assert cache.get(run.id) is None
    cache.wrote(run.id, 1, run)
    cache.op_done(ok=True)
    cache.group_done(ok=False)  # the whole transaction rolled back
    assert cache.get(run.id) is None
    cache.wrote(run.id, 1, run)
    cache.op_done(ok=True)
    cache.group_done(ok=True)
    assert cache.committed == {run.id: (1, run)}
    cache.wrote(run.id, 1, done)  # finished runs leave
    cache.op_done(ok=True)
    cache.group_done(ok=True)
    assert cache.committed == {}


async def test_reports_on_claimed_runs_match_what_the_store_holds(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with SQLiteStore.open(path) as store:
        [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k", parameters={"x": 1})])
        [claimed] = await store.claim_runs([run.id], "c")
        [running] = await store.set_states(
            [(run.id, SetStateRequest(make_state(StateType.RUNNING)))], now=0.0
        )
        assert running.run == await store.read_run(run.id)
        # A report that fails inside its operation leaves the cached run as it was.
        with pytest.raises(ValueError):
            await store._run(
                lambda ops: (
                    ops.set_states([(run.id, SetStateRequest(make_state(StateType.COMPLETED)))], 0.0),
                    int("x"),
                )
            )
        assert await store.read_run(run.id) == running.run
        [again] = await store.set_states([(run.id, SetStateRequest(make_state(StateType.RUNNING)))], now=0.0)
        assert again.result.details == "unchanged"
    async with SQLiteStore.open(path) as store:
        stored = await store.read_run(run.id)
    assert stored == running.run and claimed.state.type is StateType.PENDING


async def _claim_steps(tmp_path: Path, queued: int) -> int:
    """SQLite virtual-machine steps (in thousands) of claiming 100 just-created runs while
    ``queued`` other runs wait: what a claim reads, counted without a clock."""
    async with SQLiteStore.open(tmp_path / f"claim-{queued}.db") as store:
        await store.create_runs([TaskRunCreate(task_key="k") for _ in range(queued)])
        fresh = [run for run, _ in await store.create_runs([TaskRunCreate(task_key="k") for _ in range(100)])]
        conn = store._ops.conn
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        claim = store.claim_runs_soon(fresh, "c-1", utcnow())
        conn.set_progress_handler(count, 1000)
        try:
            claimed = await claim.result()
        finally:
            conn.set_progress_handler(None, 0)
        assert len(claimed) == 100
        return steps[0]


async def test_a_claim_of_known_runs_reads_only_their_rows(tmp_path: Path) -> None:
    """With the state in its WHERE clause, SQLite's planner took the state index for a claim
    of 10 or more runs and walked every queued run: 100,000 queued made the first 1,000 drain
    at a fifth of the rate with 1,000 queued. A claim looks runs up by id alone."""
    few = await _claim_steps(tmp_path, 100)
    many = await _claim_steps(tmp_path, 20_000)
    assert many <= few * 1.5 + 5, (few, many)


async def test_a_light_operation_commits_at_once_when_the_committer_is_idle(tmp_path: Path) -> None:
    """No hop to the committer task and back for a lone create or report; a burst that
    arrives together still shares commits (the next light operations queue for a while
    after such a commit)."""
    async with SQLiteStore.open(tmp_path / "db.sqlite") as store:
        await trio.testing.wait_all_tasks_blocked()
        before = store.statistics()
        [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
        after = store.statistics()
        assert (after.commits - before.commits, after.direct_commits - before.direct_commits) == (1, 1)
        assert (await store.read_run(run.id)) == run

        async def create() -> None:
            await store.create_runs([TaskRunCreate(task_key="k")])

        await trio.testing.wait_all_tasks_blocked()
        before = store.statistics()
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(create)
        after = store.statistics()
        assert after.operations - before.operations == 40
        assert after.commits - before.commits <= 10
        assert len(await store.list_runs(limit=100)) == 41
