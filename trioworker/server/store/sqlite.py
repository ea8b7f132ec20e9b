"""The embedded store: SQLite, one file (or memory), one server.

SQLite runs in WAL mode (``synchronous = NORMAL``: a commit appends to the log, only a
checkpoint syncs) on one connection that one task at a time uses: every operation is a
plain function of the connection (:class:`_SQLiteOps`), and
:class:`~trioworker.server.store.commit.GroupCommitStore` runs all operations waiting at
a moment in one transaction (group commit): on a worker thread, or, for a small group of
light operations (a run's create, claim or report), on the Trio thread, where it costs
tens of microseconds and no thread hop. A burst of 1,000 writes costs one commit, not
1,000. That connection never checkpoints: a task of the store does, on its reading
connection and a worker thread, every :data:`CHECKPOINT_EVERY` operations, so the
milliseconds of a checkpoint's sync never fall on the Trio thread.

Each operation is atomic (its own savepoint) and reads what it changes inside the same
transaction, so state checks and updates cannot interleave. What a change does to a run
is :mod:`trioworker.server.store.runs`'s; this module only reads and writes rows.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TypeVar

import attrs
import orjson
import trio

from trioworker.models import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Schedule,
    ScheduleCreate,
    SetStateRequest,
    SetStateResult,
    SetStateStatus,
    State,
    StateChange,
    StateType,
    TaskRun,
    TaskRunCreate,
    utcnow,
)
from trioworker.schedules import new_schedule
from trioworker.server.store.base import (
    Change,
    EndedCount,
    Fired,
    LiveServer,
    QueuedRun,
    Requeued,
    RunCount,
    StoreError,
)
from trioworker.server.store.commit import GroupCommitStore, Operations, Pending
from trioworker.server.store.files import database_path, lock_file
from trioworker.server.store.runs import (
    CacheUse,
    born_cancelled,
    cache_expires_at,
    cache_use,
    cancel_request,
    cancels_descendants,
    claimed_copy,
    computing_copy,
    epoch,
    group_clause,
    held_elsewhere,
    judged,
    leased_at_create,
    leased_elsewhere_change,
    missing_run_change,
    new_run,
    queued_run,
    reclaimed,
    requeued,
    reused_copy,
    run_body,
    run_from_row,
    same_run,
    waiting_copy,
    waits_for,
    waits_on_cache,
)
from trioworker.server.store.schedules import FIRE_BATCH, fire_due, schedule_body, schedule_from_body

log = logging.getLogger("trioworker.server")
T = TypeVar("T")

#: 1: the first schema; 2: an idempotency key is unique per task key, not across all keys;
#: 3: the parent run's id in a column of its own (a run's children are found by index);
#: 5: runs by tag (an index of tags) and the cache (one entry per task key and cache key).
#: (There is no 4 in SQLite: 5 is the version that brought these to both stores.)
#: 6: the schedules table (periodic runs).
#: 7: run groups (a run's group and whether it is detached in columns, a table of groups).
SCHEMA_VERSION: Final = 7

#: SQLite's limit on host parameters is 32766 nowadays; stay well below it.
_CHUNK: Final = 500

_RUNS_TABLE: Final = """
CREATE TABLE {name} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    task_key TEXT NOT NULL,
    state_type TEXT NOT NULL,
    scheduled_at REAL,
    idempotency_key TEXT,
    wait_for TEXT,
    parent_id TEXT,
    parameters BLOB NOT NULL,
    body BLOB NOT NULL,
    group_id TEXT,
    detached INTEGER NOT NULL DEFAULT 0
)"""
_RUNS_COLUMNS: Final = (
    "seq",
    "id",
    "task_key",
    "state_type",
    "scheduled_at",
    "idempotency_key",
    "wait_for",
    "parent_id",
    "parameters",
    "body",
    "group_id",
    "detached",
)
#: Run after the tables exist (every statement may run again).
_INDEXES: Final = (
    "CREATE INDEX IF NOT EXISTS ix_task_runs_state ON task_runs (state_type, seq)",
    "CREATE INDEX IF NOT EXISTS ix_task_runs_key ON task_runs (task_key, seq)",
    # NULLs are distinct in a unique index: runs without a key never collide.
    "CREATE UNIQUE INDEX IF NOT EXISTS ix_task_runs_idempotency ON task_runs (task_key, idempotency_key)",
    "CREATE INDEX IF NOT EXISTS ix_task_run_states_run ON task_run_states (run_seq)",
    "CREATE INDEX IF NOT EXISTS ix_task_runs_parent ON task_runs (parent_id, seq)"
    " WHERE parent_id IS NOT NULL",
    # Runs by key and state, for their counts (the operator's view): read from the index alone.
    "CREATE INDEX IF NOT EXISTS ix_task_runs_counts ON task_runs (task_key, state_type)",
    # Ends by time (for counts per minute): one entry per ended run, none for other states.
    "CREATE INDEX IF NOT EXISTS ix_task_run_states_ended ON task_run_states (timestamp)"
    " WHERE type IN ({terminal})",
    "CREATE INDEX IF NOT EXISTS ix_schedules_next ON schedules (next_fire_at)",
    "CREATE INDEX IF NOT EXISTS ix_task_runs_group ON task_runs (group_id, seq) WHERE group_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS ix_task_run_groups_created ON task_run_groups (created)",
)
#: Periodic runs (version 6): one row per schedule, its next fire time in a column (indexed:
#: the server sleeps until the earliest), the rest as the API gives it.
_SCHEDULES_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    next_fire_at REAL NOT NULL,
    body BLOB NOT NULL
)"""
#: One row per run group (version 7; created by its first run; ``created`` and
#: ``cancelled`` are epoch seconds, ``cancelled`` NULL until the group is cancelled).
_GROUPS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS task_run_groups (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    cancelled REAL
)"""
_STATES_TABLE: Final = """
CREATE TABLE IF NOT EXISTS task_run_states (
    run_seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    name TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    message TEXT
)"""
#: Schema 5: every tag of every run (runs by tag, found by index), and one entry per task
#: key and cache key: the run that computes (or computed) its result, and when that result
#: expires (epoch seconds on the dispatcher's clock; NULL: never, or not completed yet).
_TABLES_5: Final = (
    "CREATE TABLE IF NOT EXISTS task_run_tags (tag TEXT NOT NULL, run_seq INTEGER NOT NULL,"
    " PRIMARY KEY (tag, run_seq)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS ix_task_run_tags_run ON task_run_tags (run_seq)",
    "CREATE TABLE IF NOT EXISTS task_run_cache (task_key TEXT NOT NULL, cache_key TEXT NOT NULL,"
    " run_id TEXT NOT NULL, expires_at REAL, PRIMARY KEY (task_key, cache_key)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS ix_task_run_cache_run ON task_run_cache (run_id)",
)


# --------------------------------------------------------------------------- rows


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


class _InFlight:
    """Runs leased to workers (PENDING or RUNNING), as committed: reports about them need
    not read and decode their rows. Only the committer thread touches it.

    Writes of the running transaction wait in layers (the operation's, then the group's)
    and reach the committed view only when SQLite committed them, so a rollback leaves
    nothing behind.
    """

    def __init__(self) -> None:
        self.committed: dict[uuid.UUID, tuple[int, TaskRun]] = {}
        self.group: dict[uuid.UUID, tuple[int, TaskRun] | None] = {}
        self.op: dict[uuid.UUID, tuple[int, TaskRun] | None] = {}

    def get(self, run_id: uuid.UUID) -> tuple[int, TaskRun] | None:
        for layer in (self.op, self.group):
            if run_id in layer:
                return layer[run_id]
        return self.committed.get(run_id)

    def wrote(self, run_id: uuid.UUID, seq: int, run: TaskRun | None) -> None:
        """The row of ``run_id`` now holds ``run`` (None: deleted, or not in flight)."""
        if run is not None and run.state.type in ACTIVE_STATES and len(self.committed) < IN_FLIGHT_MAX_RUNS:
            self.op[run_id] = (seq, run)
        else:
            self.op[run_id] = None

    def op_done(self, ok: bool) -> None:
        if ok:
            self.group.update(self.op)
        self.op = {}

    def group_done(self, ok: bool) -> None:
        if ok:
            for run_id, entry in self.group.items():
                if entry is None:
                    self.committed.pop(run_id, None)
                else:
                    self.committed[run_id] = entry
        self.group = {}
        self.op = {}


#: ACTIVE_STATES as an SQL list: ``'PENDING', 'RUNNING'``.
_ACTIVE_SQL: Final = ", ".join(f"'{state.value}'" for state in sorted(ACTIVE_STATES))
#: TERMINAL_STATES as an SQL list, the very text of the partial index's condition (SQLite
#: uses that index only for a query whose condition has the same term).
_TERMINAL_SQL: Final = ", ".join(f"'{state.value}'" for state in sorted(TERMINAL_STATES))
#: Most in-flight runs kept decoded in memory (beyond that, reports read the store).
IN_FLIGHT_MAX_RUNS: Final = 10_000


class _SQLiteOps(Operations):
    """The synchronous operations; each runs inside the committer's transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.in_flight = _InFlight()

    # -- helpers
    def _fetch(self, run_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, tuple[int, TaskRun]]:
        found: dict[uuid.UUID, tuple[int, TaskRun]] = {}
        ids: list[str] = []
        for run_id in run_ids:
            entry = self.in_flight.get(run_id)
            if entry is None:
                ids.append(str(run_id))
            else:
                found[run_id] = entry
        for chunk in _chunks(ids):
            rows = self.conn.execute(
                f"SELECT seq, parameters, body FROM task_runs WHERE id IN ({_placeholders(len(chunk))})",
                chunk,
            )
            for seq, parameters, body in rows:
                run = run_from_row(parameters, body)
                found[run.id] = (seq, run)
        return found

    def _known(
        self, run_ids: Sequence[uuid.UUID], known: Mapping[uuid.UUID, TaskRun]
    ) -> dict[uuid.UUID, tuple[int, TaskRun]]:
        """Like :meth:`_fetch` for runs whose content is known, but only those whose row is
        still SCHEDULED (the rest are not for a claim)."""
        found: dict[uuid.UUID, tuple[int, TaskRun]] = {}
        for chunk in _chunks([str(i) for i in run_ids]):
            # By id alone, the state checked here: with the state in the WHERE clause SQLite
            # picks the state index and walks every queued run (100,000 queued made a claim
            # of 100 runs scan them all).
            rows = self.conn.execute(
                f"SELECT seq, id, state_type FROM task_runs WHERE id IN ({_placeholders(len(chunk))})",
                chunk,
            )
            for seq, text_id, state_type in rows:
                if state_type == StateType.SCHEDULED.value:
                    run_id = uuid.UUID(text_id)
                    found[run_id] = (seq, known[run_id])
        return found

    def _write(self, seq: int, run: TaskRun, *, log_state: bool = True) -> None:
        self.conn.execute(
            "UPDATE task_runs SET state_type = ?, scheduled_at = ?, body = ? WHERE seq = ?",
            (run.state.type.value, epoch(run.state.state_details.scheduled_time), run_body(run), seq),
        )
        self.in_flight.wrote(run.id, seq, run)
        if log_state:
            self._log(seq, run.state)

    def _log(self, seq: int, state: State) -> None:
        self.conn.execute(
            "INSERT INTO task_run_states (run_seq, type, name, timestamp, message) VALUES (?, ?, ?, ?, ?)",
            (seq, state.type.value, state.name, state.timestamp.isoformat(), state.message),
        )

    # -- operations
    def migrate(self) -> None:
        """Create the schema, or bring an older one up to :data:`SCHEMA_VERSION`, in one transaction."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = None if row is None else int(row[0])
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    f"the database has schema version {version}, newer than this trioworker knows "
                    f"({SCHEMA_VERSION}); upgrade trioworker"
                )
            has_runs = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'task_runs'"
            ).fetchone()
            if not has_runs:
                conn.execute(_RUNS_TABLE.format(name="task_runs"))
            elif version is None or version < 2:
                self._migrate_to_2()
            conn.execute(_STATES_TABLE)
            conn.execute(_SCHEDULES_TABLE)
            conn.execute(_GROUPS_TABLE)
            if has_runs and (version is None or version < 3):
                self._migrate_to_3()
            for statement in _TABLES_5:
                conn.execute(statement)
            if has_runs and (version is None or version < 5):
                # Runs stored before keep their tags in their bodies only: index them.
                conn.execute(
                    "INSERT OR IGNORE INTO task_run_tags (tag, run_seq) SELECT t.value, r.seq"
                    " FROM task_runs AS r, json_each(CAST(r.body AS TEXT), '$.tags') AS t"
                    " WHERE t.type = 'text'"
                )
            if has_runs and (version is None or version < 7):
                self._migrate_to_7()
            for statement in _INDEXES:
                conn.execute(statement.format(terminal=_TERMINAL_SQL))
            if version is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            else:
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _migrate_to_2(self) -> None:
        """Schema 1 had ``idempotency_key TEXT UNIQUE`` across all task keys. A column
        constraint cannot be dropped in SQLite: rebuild the table (same rows, same ``seq``,
        same AUTOINCREMENT counter), then the unique index on ``(task_key, idempotency_key)``
        replaces it.
        """
        conn = self.conn
        present = {row[1] for row in conn.execute("PRAGMA table_info(task_runs)")}
        columns = ", ".join(c for c in _RUNS_COLUMNS if c in present)  # early files lack wait_for
        counter = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'task_runs'").fetchone()
        conn.execute(_RUNS_TABLE.format(name="task_runs_v2"))
        conn.execute(f"INSERT INTO task_runs_v2 ({columns}) SELECT {columns} FROM task_runs")
        conn.execute("DROP TABLE task_runs")
        conn.execute("ALTER TABLE task_runs_v2 RENAME TO task_runs")
        if counter is not None:
            # The seqs of deleted runs are never reused: keep the old counter.
            conn.execute("DELETE FROM sqlite_sequence WHERE name IN ('task_runs', 'task_runs_v2')")
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('task_runs', ?)", (counter[0],))

    def _migrate_to_3(self) -> None:
        """Schema 3 keeps the parent run's id in a column: add it where missing (a table
        rebuilt by :meth:`_migrate_to_2` has it) and fill it from the runs' bodies."""
        conn = self.conn
        present = {row[1] for row in conn.execute("PRAGMA table_info(task_runs)")}
        if "parent_id" not in present:
            conn.execute("ALTER TABLE task_runs ADD COLUMN parent_id TEXT")
        conn.execute(
            "UPDATE task_runs SET parent_id = json_extract(CAST(body AS TEXT), '$.parent_task_run_id')"
            " WHERE parent_id IS NULL"
        )

    def _migrate_to_7(self) -> None:
        """Schema 7 keeps a run's group and whether it is detached in columns (runs stored
        before have neither: the defaults are right); the table of groups is created with
        the others."""
        conn = self.conn
        present = {row[1] for row in conn.execute("PRAGMA table_info(task_runs)")}
        if "group_id" not in present:
            conn.execute("ALTER TABLE task_runs ADD COLUMN group_id TEXT")
        if "detached" not in present:
            conn.execute("ALTER TABLE task_runs ADD COLUMN detached INTEGER NOT NULL DEFAULT 0")

    def _born_cancelled(self, creates: Sequence[TaskRunCreate]) -> dict[int, str]:
        """Which of ``creates`` (by position) are created CANCELLED, and why
        (:func:`~.runs.born_cancelled`); records the groups they name."""
        groups = list(dict.fromkeys(str(c.group_id) for c in creates if c.group_id is not None))
        parents = list(
            dict.fromkeys(c.parent_task_run_id for c in creates if c.parent_task_run_id and not c.detached)
        )
        if not groups and not parents:
            return {}
        now = utcnow().timestamp()
        cancelled: set[str] = set()
        for chunk in _chunks(groups):
            self.conn.executemany(
                "INSERT OR IGNORE INTO task_run_groups (id, created) VALUES (?, ?)", [(g, now) for g in chunk]
            )
            rows = self.conn.execute(
                f"SELECT id FROM task_run_groups WHERE cancelled IS NOT NULL"
                f" AND id IN ({_placeholders(len(chunk))})",
                chunk,
            )
            cancelled.update(row[0] for row in rows)
        parent_states = self.states_of(parents)
        why: dict[int, str] = {}
        for index, create in enumerate(creates):
            parent = parent_states.get(create.parent_task_run_id) if create.parent_task_run_id else None
            reason = born_cancelled(create, parent, str(create.group_id) in cancelled)
            if reason is not None:
                why[index] = reason
        return why

    def create_runs(
        self,
        creates: Sequence[TaskRunCreate],
        clock_now: float | None = None,
        leases: Mapping[int, str] | None = None,
    ) -> list[tuple[TaskRun, QueuedRun | None]]:
        """Insert new runs; a known idempotency key of the same task key, or else a known
        ``id``, gives back its run (and no QueuedRun). The key is scoped to the task key:
        ``a`` and ``b`` with one key are two runs. A new run in a cancelled group, or of a
        cancelled parent (not detached), is written CANCELLED at once; one of ``leases``
        that can be leased is written PENDING, leased (see
        :meth:`~trioworker.server.store.base.Store.create_runs`).

        A known ``id`` answers only for the same task key and idempotency key: otherwise
        :class:`RunIdTaken` is raised and nothing of the batch is written. Creates run one
        at a time in the committer's transaction, so a repeat (in one batch or in a
        concurrent request) always sees the run the first one made. A create with a cache
        key is decided by its key's entry at ``clock_now`` (see
        :meth:`~trioworker.server.store.base.Store.create_runs`).
        """
        clock = time.time() if clock_now is None else clock_now
        out: list[tuple[TaskRun, QueuedRun | None]] = []
        given = [create.id for create in creates if create.id is not None]
        known = {run_id: run for run_id, (_, run) in self._fetch(given).items()} if given else {}
        doomed = self._born_cancelled(creates)
        for index, create in enumerate(creates):
            if create.idempotency_key is not None:
                row = self.conn.execute(
                    "SELECT parameters, body FROM task_runs WHERE task_key = ? AND idempotency_key = ?",
                    (create.task_key, create.idempotency_key),
                ).fetchone()
                if row is not None:
                    out.append((run_from_row(*row), None))
                    continue
            if create.id is not None and create.id in known:
                out.append((same_run(known[create.id], create), None))
                continue
            now = utcnow()
            run = new_run(create, now)
            logged = [run.state]
            # A run born CANCELLED neither uses the cache nor computes its key.
            if run.cache_key is not None and index not in doomed:
                run = self._use_cache(run, now, clock)
                if run.state.type is not StateType.SCHEDULED:
                    logged.append(run.state)
            client = None if leases is None or index in doomed else leases.get(index)
            leased = None if client is None else leased_at_create(run, client, now, clock)
            if leased is not None:
                logged.append(leased.state)
            written = run if leased is None else leased
            parameters, body = orjson.dumps(run.parameters), run_body(written)
            waiting = waits_for(run)
            cur = self.conn.execute(
                "INSERT INTO task_runs"
                " (id, task_key, state_type, scheduled_at, idempotency_key, wait_for, parent_id,"
                " parameters, body, group_id, detached) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    str(run.id),
                    run.task_key,
                    written.state.type.value,
                    epoch(create.scheduled_time) if leased is None else None,
                    create.idempotency_key,
                    orjson.dumps([str(i) for i in waiting]).decode() if waiting else None,
                    None if run.parent_task_run_id is None else str(run.parent_task_run_id),
                    parameters,
                    body,
                    None if run.group_id is None else str(run.group_id),
                    int(run.detached),
                ),
            )
            assert cur.lastrowid is not None
            for state in logged:
                self._log(cur.lastrowid, state)
            if run.tags:
                self.conn.executemany(
                    "INSERT OR IGNORE INTO task_run_tags (tag, run_seq) VALUES (?, ?)",
                    [(tag, cur.lastrowid) for tag in run.tags],
                )
            entry = queued_run(run, cur.lastrowid, len(parameters) + len(body))
            if index in doomed:
                _, cancelled = judged(run, cancel_request(doomed[index]), 0.0)
                assert cancelled is not None  # SCHEDULED -> CANCELLED is always allowed
                run = cancelled
                self._write(cur.lastrowid, run)
            elif leased is not None:
                run = leased
                self.in_flight.wrote(run.id, cur.lastrowid, run)  # its reports need not read it
            known[run.id] = run
            out.append((run, entry))
        return out

    # -- the cache
    def _cache_entry(self, run: TaskRun) -> tuple[TaskRun | None, float | None]:
        """The run the entry of ``run``'s cache key names (None: no entry, or that run is
        gone) and the entry's expiry."""
        row = self.conn.execute(
            "SELECT run_id, expires_at FROM task_run_cache WHERE task_key = ? AND cache_key = ?",
            (run.task_key, run.cache_key),
        ).fetchone()
        if row is None:
            return None, None
        found = self._fetch([uuid.UUID(row[0])])
        owner = found.get(uuid.UUID(row[0]))
        return (None if owner is None else owner[1]), row[1]

    def _use_cache(self, run: TaskRun, now: datetime, clock_now: float) -> TaskRun:
        """``run`` (SCHEDULED, with a cache key) as its key's entry makes it: reused,
        waiting, or computing the key (then the entry names it, in flight)."""
        owner, expires_at = self._cache_entry(run)
        use = cache_use(run, owner, expires_at, clock_now)
        if use is CacheUse.REUSE:
            assert owner is not None
            return reused_copy(run, owner, now)
        if use is CacheUse.WAIT:
            assert owner is not None
            return waiting_copy(run, owner.id, now)
        self.conn.execute(
            "INSERT INTO task_run_cache (task_key, cache_key, run_id, expires_at) VALUES (?, ?, ?, NULL)"
            " ON CONFLICT (task_key, cache_key) DO UPDATE SET run_id = excluded.run_id, expires_at = NULL",
            (run.task_key, run.cache_key, str(run.id)),
        )
        return run

    def _cache_completed(self, run: TaskRun) -> None:
        """The COMPLETED ``run`` made its key's result: the entry keeps it until it expires,
        unless another run computes the key now (a refresh took it over)."""
        self.conn.execute(
            "INSERT INTO task_run_cache (task_key, cache_key, run_id, expires_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (task_key, cache_key) DO UPDATE SET expires_at = excluded.expires_at"
            " WHERE run_id = excluded.run_id",
            (run.task_key, run.cache_key, str(run.id), cache_expires_at(run)),
        )

    def settle_cached(self, run_ids: Sequence[uuid.UUID], clock_now: float) -> list[Change]:
        """Decide again the runs waiting for the run that computed their cache key (see
        :meth:`~trioworker.server.store.base.Store.settle_cached`)."""
        found = self._fetch(run_ids)
        changes: list[Change] = []
        for run_id in sorted(run_ids, key=lambda i: found[i][0] if i in found else 0):
            if run_id not in found:
                changes.append(missing_run_change())
                continue
            seq, run = found[run_id]
            unchanged = SetStateResult(SetStateStatus.ACCEPT, run.state, "unchanged")
            if not waits_on_cache(run):
                queued = None
                if run.state.type is StateType.SCHEDULED:
                    queued = queued_run(run, seq)
                    if not queued.wait_for:
                        self._index_waits(seq, [])  # set SCHEDULED by force meanwhile
                changes.append(Change(unchanged, run, queued))
                continue
            now = utcnow()
            settled = self._use_cache(computing_copy(run, now), now, clock_now)
            if (
                settled.state.type is StateType.SCHEDULED
                and settled.state.state_details.cache_owner == run.state.state_details.cache_owner
            ):
                changes.append(Change(unchanged, run, queued_run(run, seq)))  # it waits for the same run
                continue
            self._write(seq, settled)
            self._index_waits(seq, waits_for(settled))
            found[run_id] = (seq, settled)
            queued = queued_run(settled, seq) if settled.state.type is StateType.SCHEDULED else None
            changes.append(Change(SetStateResult(SetStateStatus.ACCEPT, settled.state), settled, queued))
        return changes

    def _index_waits(self, seq: int, waiting: Sequence[uuid.UUID]) -> None:
        """The run ``seq`` waits for ``waiting`` now (its ``wait_for`` column, read at start)."""
        self.conn.execute(
            "UPDATE task_runs SET wait_for = ? WHERE seq = ?",
            (orjson.dumps([str(i) for i in waiting]).decode() if waiting else None, seq),
        )

    def states_of(self, run_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, StateType]:
        ids = [str(i) for i in run_ids]
        states: dict[uuid.UUID, StateType] = {}
        for chunk in _chunks(ids):
            rows = self.conn.execute(
                f"SELECT id, state_type FROM task_runs WHERE id IN ({_placeholders(len(chunk))})", chunk
            )
            states.update({uuid.UUID(i): StateType(t) for i, t in rows})
        return states

    def runs_by_idempotency_key(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], uuid.UUID]:
        found: dict[tuple[str, str], uuid.UUID] = {}
        for task_key, idempotency_key in dict.fromkeys(keys):
            row = self.conn.execute(
                "SELECT id FROM task_runs WHERE task_key = ? AND idempotency_key = ?",
                (task_key, idempotency_key),
            ).fetchone()
            if row is not None:
                found[(task_key, idempotency_key)] = uuid.UUID(row[0])
        return found

    def read_runs(self, run_ids: Sequence[uuid.UUID]) -> list[TaskRun]:
        found = self._fetch(run_ids)
        return [found[i][1] for i in run_ids if i in found]

    def seq_of(self, run_id: uuid.UUID) -> int | None:
        row = self.conn.execute("SELECT seq FROM task_runs WHERE id = ?", (str(run_id),)).fetchone()
        return None if row is None else int(row[0])

    def list_runs(
        self,
        task_key: str | None,
        state: StateType | None,
        limit: int,
        offset: int,
        parent: uuid.UUID | None = None,
        newest_first: bool = False,
        tags: Sequence[str] = (),
        group: uuid.UUID | None = None,
    ) -> list[TaskRun]:
        where: list[str] = []
        args: list[object] = []
        if task_key is not None:
            where.append("task_key = ?")
            args.append(task_key)
        if state is not None:
            where.append("state_type = ?")
            args.append(state.value)
        if parent is not None:
            where.append("parent_id = ?")
            args.append(str(parent))
        for tag in dict.fromkeys(tags):
            where.append("seq IN (SELECT run_seq FROM task_run_tags WHERE tag = ?)")
            args.append(tag)
        if group is not None:
            where.append("group_id = ?")
            args.append(str(group))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        order = "DESC" if newest_first else "ASC"
        rows = self.conn.execute(
            f"SELECT parameters, body FROM task_runs {clause} ORDER BY seq {order} LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        return [run_from_row(p, b) for p, b in rows]

    def find_runs(self, id_prefix: str, limit: int) -> list[TaskRun]:
        # A range on the unique index of ids: every id that starts with the prefix sorts
        # from it up to (not including) the prefix with its last character raised by one.
        if not id_prefix:
            rows = self.conn.execute("SELECT parameters, body FROM task_runs ORDER BY id LIMIT ?", (limit,))
        else:
            end = id_prefix[:-1] + chr(ord(id_prefix[-1]) + 1)
            rows = self.conn.execute(
                "SELECT parameters, body FROM task_runs WHERE id >= ? AND id < ? ORDER BY id LIMIT ?",
                (id_prefix, end, limit),
            )
        return [run_from_row(p, b) for p, b in rows]

    def count_runs(self) -> list[RunCount]:
        rows = self.conn.execute("SELECT task_key, state_type, count(*) FROM task_runs GROUP BY 1, 2")
        return [RunCount(key, StateType(state), n) for key, state, n in rows]

    def count_ended(self, since: datetime, until: datetime | None = None) -> list[EndedCount]:
        # Timestamps are ISO 8601 in UTC: the first 16 characters name the minute, and
        # text order is time order.
        bounds = [since] if until is None else [since, until]
        rows = self.conn.execute(
            "SELECT substr(s.timestamp, 1, 16), r.task_key, s.type, count(*)"
            " FROM task_run_states AS s JOIN task_runs AS r ON r.seq = s.run_seq"
            f" WHERE s.type IN ({_TERMINAL_SQL}) AND s.timestamp >= ?"
            + ("" if until is None else " AND s.timestamp < ?")
            + " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            [bound.astimezone(UTC).isoformat() for bound in bounds],
        )
        return [
            EndedCount(datetime.fromisoformat(f"{minute}:00+00:00"), key, StateType(state), n)
            for minute, key, state, n in rows
        ]

    def oldest_waiting(self, now: datetime) -> list[TaskRun]:
        # SQLite gives the bare column (id) of the row where min() found its value.
        rows = self.conn.execute(
            "SELECT task_key, min(seq), id FROM task_runs WHERE state_type = 'SCHEDULED'"
            " AND (scheduled_at IS NULL OR scheduled_at <= ?) GROUP BY task_key ORDER BY task_key",
            (now.timestamp(),),
        )
        return self.read_runs([uuid.UUID(run_id) for _, _, run_id in rows])

    def history(self, run_id: uuid.UUID) -> list[StateChange] | None:
        seq = self.seq_of(run_id)
        if seq is None:
            return None
        rows = self.conn.execute(
            "SELECT type, name, timestamp, message FROM task_run_states WHERE run_seq = ? ORDER BY rowid",
            (seq,),
        )
        return [StateChange(StateType(t), n, datetime.fromisoformat(ts), m) for t, n, ts, m in rows]

    def claim_runs(
        self,
        run_ids: Sequence[uuid.UUID],
        client_id: str,
        now: datetime,
        known: Mapping[uuid.UUID, TaskRun] | None = None,
    ) -> list[TaskRun]:
        """Claim the runs still SCHEDULED; ``known`` gives runs as the store holds them
        (then their rows are checked, not read and decoded)."""
        found = self._fetch(run_ids) if known is None else self._known(run_ids, known)
        claimed: list[TaskRun] = []
        for run_id in run_ids:
            if run_id not in found:
                continue
            seq, run = found[run_id]
            if run.state.type is not StateType.SCHEDULED:
                continue  # cancelled, deleted or run directly since it was queued
            run = claimed_copy(run, client_id, now)
            self._write(seq, run)
            claimed.append(run)
        return claimed

    def set_states(
        self, requests: Sequence[tuple[uuid.UUID, SetStateRequest]], now: float, holder: str | None = None
    ) -> list[Change]:
        """Judge and apply proposed states; ``now`` is the dispatcher's clock (epoch seconds);
        a report from ``holder`` changes only runs it holds."""
        found = self._fetch({run_id for run_id, _ in requests})
        changes: list[Change] = []
        changed: dict[uuid.UUID, tuple[int, TaskRun]] = {}
        #: Runs whose change cancels their descendants: (index of the change, why).
        roots: dict[uuid.UUID, tuple[int, str]] = {}
        for run_id, request in requests:
            if run_id not in found:
                changes.append(missing_run_change())
                continue
            seq, run = found[run_id]
            if holder is not None and held_elsewhere(run, holder):
                changes.append(leased_elsewhere_change(run))
                continue
            result, changed_run = judged(run, request, now)
            if changed_run is None:
                changes.append(Change(result, run))
                continue
            why = cancels_descendants(run, changed_run)
            if why is not None:
                roots.setdefault(run_id, (len(changes), why))
            run = changed_run
            found[run_id] = changed[run_id] = (seq, run)
            self._log(seq, run.state)
            if run.cache_key is not None and run.state.type is StateType.COMPLETED:
                self._cache_completed(run)
            queued = queued_run(run, seq) if run.state.type is StateType.SCHEDULED else None
            changes.append(Change(result, run, queued))
        for seq, run in changed.values():  # once per run (RUNNING and COMPLETED often come together)
            self._write(seq, run, log_state=False)
        if roots:
            cascaded = self._cancel_descendants({root: why for root, (_, why) in roots.items()}, now)
            for root, (index, _) in roots.items():
                changes[index] = attrs.evolve(changes[index], descendants=tuple(cascaded.get(root, ())))
        return changes

    def _cancel_descendants(
        self, roots: Mapping[uuid.UUID, str], now: float
    ) -> dict[uuid.UUID, list[Change]]:
        """Cancel the descendants of ``roots`` that have not ended, each with the clause
        (:func:`~.runs.cancel_request`) of its root, by root. Detached runs and theirs are
        left alone; ended ones are passed through (their children may still run). One
        recursive query walks the index of parent ids; a run reached from two roots goes
        with the first, and ``UNION`` stops at a run seen before, so even parent ids that
        loop (the API lets a client name any parent) end the walk."""
        rows = self.conn.execute(
            "WITH RECURSIVE tree(id, root) AS ("
            " SELECT r.id, k.value FROM json_each(?) AS k JOIN task_runs AS r ON r.parent_id = k.value"
            " WHERE NOT r.detached"
            " UNION SELECT r.id, tree.root FROM tree JOIN task_runs AS r ON r.parent_id = tree.id"
            " WHERE NOT r.detached)"
            " SELECT r.seq, tree.id, tree.root FROM tree JOIN task_runs AS r ON r.id = tree.id"
            f" WHERE r.state_type NOT IN ({_TERMINAL_SQL}) ORDER BY r.seq",
            (orjson.dumps([str(root) for root in roots]).decode(),),
        ).fetchall()
        first: dict[uuid.UUID, uuid.UUID] = {}
        for _, run_id, root in rows:
            first.setdefault(uuid.UUID(run_id), uuid.UUID(root))
        found = self._fetch(first)
        requests = {root: cancel_request(why) for root, why in roots.items()}
        out: dict[uuid.UUID, list[Change]] = {}
        for run_id, root in first.items():
            if run_id not in found or run_id in roots:
                continue
            seq, run = found[run_id]
            result, cancelled = judged(run, requests[root], now)
            if cancelled is None:
                continue
            self._write(seq, cancelled)
            out.setdefault(root, []).append(Change(result, cancelled))
        return out

    def cancel_group(self, group_id: uuid.UUID, now: float) -> list[Change]:
        """Mark the group cancelled and cancel its runs that have not ended, with their
        descendants (see :meth:`Store.cancel_group <.base.Store.cancel_group>`)."""
        stamp = utcnow().timestamp()
        self.conn.execute(
            "INSERT INTO task_run_groups (id, created, cancelled) VALUES (?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET cancelled = coalesce(cancelled, excluded.cancelled)",
            (str(group_id), stamp, stamp),
        )
        members = [
            uuid.UUID(run_id)
            for (run_id,) in self.conn.execute(
                f"SELECT id FROM task_runs WHERE group_id = ? AND state_type NOT IN ({_TERMINAL_SQL})"
                " ORDER BY seq",
                (str(group_id),),
            )
        ]
        request = cancel_request(group_clause(group_id))
        return self.set_states([(run_id, request) for run_id in members], now)

    def descendants(self, run_id: uuid.UUID, limit: int) -> list[TaskRun]:
        # Level by level (SQLite's queue of a recursive query is first in, first out), and
        # the limit stops the walk: a run with a million descendants costs ``limit`` rows.
        rows = self.conn.execute(
            "WITH RECURSIVE tree(seq, id) AS ("
            " SELECT seq, id FROM task_runs WHERE parent_id = ?"
            " UNION SELECT r.seq, r.id FROM tree JOIN task_runs AS r ON r.parent_id = tree.id LIMIT ?)"
            " SELECT r.parameters, r.body FROM tree JOIN task_runs AS r ON r.seq = tree.seq ORDER BY r.seq",
            (str(run_id), limit),
        )
        return [run_from_row(p, b) for p, b in rows]

    def delete_run_cascading(self, run_id: uuid.UUID, now: float) -> tuple[TaskRun | None, list[Change]]:
        run = self.delete_run(run_id)
        if run is None or run.state.is_terminal:
            return run, []
        cascaded = self._cancel_descendants({run_id: f"run {run_id}, which was deleted"}, now)
        return run, cascaded.get(run_id, [])

    def requeue(
        self,
        run_ids: Sequence[uuid.UUID],
        reason: str,
        max_deliveries: int | None,
        holder: str | None = None,
    ) -> list[Requeued]:
        found = self._fetch(run_ids)
        out: list[Requeued] = []
        now = utcnow()
        for run_id in run_ids:
            if run_id not in found:
                out.append(Requeued(run_id, None, None))
                continue
            seq, run = found[run_id]
            if run.state.type in ACTIVE_STATES and holder is not None and held_elsewhere(run, holder):
                out.append(Requeued(run_id, run.state.type, None))  # another connection has it now
                continue
            if run.state.type not in ACTIVE_STATES:
                # SCHEDULED here: it was leased, but its claim never committed. Index it again.
                queued = queued_run(run, seq) if run.state.type is StateType.SCHEDULED else None
                out.append(Requeued(run_id, run.state.type, queued))
                continue
            run = requeued(run, reason, max_deliveries, now)
            self._write(seq, run)
            queued = queued_run(run, seq) if run.state.type is StateType.SCHEDULED else None
            out.append(Requeued(run_id, run.state.type, queued))
        return out

    def reclaim(
        self, run_ids: Sequence[uuid.UUID], client_id: str
    ) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
        """Give back to ``client_id`` the runs nobody else took (:func:`.runs.reclaimed`)."""
        found = self._fetch(run_ids)
        kept: list[uuid.UUID] = []
        lost: list[uuid.UUID] = []
        now = utcnow()
        for run_id in run_ids:
            if run_id not in found:
                lost.append(run_id)
                continue
            seq, run = found[run_id]
            kept_run = reclaimed(run, client_id, now)
            if kept_run is None:
                lost.append(run_id)
                continue
            if kept_run is not run:  # requeued meanwhile: RUNNING again under client_id
                self._write(seq, kept_run)
            kept.append(run_id)
        return kept, lost

    def delete_run(self, run_id: uuid.UUID) -> TaskRun | None:
        found = self._fetch([run_id])
        if run_id not in found:
            return None
        seq, run = found[run_id]
        self.conn.execute("DELETE FROM task_run_states WHERE run_seq = ?", (seq,))
        self.conn.execute("DELETE FROM task_run_tags WHERE run_seq = ?", (seq,))
        self.conn.execute("DELETE FROM task_run_cache WHERE run_id = ?", (str(run_id),))
        self.conn.execute("DELETE FROM task_runs WHERE seq = ?", (seq,))
        self.in_flight.wrote(run_id, seq, None)
        return run

    def _ended_before(
        self, conditions: str, args: Sequence[object], limit: int
    ) -> list[tuple[int, str, str]]:
        """``(seq, id, end time)`` of ended runs that meet ``conditions`` (on ``s``, the
        state row of the end, and ``r``, the run), those that ended first first.

        Walks the partial index of ends by time, oldest first, and stops at ``limit``
        (``CROSS JOIN`` keeps SQLite from driving the query by the runs' states instead,
        which would read and sort every ended run at each call). A run's end is its last
        state row: a run set back to SCHEDULED has an earlier end row, not its last.
        """
        rows = self.conn.execute(
            "SELECT r.seq, r.id, s.timestamp FROM task_run_states AS s INDEXED BY ix_task_run_states_ended"
            " CROSS JOIN task_runs AS r ON r.seq = s.run_seq"
            f" WHERE s.type IN ({_TERMINAL_SQL}) {conditions}"
            " AND NOT EXISTS (SELECT 1 FROM task_run_states AS later"
            " WHERE later.run_seq = s.run_seq AND later.rowid > s.rowid)"
            " ORDER BY s.timestamp LIMIT ?",
            [*args, limit],
        )
        return [(int(seq), str(run_id), str(ts)) for seq, run_id, ts in rows]

    def purge_ended(
        self, before: datetime, task_key: str | None, state: StateType | None, limit: int
    ) -> list[uuid.UUID]:
        conditions, args = "AND s.timestamp < ?", [before.astimezone(UTC).isoformat()]
        if task_key is not None:
            conditions += " AND r.task_key = ?"
            args.append(task_key)
        if state is not None:
            conditions += " AND r.state_type = ?"
            args.append(state.value)
        ended = self._ended_before(conditions, args, limit)
        for chunk in _chunks(ended):
            seqs, marks = [seq for seq, _, _ in chunk], _placeholders(len(chunk))
            self.conn.execute(f"DELETE FROM task_run_states WHERE run_seq IN ({marks})", seqs)
            self.conn.execute(f"DELETE FROM task_run_tags WHERE run_seq IN ({marks})", seqs)
            self.conn.execute(
                f"DELETE FROM task_run_cache WHERE run_id IN ({marks})", [i for _, i, _ in chunk]
            )
            self.conn.execute(f"DELETE FROM task_runs WHERE seq IN ({marks})", seqs)
        ids = [uuid.UUID(run_id) for _, run_id, _ in ended]
        for (seq, _, _), run_id in zip(ended, ids, strict=True):
            self.in_flight.wrote(run_id, seq, None)
        if task_key is None and state is None:
            # Groups made before then, with no run left: their rows go too.
            self.conn.execute(
                "DELETE FROM task_run_groups WHERE id IN (SELECT g.id FROM task_run_groups AS g"
                " WHERE g.created < ? AND NOT EXISTS (SELECT 1 FROM task_runs AS r WHERE r.group_id = g.id)"
                " LIMIT ?)",
                (before.timestamp(), limit),
            )
        return ids

    def oldest_end(self) -> datetime | None:
        first = self._ended_before("", [], 1)
        return datetime.fromisoformat(first[0][2]) if first else None

    # -- schedules
    def upsert_schedule(self, create: ScheduleCreate, now: datetime) -> tuple[Schedule, bool]:
        found = self.read_schedules(create.name)
        existing = found[0] if found else None
        changed = new_schedule(create, now, existing)
        if changed is None:
            assert existing is not None
            return existing, False
        self._write_schedules([changed])
        return changed, existing is None

    def _write_schedules(self, schedules: Sequence[Schedule]) -> None:
        self.conn.executemany(
            "INSERT INTO schedules (name, next_fire_at, body) VALUES (?, ?, ?) ON CONFLICT (name)"
            " DO UPDATE SET next_fire_at = excluded.next_fire_at, body = excluded.body",
            [(s.name, s.next_fire_time.timestamp(), schedule_body(s)) for s in schedules],
        )

    def read_schedules(self, name: str | None) -> list[Schedule]:
        if name is None:
            rows = self.conn.execute("SELECT body FROM schedules ORDER BY name")
        else:
            rows = self.conn.execute("SELECT body FROM schedules WHERE name = ?", (name,))
        return [schedule_from_body(body) for (body,) in rows]

    def delete_schedule(self, name: str) -> Schedule | None:
        found = self.read_schedules(name)
        existing = found[0] if found else None
        if existing is not None:
            self.conn.execute("DELETE FROM schedules WHERE name = ?", (name,))
        return existing

    def fire_schedules(self, now: float) -> Fired:
        """Fire the schedules due at ``now`` (one server per file: nothing to lock)."""
        due = [
            schedule_from_body(body)
            for (body,) in self.conn.execute(
                "SELECT body FROM schedules WHERE next_fire_at <= ? ORDER BY next_fire_at LIMIT ?",
                (now, FIRE_BATCH),
            )
        ]
        written, created = fire_due(due, now, self.create_runs)
        self._write_schedules(written)
        [(earliest,)] = self.conn.execute("SELECT min(next_fire_at) FROM schedules").fetchall()
        return Fired(created, written, None if earliest is None else max(now, float(earliest)))

    def recover(self, max_deliveries: int) -> list[QueuedRun]:
        held = [
            uuid.UUID(row[0])
            for row in self.conn.execute(f"SELECT id FROM task_runs WHERE state_type IN ({_ACTIVE_SQL})")
        ]
        self.requeue(held, "redelivery", max_deliveries)
        rows = self.conn.execute(
            "SELECT seq, id, task_key, scheduled_at, wait_for FROM task_runs"
            " WHERE state_type = 'SCHEDULED' ORDER BY seq"
        ).fetchall()
        waiting = [uuid.UUID(i) for _, i, _, _, wait in rows if wait]
        owners = {
            run_id: run.state.state_details.cache_owner for run_id, (_, run) in self._fetch(waiting).items()
        }
        return [
            QueuedRun(
                seq,
                uuid.UUID(i),
                key,
                at,
                tuple(uuid.UUID(w) for w in orjson.loads(wait or "[]")),
                cache_owner=owners.get(uuid.UUID(i)),
            )
            for seq, i, key, at, wait in rows
        ]


# --------------------------------------------------------------------------- committer


def _run_all(ops: _SQLiteOps, group: list[Pending[_SQLiteOps, object]]) -> Exception | None:
    """Run the operations one after the other in the open transaction, without savepoints
    (two statements an operation saved): the error of the first that fails (the others
    are not run then, and the transaction must be rolled back), or None."""
    for pending in group:
        try:
            pending.value = pending.op(ops)
        except Exception as exc:
            ops.in_flight.op_done(ok=False)
            return exc
        ops.in_flight.op_done(ok=True)
    return None


def _run_one(ops: _SQLiteOps, pending: Pending[_SQLiteOps, object]) -> None:
    """Run one operation in its own savepoint: its failure undoes only its own writes."""
    conn = ops.conn
    conn.execute("SAVEPOINT op")
    try:
        pending.value = pending.op(ops)
    except Exception as exc:
        conn.execute("ROLLBACK TO op")
        ops.in_flight.op_done(ok=False)
        pending.error = exc
    else:
        ops.in_flight.op_done(ok=True)
    conn.execute("RELEASE op")


@contextmanager
def _opening(path: str) -> Iterator[None]:
    """Opening the database ``path``: what fails (the file system, SQLite) is a
    :class:`StoreError` of one line naming the file."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        shown = path if path == ":memory:" else os.path.abspath(path)
        folder = Path(os.path.dirname(shown))
        if isinstance(exc, FileNotFoundError | NotADirectoryError) and not folder.is_dir():
            # The server makes no folder (a typo would leave a stray tree behind): say which
            # one is missing, or which file stands where a folder should be.
            found = next(f for f in (folder, *folder.parents) if f.exists() or f == f.parent)
            reason = (
                f"{found} is a file, not a folder"
                if found.is_file()
                else f"the folder {folder} does not exist"
            )
        elif isinstance(exc, OSError) and exc.strerror:
            where = exc.filename and os.path.abspath(exc.filename)
            reason = exc.strerror if where in (None, shown) else f"{where}: {exc.strerror}"
        else:
            reason = str(exc) or type(exc).__name__
        raise StoreError(f"cannot open the database {shown}: {reason}") from None


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=256)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def _connect_committer(path: str) -> sqlite3.Connection:
    """The committer's connection: it never checkpoints (a checkpoint copies the log into
    the file and syncs it, milliseconds that must not fall on a commit made on the Trio
    thread); the store's checkpointer does, on a thread (:meth:`SQLiteStore._checkpoint_forever`)."""
    conn = _connect(path)
    if path != ":memory:":
        conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


#: Operations committed between two checkpoints of the write-ahead log. SQLite's own
#: default is a checkpoint once the log holds 1,000 pages; an operation writes a few.
CHECKPOINT_EVERY: Final = 400


class SQLiteStore(GroupCommitStore[_SQLiteOps]):
    """The embedded :class:`~trioworker.server.store.base.Store`. Open it with :meth:`open`;
    it lives as long as that block."""

    def __init__(
        self, conn: sqlite3.Connection, send: trio.MemorySendChannel[Pending[_SQLiteOps, object]]
    ) -> None:
        super().__init__(_SQLiteOps(conn), send)
        self.path: str = ""
        #: The connection that counts runs for the operator's view, beside the committer's
        #: (None: in memory, where the committer's connection is the only way in). It also
        #: checkpoints the write-ahead log.
        self._reader: _SQLiteOps | None = None
        self._commits_inline = True
        self._since_checkpoint = 0
        self._checkpoint_wanted = trio.Event()
        self._checkpoints = 0
        #: Set (and replaced) at each checkpoint's end.
        self._checkpoint_done = trio.Event()

    @property
    def location(self) -> str:
        """The database file (or ``":memory:"``)."""
        return self.path

    @property
    def kind(self) -> str:
        return "sqlite"

    async def live_servers(self, here: LiveServer) -> list[LiveServer]:
        """``[here]``: one server has the file to itself."""
        await trio.lowlevel.checkpoint()
        return [here]

    @classmethod
    @asynccontextmanager
    async def open(cls, path: str | Path) -> AsyncIterator[SQLiteStore]:
        """Open (creating or migrating) the database at ``path`` and run its committer.

        ``path`` is anything :func:`database_path` takes. The file itself is locked for the
        life of the block (``flock``), so two servers never share one file, whatever path,
        symlink or hard link each was given.

        Raises:
            ValueError: ``path`` is not a database this store can open.
            DatabaseInUse: another server (or store) has the file open.
            StoreError: the file cannot be opened, created or read as a database: one line
                naming it (``cannot open the database /abs/path.db: file is not a database``).

        **Resource handling:** the committer task and the connections (the committer's, and
        a second one for the counts of the operator's view, which read many rows and must
        not hold up commits) live exactly as long as the ``async with`` block. The committer
        is shielded from cancellation: when the block is cancelled, the cleanup code of the
        block (a websocket handing back its runs) can still use the store; the committer
        stops once the block has ended and what was queued is done. Operations submitted
        after that fail with StoreError.
        """
        path = database_path(path)
        with _opening(path):
            lock = await trio.to_thread.run_sync(lock_file, path)
        try:
            with _opening(path):
                conn = await trio.to_thread.run_sync(_connect_committer, path)
            send, receive = trio.open_memory_channel[Pending[_SQLiteOps, object]](math.inf)
            store = cls(conn, send)
            store.path = path
            try:
                with _opening(path):
                    await trio.to_thread.run_sync(store._ops.migrate)
                    if path != ":memory:":
                        store._reader = _SQLiteOps(await trio.to_thread.run_sync(_connect, path))
                        store._reads_beside = True
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(store._commit_and_checkpoint, receive)
                    try:
                        yield store
                    finally:
                        send.close()  # the committer finishes what is queued, then returns
            finally:
                send.close()
                with trio.CancelScope(shield=True):
                    if store._reader is not None:
                        await store._close_reader(store._reader.conn.close)  # after a count under way
                    await trio.to_thread.run_sync(conn.close)
        finally:
            if lock is not None:
                os.close(lock)  # only now: every SQLite connection to the file is closed

    async def _commit_and_checkpoint(
        self, receive: trio.MemoryReceiveChannel[Pending[_SQLiteOps, object]]
    ) -> None:
        """The committer, and beside it the checkpointer, until the committer is done."""
        async with trio.open_nursery() as nursery:
            if self._reader is not None:
                nursery.start_soon(self._checkpoint_forever)
            await self._commit_forever(receive)
            nursery.cancel_scope.cancel()

    def _committed(self, operations: int) -> None:
        self._since_checkpoint += operations
        if self._since_checkpoint >= CHECKPOINT_EVERY:
            self._since_checkpoint = 0
            self._checkpoint_wanted.set()

    async def _checkpoint_forever(self) -> None:
        """Checkpoint the write-ahead log (PASSIVE: it never holds up the committer) each
        time the committer asks, on a worker thread, on the reading connection."""
        while True:
            await self._checkpoint_wanted.wait()
            self._checkpoint_wanted = trio.Event()
            async with self._reader_lock:
                if self._reader_closed or self._reader is None:
                    return
                await trio.to_thread.run_sync(self._checkpoint, self._reader.conn)
            self._checkpoint_done.set()
            self._checkpoint_done = trio.Event()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the next one tries again; the log only grows meanwhile
            log.warning("checkpoint of %s failed: %s", self.path, exc)
        else:
            self._checkpoints += 1

    def _read_beside(self, op: Callable[[_SQLiteOps], T]) -> T:
        """Run ``op`` on the reader connection: WAL lets it read while the committer writes,
        and it sees every transaction committed before it began."""
        assert self._reader is not None
        try:
            return op(self._reader)
        except sqlite3.Error as exc:
            raise StoreError(f"the store could not read: {exc!r}") from None

    def _commit_group(self, group: list[Pending[_SQLiteOps, object]]) -> None:
        """Run ``group`` in one transaction. Operations rarely fail, so they first run without
        savepoints; when one fails, the transaction is rolled back and the group runs again,
        each operation in its own savepoint (a failure undoes only that one's writes)."""
        ops = self._ops
        conn = ops.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            error = _run_all(ops, group)
            if error is not None:
                if conn.in_transaction:  # SQLite ends it itself on some errors
                    conn.execute("ROLLBACK")
                ops.in_flight.group_done(ok=False)
                if len(group) == 1:
                    group[0].error = error
                    return
                for pending in group:
                    pending.value = None
                conn.execute("BEGIN IMMEDIATE")
                for pending in group:
                    _run_one(ops, pending)
            conn.execute("COMMIT")
        except BaseException:
            ops.in_flight.group_done(ok=False)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        ops.in_flight.group_done(ok=True)
