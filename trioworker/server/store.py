"""Durable storage of task runs: the interface and its SQLite implementation.

SQLite runs in WAL mode on one connection that only worker threads touch: every
operation is a plain function of the connection, queued to a committer task that runs
all operations waiting at that moment in one transaction (group commit) inside one
``trio.to_thread.run_sync`` call. So the Trio thread never blocks on SQLite, and a burst
of 1,000 writes costs one commit, not 1,000.

Each operation is atomic (its own savepoint) and reads what it changes inside the same
transaction, so state checks and updates cannot interleave: the store is the single
source of truth, and the dispatcher's memory is only an index over it.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import sys
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Generic, Protocol, TypeVar

import attrs
import orjson
import trio

from trioworker.models import (
    ACTIVE_STATES,
    SetStateRequest,
    SetStateResult,
    SetStateStatus,
    State,
    StateChange,
    StateDetails,
    StateType,
    TaskRun,
    TaskRunCreate,
    converter,
    make_state,
    utcnow,
)
from trioworker.server.rules import decide

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: 1: the first schema; 2: an idempotency key is unique per task key, not across all keys.
SCHEMA_VERSION: Final = 2

#: Most operations one group commit takes (bounds one thread call's latency).
MAX_GROUP: Final = 512

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
    parameters BLOB NOT NULL,
    body BLOB NOT NULL
)"""
_RUNS_COLUMNS: Final = (
    "seq",
    "id",
    "task_key",
    "state_type",
    "scheduled_at",
    "idempotency_key",
    "wait_for",
    "parameters",
    "body",
)
#: Run after the tables exist (every statement may run again).
_INDEXES: Final = (
    "CREATE INDEX IF NOT EXISTS ix_task_runs_state ON task_runs (state_type, seq)",
    "CREATE INDEX IF NOT EXISTS ix_task_runs_key ON task_runs (task_key, seq)",
    # NULLs are distinct in a unique index: runs without a key never collide.
    "CREATE UNIQUE INDEX IF NOT EXISTS ix_task_runs_idempotency ON task_runs (task_key, idempotency_key)",
    "CREATE INDEX IF NOT EXISTS ix_task_run_states_run ON task_run_states (run_seq)",
)
_STATES_TABLE: Final = """
CREATE TABLE IF NOT EXISTS task_run_states (
    run_seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    name TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    message TEXT
)"""


class StoreError(Exception):
    """The store cannot do what was asked (closed, or a newer schema than this code knows)."""


class RunIdTaken(Exception):
    """A create gives the id of a run it cannot be a repeat of (another task key or
    idempotency key); the API answers 409."""


def _same_run(run: TaskRun, create: TaskRunCreate) -> TaskRun:
    """``run``, the one ``create`` names by its id, if ``create`` is a repeat of it."""
    if run.task_key != create.task_key:
        raise RunIdTaken(
            f"task run id {run.id} is taken by a run of task {run.task_key!r}, not {create.task_key!r}"
        )
    if run.idempotency_key != create.idempotency_key:
        raise RunIdTaken(
            f"task run id {run.id} is taken by a run of task {run.task_key!r} with idempotency key "
            f"{run.idempotency_key!r}, not {create.idempotency_key!r}"
        )
    return run


class DatabaseInUse(StoreError):
    """Another trioworker server has this database file open (by any name or link): it
    holds the lock on the file."""


#: What a database may be given as (the error for any other URL names them).
SUPPORTED_DATABASES: Final = (
    "a SQLite file path, ':memory:', or a sqlite:// URL "
    "(sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite:// for memory)"
)

_URL_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+)://")


def database_path(db: str | Path) -> str:
    """The SQLite file (or ``":memory:"``) that ``db`` names.

    ``db`` is a file path (``~`` is expanded), ``":memory:"``, or a ``sqlite://`` URL in
    SQLAlchemy's (and Prefect's) form: ``sqlite:///relative.db`` and
    ``sqlite:////absolute/path.db``; ``sqlite://`` is an in-memory database.

    Raises:
        ValueError: ``db`` is empty, or starts with ``file:`` (SQLite would read a URI), or
            a URL of another scheme (only the scheme is named,
            so that a password in the URL is never printed), or a ``sqlite://`` URL with a
            host, a query or a fragment.
    """
    if isinstance(db, Path):
        path = str(db.expanduser())
        # SQLite reads a name that starts with "file:" as a URI: "./" keeps it a file name.
        return f".{os.sep}{path}" if path[:5].lower() == "file:" else path
    if db[:5].lower() == "file:":
        # SQLite would read it as a URI (file:z.db, file:./z.db?mode=rwc): refused, so one
        # file never has two names that escape its lock, and no stray "file:." folder.
        raise ValueError(f"unsupported database URL scheme 'file'; supported: {SUPPORTED_DATABASES}")
    match = _URL_SCHEME.match(db)
    if match is None:
        if not db.strip():
            raise ValueError(f"the database is empty; give {SUPPORTED_DATABASES}")
        return db if db == ":memory:" else str(Path(db).expanduser())
    scheme = match.group(1)
    if scheme.lower() != "sqlite":
        raise ValueError(f"unsupported database URL scheme {scheme!r}; supported: {SUPPORTED_DATABASES}")
    rest = db[match.end() :]
    if "?" in rest or "#" in rest:
        raise ValueError("a sqlite:// URL takes no query or fragment")
    if rest and not rest.startswith("/"):
        raise ValueError(
            "a sqlite:// URL has no host: write sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    path = urllib.parse.unquote(rest[1:])
    return ":memory:" if path in ("", ":memory:") else database_path(Path(path))


def _lock(path: str) -> int | None:
    """Lock the database file ``path`` itself (creating it empty if missing); returns the
    descriptor that holds the lock.

    The lock follows the file, not its name: every spelling of the path, a symlink and a
    hard link all reach one inode, so they all meet one lock. It is the kernel's
    (``flock``, on Windows a lock file beside the database): it goes with the descriptor, so
    a server that is killed (even with SIGKILL) releases it. On Linux ``flock`` and
    SQLite's own (POSIX ``fcntl``) locks do not interfere, but closing any descriptor of the
    file drops the process's POSIX locks on it: the caller keeps the descriptor open until
    every SQLite connection to the file is closed.

    Raises:
        DatabaseInUse: another process (or another store in this one) holds it.
        OSError: the file cannot be opened or created.
    """
    if path == ":memory:":
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    real = os.path.realpath(path)
    if sys.platform == "win32":  # pragma: no cover - Windows locks are mandatory: not the file
        import msvcrt

        fd = os.open(real + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            os.close(fd)
            raise DatabaseInUse(_in_use(real)) from None
        return fd
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DatabaseInUse(_in_use(real)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _in_use(real: str) -> str:
    return (
        f"the database {real} is in use by another trioworker server; "
        "stop that server first, or use another database"
    )


@attrs.frozen
class QueuedRun:
    """What the dispatcher needs to index a SCHEDULED run: no parameters, no result."""

    seq: int
    id: uuid.UUID
    task_key: str
    #: Epoch seconds when it becomes due; None means now.
    scheduled_at: float | None
    #: Runs that must complete first.
    wait_for: tuple[uuid.UUID, ...] = ()
    #: Bytes the run takes in the store (0 when not known).
    size: int = 0


@attrs.frozen
class Change:
    """The outcome of one state change, for the dispatcher and for waiters."""

    result: SetStateResult
    run: TaskRun | None
    #: Set when the run became SCHEDULED (again): it goes back into the ready queues.
    queued: QueuedRun | None = None


@attrs.frozen
class Requeued:
    """What became of one held run when its connection let go of it."""

    id: uuid.UUID
    state_type: StateType | None
    queued: QueuedRun | None


class Store(Protocol):
    """What the server needs from storage. :class:`SQLiteStore` is the embedded default."""

    async def create_runs(
        self, creates: Sequence[TaskRunCreate]
    ) -> list[tuple[TaskRun, QueuedRun | None]]: ...
    async def read_run(self, run_id: uuid.UUID) -> TaskRun | None: ...
    async def read_runs(self, run_ids: Sequence[uuid.UUID]) -> list[TaskRun]: ...
    async def list_runs(
        self, *, task_key: str | None, state: StateType | None, limit: int, offset: int
    ) -> list[TaskRun]: ...
    async def history(self, run_id: uuid.UUID) -> list[StateChange] | None: ...
    async def claim_runs(self, run_ids: Sequence[uuid.UUID], client_id: str) -> list[TaskRun]: ...
    def claim_runs_soon(
        self, runs: Sequence[TaskRun], client_id: str, now: datetime
    ) -> QueuedOp[list[TaskRun]]: ...
    async def set_states(
        self, requests: Sequence[tuple[uuid.UUID, SetStateRequest]], *, now: float
    ) -> list[Change]: ...
    async def requeue(
        self, run_ids: Sequence[uuid.UUID], *, reason: str, max_deliveries: int | None
    ) -> list[Requeued]: ...
    async def delete_run(self, run_id: uuid.UUID) -> TaskRun | None: ...
    async def reclaim(
        self, run_ids: Sequence[uuid.UUID], client_id: str
    ) -> tuple[list[uuid.UUID], list[uuid.UUID]]: ...
    async def recover(self, max_deliveries: int) -> list[QueuedRun]: ...
    async def states_of(self, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, StateType]: ...
    async def read_ended(self, run_ids: Sequence[uuid.UUID]) -> tuple[list[TaskRun], set[uuid.UUID]]: ...


# --------------------------------------------------------------------------- rows


def _row_to_run(parameters: bytes, body: bytes) -> TaskRun:
    data = orjson.loads(body)
    data["parameters"] = orjson.loads(parameters)
    return converter.structure(data, TaskRun)


def _body(run: TaskRun) -> bytes:
    data = converter.unstructure(run)
    del data["parameters"]
    return orjson.dumps(data)


def claimed_copy(run: TaskRun, client_id: str, now: datetime) -> TaskRun:
    """``run`` as a claim leaves it: PENDING, leased to ``client_id``, one delivery more."""
    return attrs.evolve(
        run,
        state=make_state(StateType.PENDING, timestamp=now, details=StateDetails(client_id=client_id)),
        updated=now,
        delivery_count=run.delivery_count + 1,
    )


def _epoch(when: datetime | None) -> float | None:
    return None if when is None else when.timestamp()


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
#: Most in-flight runs kept decoded in memory (beyond that, reports read the store).
IN_FLIGHT_MAX_RUNS: Final = 10_000


class _Ops:
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
                run = _row_to_run(parameters, body)
                found[run.id] = (seq, run)
        return found

    def _known(
        self, run_ids: Sequence[uuid.UUID], known: Mapping[uuid.UUID, TaskRun]
    ) -> dict[uuid.UUID, tuple[int, TaskRun]]:
        """Like :meth:`_fetch` for runs whose content is known, but only those whose row is
        still SCHEDULED (the rest are not for a claim)."""
        found: dict[uuid.UUID, tuple[int, TaskRun]] = {}
        for chunk in _chunks([str(i) for i in run_ids]):
            rows = self.conn.execute(
                f"SELECT seq, id FROM task_runs WHERE state_type = 'SCHEDULED'"
                f" AND id IN ({_placeholders(len(chunk))})",
                chunk,
            )
            for seq, text_id in rows:
                run_id = uuid.UUID(text_id)
                found[run_id] = (seq, known[run_id])
        return found

    def _write(self, seq: int, run: TaskRun, *, log_state: bool = True) -> None:
        self.conn.execute(
            "UPDATE task_runs SET state_type = ?, scheduled_at = ?, body = ? WHERE seq = ?",
            (run.state.type.value, _epoch(run.state.state_details.scheduled_time), _body(run), seq),
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
            for statement in _INDEXES:
                conn.execute(statement)
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

    def create_runs(self, creates: Sequence[TaskRunCreate]) -> list[tuple[TaskRun, QueuedRun | None]]:
        """Insert new runs; a known idempotency key of the same task key, or else a known
        ``id``, gives back its run (and no QueuedRun). The key is scoped to the task key:
        ``a`` and ``b`` with one key are two runs.

        A known ``id`` answers only for the same task key and idempotency key: otherwise
        :class:`RunIdTaken` is raised and nothing of the batch is written. Creates run one
        at a time in the committer's transaction, so a repeat (in one batch or in a
        concurrent request) always sees the run the first one made.
        """
        out: list[tuple[TaskRun, QueuedRun | None]] = []
        given = [create.id for create in creates if create.id is not None]
        known = {run_id: run for run_id, (_, run) in self._fetch(given).items()} if given else {}
        for create in creates:
            if create.idempotency_key is not None:
                row = self.conn.execute(
                    "SELECT parameters, body FROM task_runs WHERE task_key = ? AND idempotency_key = ?",
                    (create.task_key, create.idempotency_key),
                ).fetchone()
                if row is not None:
                    out.append((_row_to_run(*row), None))
                    continue
            if create.id is not None and create.id in known:
                out.append((_same_run(known[create.id], create), None))
                continue
            now = utcnow()
            run_id = uuid.uuid4() if create.id is None else create.id
            state = make_state(
                StateType.SCHEDULED,
                timestamp=now,
                details=StateDetails(scheduled_time=create.scheduled_time),
            )
            run = TaskRun(
                id=run_id,
                task_key=create.task_key,
                name=create.name or f"{create.task_key}-{run_id.hex[:8]}",
                state=state,
                parameters=create.parameters,
                serializer=create.serializer,
                created=now,
                updated=now,
                idempotency_key=create.idempotency_key,
                tags=list(create.tags),
                context=dict(create.context),
                parent_task_run_id=create.parent_task_run_id,
                wait_for=list(create.wait_for),
            )
            parameters, body = orjson.dumps(run.parameters), _body(run)
            cur = self.conn.execute(
                "INSERT INTO task_runs"
                " (id, task_key, state_type, scheduled_at, idempotency_key, wait_for, parameters, body)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    str(run_id),
                    run.task_key,
                    state.type.value,
                    _epoch(create.scheduled_time),
                    create.idempotency_key,
                    orjson.dumps([str(i) for i in run.wait_for]).decode() if run.wait_for else None,
                    parameters,
                    body,
                ),
            )
            assert cur.lastrowid is not None
            self._log(cur.lastrowid, state)
            known[run_id] = run
            out.append((run, self.queued_of(run, cur.lastrowid, len(parameters) + len(body))))
        return out

    def queued_of(self, run: TaskRun, seq: int, size: int = 0) -> QueuedRun:
        return QueuedRun(
            seq,
            run.id,
            run.task_key,
            _epoch(run.state.state_details.scheduled_time),
            tuple(run.wait_for),
            size,
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

    def read_runs(self, run_ids: Sequence[uuid.UUID]) -> list[TaskRun]:
        found = self._fetch(run_ids)
        return [found[i][1] for i in run_ids if i in found]

    def read_ended(self, run_ids: Sequence[uuid.UUID]) -> tuple[list[TaskRun], set[uuid.UUID]]:
        """The runs that ended, and the ids that exist: only ended rows are decoded."""
        states = self.states_of(run_ids)
        ended = [run_id for run_id, state in states.items() if state.is_terminal]
        return self.read_runs(ended), set(states)

    def seq_of(self, run_id: uuid.UUID) -> int | None:
        row = self.conn.execute("SELECT seq FROM task_runs WHERE id = ?", (str(run_id),)).fetchone()
        return None if row is None else int(row[0])

    def list_runs(
        self, task_key: str | None, state: StateType | None, limit: int, offset: int
    ) -> list[TaskRun]:
        where, args = [], []
        if task_key is not None:
            where.append("task_key = ?")
            args.append(task_key)
        if state is not None:
            where.append("state_type = ?")
            args.append(state.value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self.conn.execute(
            f"SELECT parameters, body FROM task_runs {clause} ORDER BY seq LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        return [_row_to_run(p, b) for p, b in rows]

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

    def set_states(self, requests: Sequence[tuple[uuid.UUID, SetStateRequest]], now: float) -> list[Change]:
        """Judge and apply proposed states; ``now`` is the dispatcher's clock (epoch seconds)."""
        found = self._fetch({run_id for run_id, _ in requests})
        changes: list[Change] = []
        changed: dict[uuid.UUID, tuple[int, TaskRun]] = {}
        for run_id, request in requests:
            if run_id not in found:
                missing = make_state(StateType.CANCELLED, message="the run does not exist")
                changes.append(
                    Change(SetStateResult(SetStateStatus.ABORT, missing, "the run does not exist"), None)
                )
                continue
            seq, run = found[run_id]
            status, why = decide(run.state, request.state, force=request.force)
            if status is not SetStateStatus.ACCEPT or why == "unchanged":
                changes.append(Change(SetStateResult(status, run.state, why), run))
                continue
            run = self._apply(run, request.state, now)
            found[run_id] = changed[run_id] = (seq, run)
            self._log(seq, run.state)
            queued = self.queued_of(run, seq) if run.state.type is StateType.SCHEDULED else None
            changes.append(Change(SetStateResult(status, run.state, None), run, queued))
        for seq, run in changed.values():  # once per run (RUNNING and COMPLETED often come together)
            self._write(seq, run, log_state=False)
        return changes

    def _apply(self, run: TaskRun, state: State, clock_now: float) -> TaskRun:
        now = utcnow()
        details = state.state_details
        if state.type is StateType.SCHEDULED and details.delay_seconds is not None:
            due = datetime.fromtimestamp(clock_now + max(0.0, details.delay_seconds), UTC)
            details = attrs.evolve(details, scheduled_time=due, delay_seconds=None)
        state = attrs.evolve(state, timestamp=now, state_details=details)
        run_count, delivery_count = run.run_count, run.delivery_count
        if state.type is StateType.RUNNING:
            run_count += 1
            if details.client_id is None and run.state.state_details.client_id is not None:
                state = attrs.evolve(
                    state, state_details=attrs.evolve(details, client_id=run.state.state_details.client_id)
                )
        elif state.type is StateType.SCHEDULED:
            # A finished attempt (a retry) or a fresh schedule: the crash guard starts over.
            delivery_count = 0
        return attrs.evolve(run, state=state, updated=now, run_count=run_count, delivery_count=delivery_count)

    def requeue(
        self, run_ids: Sequence[uuid.UUID], reason: str, max_deliveries: int | None
    ) -> list[Requeued]:
        found = self._fetch(run_ids)
        out: list[Requeued] = []
        now = utcnow()
        for run_id in run_ids:
            if run_id not in found:
                out.append(Requeued(run_id, None, None))
                continue
            seq, run = found[run_id]
            if run.state.type not in ACTIVE_STATES:
                # SCHEDULED here: it was leased, but its claim never committed. Index it again.
                queued = self.queued_of(run, seq) if run.state.type is StateType.SCHEDULED else None
                out.append(Requeued(run_id, run.state.type, queued))
                continue
            deliveries = run.delivery_count
            if reason == "release":
                deliveries = max(0, deliveries - 1)  # handed back unopened: not a failed delivery
            if max_deliveries is not None and deliveries >= max_deliveries:
                state = make_state(
                    StateType.CRASHED,
                    timestamp=now,
                    message=f"delivered {deliveries} times without finishing",
                )
            else:
                state = make_state(
                    StateType.SCHEDULED,
                    "Redelivered",
                    timestamp=now,
                    details=StateDetails(reason=reason),
                )
            run = attrs.evolve(run, state=state, updated=now, delivery_count=deliveries)
            self._write(seq, run)
            queued = self.queued_of(run, seq) if state.type is StateType.SCHEDULED else None
            out.append(Requeued(run_id, state.type, queued))
        return out

    def reclaim(
        self, run_ids: Sequence[uuid.UUID], client_id: str
    ) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
        """A reconnected client still works on these runs: give back those nobody else took.

        Returns ``(kept, lost)``. A run is kept when it is still held under ``client_id``
        (the old connection is not cleaned up yet) or was requeued and not delivered since;
        a requeued one becomes RUNNING again under ``client_id``. Anything else is lost.
        """
        found = self._fetch(run_ids)
        kept: list[uuid.UUID] = []
        lost: list[uuid.UUID] = []
        now = utcnow()
        for run_id in run_ids:
            if run_id not in found:
                lost.append(run_id)
                continue
            seq, run = found[run_id]
            state = run.state
            if state.type in ACTIVE_STATES and state.state_details.client_id == client_id:
                kept.append(run_id)
            elif state.type is StateType.SCHEDULED and state.name == "Redelivered":
                resumed = make_state(
                    StateType.RUNNING,
                    timestamp=now,
                    message="resumed by the same client after a reconnect",
                    details=StateDetails(client_id=client_id),
                )
                self._write(seq, attrs.evolve(run, state=resumed, updated=now))
                kept.append(run_id)
            else:
                lost.append(run_id)
        return kept, lost

    def delete_run(self, run_id: uuid.UUID) -> TaskRun | None:
        found = self._fetch([run_id])
        if run_id not in found:
            return None
        seq, run = found[run_id]
        self.conn.execute("DELETE FROM task_run_states WHERE run_seq = ?", (seq,))
        self.conn.execute("DELETE FROM task_runs WHERE seq = ?", (seq,))
        self.in_flight.wrote(run_id, seq, None)
        return run

    def recover(self, max_deliveries: int) -> list[QueuedRun]:
        held = [
            uuid.UUID(row[0])
            for row in self.conn.execute(f"SELECT id FROM task_runs WHERE state_type IN ({_ACTIVE_SQL})")
        ]
        self.requeue(held, "redelivery", max_deliveries)
        rows = self.conn.execute(
            "SELECT seq, id, task_key, scheduled_at, wait_for FROM task_runs"
            " WHERE state_type = 'SCHEDULED' ORDER BY seq"
        )
        return [
            QueuedRun(seq, uuid.UUID(i), key, at, tuple(uuid.UUID(w) for w in orjson.loads(wait or "[]")))
            for seq, i, key, at, wait in rows
        ]


# --------------------------------------------------------------------------- committer


class QueuedOp(Protocol[T_co]):
    """An operation queued for the next group commit."""

    async def result(self) -> T_co: ...


@attrs.define(eq=False)
class _Pending(Generic[T]):
    op: Callable[[_Ops], T]
    done: trio.Event = attrs.field(factory=trio.Event)
    value: T | None = None
    error: BaseException | None = None

    async def result(self) -> T:
        """Wait until it ran (shielded: once queued, its caller sees the outcome)."""
        with trio.CancelScope(shield=True):
            await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]

    def run(self, ops: _Ops) -> None:
        conn = ops.conn
        conn.execute("SAVEPOINT op")
        try:
            self.value = self.op(ops)
        except Exception as exc:
            conn.execute("ROLLBACK TO op")
            ops.in_flight.op_done(ok=False)
            self.error = exc
        else:
            ops.in_flight.op_done(ok=True)
        conn.execute("RELEASE op")


def _connect(path: str) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=256)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def _commit_group(ops: _Ops, group: list[_Pending[object]]) -> None:
    conn = ops.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        for pending in group:
            pending.run(ops)
        conn.execute("COMMIT")
    except BaseException:
        ops.in_flight.group_done(ok=False)
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    ops.in_flight.group_done(ok=True)


@attrs.frozen
class StoreStatistics:
    operations: int
    commits: int


class SQLiteStore:
    """The embedded store. Open it with :meth:`open`; it lives as long as that block."""

    def __init__(self, conn: sqlite3.Connection, send: trio.MemorySendChannel[_Pending[object]]) -> None:
        self._ops = _Ops(conn)
        self._send = send
        self.path: str = ""
        self._operations = 0
        self._commits = 0

    def statistics(self) -> StoreStatistics:
        """How many operations ran, in how many transactions (group commit at work)."""
        return StoreStatistics(operations=self._operations, commits=self._commits)

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

        **Resource handling:** the committer task and the connection live exactly as long as
        the ``async with`` block. The committer is shielded from cancellation: when the
        block is cancelled, the cleanup code of the block (a websocket handing back its
        runs) can still use the store; the committer stops once the block has ended and
        what was queued is done. Operations submitted after that fail with StoreError.
        """
        path = database_path(path)
        lock = await trio.to_thread.run_sync(_lock, path)
        try:
            conn = await trio.to_thread.run_sync(_connect, path)
            send, receive = trio.open_memory_channel[_Pending[object]](math.inf)
            store = cls(conn, send)
            store.path = path
            try:
                await trio.to_thread.run_sync(store._ops.migrate)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(store._commit_forever, receive)
                    try:
                        yield store
                    finally:
                        send.close()  # the committer finishes what is queued, then returns
            finally:
                send.close()
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(conn.close)
        finally:
            if lock is not None:
                os.close(lock)  # only now: every SQLite connection to the file is closed

    async def _commit_forever(self, receive: trio.MemoryReceiveChannel[_Pending[object]]) -> None:
        with trio.CancelScope(shield=True):
            await self._commit_until_closed(receive)

    async def _commit_until_closed(self, receive: trio.MemoryReceiveChannel[_Pending[object]]) -> None:
        group: list[_Pending[object]] = []
        try:
            async for first in receive:
                group = [first]
                while len(group) < MAX_GROUP:
                    try:
                        group.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):  # EndOfChannel: the last group
                        break
                try:
                    await trio.to_thread.run_sync(_commit_group, self._ops, group)
                    self._commits += 1
                    self._operations += len(group)
                except Exception as exc:
                    failed = StoreError(f"the store could not commit: {exc!r}; nothing of it was saved")
                    for pending in group:
                        pending.error = pending.error or failed
                for pending in group:
                    pending.done.set()
                group = []
        finally:
            closed = StoreError("the store was closed before this operation ran")
            for pending in group:
                if not pending.done.is_set():
                    pending.error = closed
                    pending.done.set()
            receive.close()
            while True:
                try:
                    pending = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                pending.error = closed
                pending.done.set()

    def _queue(self, op: Callable[[_Ops], T]) -> _Pending[T]:
        """Queue ``op`` for the next group commit; operations run in the order queued."""
        pending: _Pending[T] = _Pending(op)
        try:
            self._send.send_nowait(pending)  # type: ignore[arg-type]
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise StoreError("the store is closed") from None
        return pending

    async def _run(self, op: Callable[[_Ops], T]) -> T:
        """Queue ``op`` for the next group commit and wait for its result.

        **Cancellation handling:** once queued, an operation always runs and its caller
        always sees the outcome (the wait is shielded; operations take milliseconds). That
        is what keeps memory and disk in step: a claim whose caller was cancelled still
        returns the runs it leased, so they can be handed back.
        """
        return await self._queue(op).result()

    # -- the Store interface
    async def create_runs(self, creates: Sequence[TaskRunCreate]) -> list[tuple[TaskRun, QueuedRun | None]]:
        return await self._run(lambda ops: ops.create_runs(creates))

    async def read_run(self, run_id: uuid.UUID) -> TaskRun | None:
        runs = await self._run(lambda ops: ops.read_runs([run_id]))
        return runs[0] if runs else None

    async def read_runs(self, run_ids: Sequence[uuid.UUID]) -> list[TaskRun]:
        return await self._run(lambda ops: ops.read_runs(run_ids))

    async def list_runs(
        self,
        *,
        task_key: str | None = None,
        state: StateType | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[TaskRun]:
        return await self._run(lambda ops: ops.list_runs(task_key, state, limit, offset))

    async def history(self, run_id: uuid.UUID) -> list[StateChange] | None:
        return await self._run(lambda ops: ops.history(run_id))

    async def claim_runs(self, run_ids: Sequence[uuid.UUID], client_id: str) -> list[TaskRun]:
        now = utcnow()
        return await self._run(lambda ops: ops.claim_runs(run_ids, client_id, now))

    def claim_runs_soon(
        self, runs: Sequence[TaskRun], client_id: str, now: datetime
    ) -> QueuedOp[list[TaskRun]]:
        """Queue a claim of ``runs`` (as the store holds them) and return at once; later
        operations see it done."""
        ids = [run.id for run in runs]
        known = {run.id: run for run in runs}
        return self._queue(lambda ops: ops.claim_runs(ids, client_id, now, known))

    async def set_states(
        self, requests: Sequence[tuple[uuid.UUID, SetStateRequest]], *, now: float
    ) -> list[Change]:
        return await self._run(lambda ops: ops.set_states(requests, now))

    async def requeue(
        self, run_ids: Sequence[uuid.UUID], *, reason: str, max_deliveries: int | None
    ) -> list[Requeued]:
        return await self._run(lambda ops: ops.requeue(run_ids, reason, max_deliveries))

    async def delete_run(self, run_id: uuid.UUID) -> TaskRun | None:
        return await self._run(lambda ops: ops.delete_run(run_id))

    async def reclaim(
        self, run_ids: Sequence[uuid.UUID], client_id: str
    ) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
        return await self._run(lambda ops: ops.reclaim(run_ids, client_id))

    async def recover(self, max_deliveries: int) -> list[QueuedRun]:
        return await self._run(lambda ops: ops.recover(max_deliveries))

    async def states_of(self, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, StateType]:
        return await self._run(lambda ops: ops.states_of(run_ids))

    async def read_ended(self, run_ids: Sequence[uuid.UUID]) -> tuple[list[TaskRun], set[uuid.UUID]]:
        return await self._run(lambda ops: ops.read_ended(run_ids))
