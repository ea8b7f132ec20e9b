"""The PostgreSQL store: the runs in a PostgreSQL database, shared by the servers that use
it (replicas, see :mod:`trioworker.server.replicas`); opened ``exclusive``, a store keeps
the database to itself (see :class:`_Connection`).

psycopg's async API is asyncio-only, so the store uses one blocking connection, only ever
from a worker thread (``trio.to_thread.run_sync``), and shares group commit with the
SQLite store (:class:`~trioworker.server.store.commit.GroupCommitStore`): all operations
waiting at a moment run in one transaction, so a burst costs one commit.

The database holds the truth; memory holds only a cache. Every lease and every condition
is in the SQL, so that servers sharing a database can neither race nor overwrite each
other:

- ``trioworker_task_runs``: one row per run; ``client_id`` (and ``replica_id``) name its
  lease holder while it is PENDING or RUNNING; ``rev`` is a random tag that every write
  changes: a write is conditional on the ``rev`` it read (and rows are read ``FOR
  UPDATE``), and the cache of decoded runs is trusted only for a matching ``rev``.
- ``trioworker_ready``: one row per SCHEDULED run (and only those): the small table that
  claims lock with ``FOR UPDATE SKIP LOCKED``, whatever the number of ended runs. Its
  ``queued_seq`` (a sequence) grows each time a run is queued, requeued included.
- ``trioworker_task_run_states``: every state of every run (the history); the ends
  (terminal states) are indexed by time, for the counts per minute and retention.
- ``trioworker_replicas``: one row per server sharing the database: its heartbeat, and
  what the others show of it (its version, its URL, the workers connected to it);
- ``trioworker_schema``: the schema version; created and migrated on start in one
  transaction under an advisory lock, so servers starting together migrate once.

Idempotency keys are unique per ``(task_key, idempotency_key)`` in the database: two
servers inserting one key at once get one run (``INSERT ... ON CONFLICT DO NOTHING``).

The counts of the operator's view run on a second connection (autocommit, no lock), so that
they never hold up the committer.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import logging
import math
import os
import random
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, TypeVar

import attrs
import cattrs
import orjson
import psycopg
import psycopg.errors
import trio
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from trioworker._version import __version__
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
    converter,
    utcnow,
)
from trioworker.schedules import new_schedule
from trioworker.server.store.base import (
    Change,
    Claimed,
    ConnectedWorker,
    EndedCount,
    Fired,
    Heartbeat,
    LiveServer,
    Notice,
    QueuedRun,
    Requeued,
    RunCount,
    StoreError,
)
from trioworker.server.store.commit import GroupCommitStore, Operations, Pending
from trioworker.server.store.files import DatabaseInUse
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

T = TypeVar("T")

log = logging.getLogger("trioworker.server")

#: The schemes of the URLs this store takes.
SCHEMES: Final = ("postgresql", "postgres")

#: The newest schema this code knows (the PostgreSQL store's own numbering). 1: the first;
#: 2: the parent run's id in a column (a run's children found by index), ends indexed by
#: time, runs indexed by task key and state (their counts read the index only); 3: several
#: servers on one database (a row per server, ready rows of runs that wait for others); 4:
#: each server's row holds its version and the workers connected to it.
#: 5: runs by tag (an index of tags) and the cache (one entry per task key and cache key).
#: 6: schedules (periodic runs).
#: 7: run groups (a run's group and whether it is detached, a table of groups).
SCHEMA_VERSION: Final = 7

#: The first key of the advisory lock held while the schema is created or migrated (the
#: second is the schema's name): "trio" in ASCII.
_MIGRATION_LOCK: Final = 0x7472696F
#: The first key of the advisory lock an exclusive store holds for its life: "tsrv".
_SERVER_LOCK: Final = 0x74737276
#: Seconds a server starting waits for that lock before it says another server has it.
_LOCK_WAIT_SECONDS: Final = 2

_Conn = psycopg.Connection[tuple[Any, ...]]

#: TERMINAL_STATES as an SQL list: the very text of the partial index of ends, which the
#: planner uses only for a query whose condition implies it.
_TERMINAL_SQL: Final = ", ".join(f"'{state.value}'" for state in sorted(TERMINAL_STATES))


#: Rows :func:`_fill_parent_ids` reads at a time.
_FILL_BATCH: Final = 1000


def _fill_parent_ids(conn: _Conn) -> None:
    """Schema 2: copy each run's parent id from its body (read as the store reads runs) to
    the new column, :data:`_FILL_BATCH` rows at a time. Only bodies holding a parent id's
    text are read (a run with a parent has ``"parent_task_run_id":"`` in its body)."""
    last = 0
    while True:
        rows = conn.execute(
            "SELECT seq, body FROM trioworker_task_runs WHERE seq > %b"
            """ AND position('"parent_task_run_id":"'::bytea IN body) > 0 ORDER BY seq LIMIT %b""",
            (last, _FILL_BATCH),
            binary=True,
        ).fetchall()
        if not rows:
            return
        last = rows[-1][0]
        parents = [(seq, orjson.loads(body).get("parent_task_run_id")) for seq, body in rows]
        conn.execute(
            "UPDATE trioworker_task_runs AS r SET parent_id = u.parent_id"
            " FROM unnest(%b::bigint[], %b::uuid[]) AS u(seq, parent_id) WHERE r.seq = u.seq",
            ([seq for seq, parent in parents if parent], [uuid.UUID(p) for _, p in parents if p]),
            binary=True,
        )


def _fill_tags(conn: _Conn) -> None:
    """Schema 5: index the tags of the runs stored before, :data:`_FILL_BATCH` rows at a
    time (only bodies with a tag are read: ``"tags":["``)."""
    last = 0
    while True:
        rows = conn.execute(
            "SELECT seq, body FROM trioworker_task_runs WHERE seq > %b"
            """ AND position('"tags":["'::bytea IN body) > 0 ORDER BY seq LIMIT %b""",
            (last, _FILL_BATCH),
            binary=True,
        ).fetchall()
        if not rows:
            return
        last = rows[-1][0]
        pairs = [
            (seq, tag) for seq, body in rows for tag in dict.fromkeys(orjson.loads(body).get("tags") or ())
        ]
        conn.execute(
            "INSERT INTO trioworker_task_run_tags (tag, run_seq) SELECT tag, run_seq"
            " FROM unnest(%b::text[], %b::bigint[]) AS t(tag, run_seq) ON CONFLICT DO NOTHING",
            ([_text(tag) for _, tag in pairs], [seq for seq, _ in pairs]),
            binary=True,
        )


#: What brings the schema from the version before each key to that version: statements,
#: and functions of the connection (in the migration's transaction).
MIGRATIONS: Final[Mapping[int, tuple[str | Callable[[_Conn], None], ...]]] = {
    1: (
        """CREATE TABLE trioworker_task_runs (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id uuid NOT NULL UNIQUE,
            task_key text NOT NULL,
            state_type text NOT NULL,
            scheduled_at double precision,
            idempotency_key text,
            wait_for uuid[],
            client_id text,
            replica_id uuid,
            rev bigint NOT NULL,
            parameters bytea NOT NULL,
            body bytea NOT NULL,
            CONSTRAINT trioworker_task_runs_idempotency UNIQUE (task_key, idempotency_key)
        )""",
        "CREATE INDEX trioworker_task_runs_key ON trioworker_task_runs (task_key, seq)",
        "CREATE INDEX trioworker_task_runs_state ON trioworker_task_runs (state_type, seq)",
        "CREATE INDEX trioworker_task_runs_replica ON trioworker_task_runs (replica_id)"
        " WHERE replica_id IS NOT NULL",
        "CREATE SEQUENCE trioworker_queued_seq AS bigint",
        """CREATE TABLE trioworker_ready (
            run_seq bigint PRIMARY KEY,
            run_id uuid NOT NULL UNIQUE,
            task_key text NOT NULL,
            scheduled_at double precision,
            queued_seq bigint NOT NULL DEFAULT nextval('trioworker_queued_seq')
        )""",
        "CREATE INDEX trioworker_ready_key ON trioworker_ready (task_key, run_seq)",
        "CREATE INDEX trioworker_ready_queued ON trioworker_ready (queued_seq)",
        # name and message as JSON bytes ({"name": ..., "message": ...}): exact, NUL included.
        """CREATE TABLE trioworker_task_run_states (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            run_seq bigint NOT NULL,
            type text NOT NULL,
            timestamp timestamptz NOT NULL,
            body bytea NOT NULL
        )""",
        "CREATE INDEX trioworker_task_run_states_run ON trioworker_task_run_states (run_seq, id)",
    ),
    2: (
        "ALTER TABLE trioworker_task_runs ADD COLUMN parent_id uuid",
        _fill_parent_ids,
        "CREATE INDEX trioworker_task_runs_parent ON trioworker_task_runs (parent_id, seq)"
        " WHERE parent_id IS NOT NULL",
        # Ends by time (counts per minute, retention): one entry per end, none for other states.
        "CREATE INDEX trioworker_task_run_states_ended ON trioworker_task_run_states (timestamp, id)"
        f" WHERE type IN ({_TERMINAL_SQL})",
        "CREATE INDEX trioworker_task_runs_counts ON trioworker_task_runs (task_key, state_type)",
    ),
    3: (
        # One row per server sharing the database (a replica): it updates heartbeat_at
        # (the database's clock) while it lives; silent for timeout_seconds, it is dead.
        """CREATE TABLE trioworker_replicas (
            id uuid PRIMARY KEY,
            started_at timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now(),
            timeout_seconds double precision NOT NULL,
            address text
        )""",
        # A run created with wait_for waits in the ready table, not claimed, until the
        # runs it waits for have completed.
        "ALTER TABLE trioworker_ready ADD COLUMN waiting boolean NOT NULL DEFAULT false",
        # Runs queued before with wait_for: waiting, until recovery finds their runs done.
        "UPDATE trioworker_ready AS q SET waiting = true FROM trioworker_task_runs AS r"
        " WHERE r.seq = q.run_seq AND r.wait_for IS NOT NULL",
    ),
    4: (
        # What every server shows of the others: the version each runs, and the workers
        # connected to it (a JSON array, see _encode_workers), written at each heartbeat
        # and when a worker comes or goes.
        "ALTER TABLE trioworker_replicas ADD COLUMN version text, ADD COLUMN workers bytea",
    ),
    5: (
        # Every tag of every run, for the runs of a tag (found by index, never a scan).
        """CREATE TABLE trioworker_task_run_tags (
            tag text NOT NULL,
            run_seq bigint NOT NULL,
            PRIMARY KEY (tag, run_seq)
        )""",
        "CREATE INDEX trioworker_task_run_tags_run ON trioworker_task_run_tags (run_seq)",
        _fill_tags,
        # One entry per task key and cache key: the run that computes (or computed) its
        # result, and when that result expires (epoch seconds on the dispatcher's clock;
        # NULL: never, or not completed yet). The primary key decides which of two runs
        # created at once computes it.
        """CREATE TABLE trioworker_cache (
            task_key text NOT NULL,
            cache_key text NOT NULL,
            run_id uuid NOT NULL,
            expires_at double precision,
            PRIMARY KEY (task_key, cache_key)
        )""",
        "CREATE INDEX trioworker_cache_run ON trioworker_cache (run_id)",
    ),
    6: (
        # Periodic runs: one row per schedule, its next fire time in a column (the servers
        # sleep until the earliest; the one that fires a schedule locks its row).
        """CREATE TABLE trioworker_schedules (
            name text PRIMARY KEY,
            next_fire_at double precision NOT NULL,
            body bytea NOT NULL
        )""",
        "CREATE INDEX trioworker_schedules_next ON trioworker_schedules (next_fire_at)",
    ),
    7: (
        # A run's group (trioworker.open_run_group) and whether it is detached (cancelling
        # its parent leaves it alone): runs stored before have neither, the defaults are right.
        "ALTER TABLE trioworker_task_runs ADD COLUMN group_id uuid",
        "ALTER TABLE trioworker_task_runs ADD COLUMN detached boolean NOT NULL DEFAULT false",
        "CREATE INDEX trioworker_task_runs_group ON trioworker_task_runs (group_id, seq)"
        " WHERE group_id IS NOT NULL",
        # One row per group, made by its first run; cancelled_at is set by its cancel, after
        # which runs created in it are created CANCELLED (creates lock the row FOR SHARE).
        """CREATE TABLE trioworker_task_run_groups (
            id uuid PRIMARY KEY,
            created timestamptz NOT NULL DEFAULT now(),
            cancelled_at timestamptz
        )""",
        "CREATE INDEX trioworker_task_run_groups_created ON trioworker_task_run_groups (created)",
    ),
}

#: Most runs the cache of decoded runs keeps (beyond that, operations read the rows).
CACHE_MAX_RUNS: Final = 10_000

#: Seconds before looking again at a schedule due that another server has locked (firing it).
LOCKED_RETRY_SECONDS: Final = 1.0

#: Attempts of one group when the database asks for a retry (deadlock, serialization).
_ATTEMPTS: Final = 3

#: Settings of every connection unless the URL gives them.
_CONNECT_DEFAULTS: Final = {"connect_timeout": "10", "application_name": "trioworker server"}
#: Settings of a listening connection unless the URL gives them: it only reads, so TCP
#: keepalives tell when its peer vanished (about 8 s).
_LISTEN_DEFAULTS: Final = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "1",
    "keepalives_count": "3",
}


# --------------------------------------------------------------------------- the database


@attrs.frozen
class PostgresTarget:
    """The database a ``postgresql://`` URL names, and how to speak of it (never with its
    password)."""

    #: As given (its password included: never shown, not even in the repr).
    url: str = attrs.field(repr=False)
    host: str
    port: str
    dbname: str
    user: str

    @classmethod
    def parse(cls, url: str) -> PostgresTarget:
        """Check ``url`` (``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?PARAMS]``).

        Raises:
            ValueError: not a ``postgresql://`` or ``postgres://`` URL, or one libpq cannot
                read (the message never holds the password).
        """
        scheme, sep, _ = url.partition("://")
        if not sep or scheme.lower() not in SCHEMES:
            raise ValueError(f"not a PostgreSQL URL: {scheme or url!r} (give postgresql://USER@HOST:PORT/DB)")
        try:
            info = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise ValueError(f"cannot read the PostgreSQL URL: {_without_secrets(exc, url)}") from None
        user = str(info.get("user") or os.environ.get("PGUSER") or getpass.getuser())
        return cls(
            url=url,
            host=str(info.get("host") or os.environ.get("PGHOST") or "localhost"),
            port=str(info.get("port") or "5432"),
            dbname=str(info.get("dbname") or user),
            user=user,
        )

    @property
    def location(self) -> str:
        """``postgresql://USER@HOST:PORT/DB``: the URL without its password and parameters."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    @property
    def described(self) -> str:
        return f"PostgreSQL at {self.host}:{self.port} (database {self.dbname!r}, user {self.user!r})"


def _without_secrets(exc: BaseException, url: str) -> str:
    """libpq's complaint about ``url``, with every quoted piece of its user and password
    (or of the whole URL) left out."""
    netloc = url.partition("://")[2].split("/", 1)[0]
    userinfo = netloc.rpartition("@")[0]

    def scrub(match: re.Match[str]) -> str:
        quoted = match.group(1)
        secret = bool(userinfo) and (quoted in userinfo or userinfo in quoted)
        return '"..."' if secret or quoted == url else match.group(0)

    return re.sub(r'"([^"]*)"', scrub, _first_line(exc))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()


def _connect_reason(exc: psycopg.Error) -> str:
    """What libpq says went wrong, without the repeated "connection to server ... failed"."""
    text = _first_line(exc)
    _, sep, reason = text.rpartition(" failed: ")
    reason = reason if sep else text.removeprefix("connection failed: ")
    return reason.removeprefix("FATAL:").strip()


class _Connection:
    """The store's one connection, made (again) on demand: after PostgreSQL restarts, the
    next group reconnects. Only the committer's thread uses it.

    With ``exclusive``, the connection's session holds an advisory lock (:data:`_SERVER_LOCK`
    and the schema's name) for the life of the store, as the SQLite store locks its file:
    a second server on the same database refuses to start (after waiting
    :data:`_LOCK_WAIT_SECONDS` for the session of one that just stopped to end). On a new
    connection the lock is taken again; a session of this store's that the database has not
    noticed is gone yet (the network failed) is ended first.
    """

    def __init__(self, target: PostgresTarget, *, exclusive: bool) -> None:
        self.target = target
        self.exclusive = exclusive
        self.conn: _Conn | None = None
        self._backend: int | None = None  # the server process of the last connection
        self._lock = threading.Lock()  # close() may come from another thread than the committer's

    def get(self) -> _Conn:
        """The open connection, made now if there is none.

        Raises:
            StoreError: PostgreSQL cannot be reached, refuses the login or has no such
                database; :class:`DatabaseInUse` when another server has it.
        """
        with self._lock:
            if self.conn is not None and not self.conn.closed and not self.conn.broken:
                return self.conn
            info = conninfo_to_dict(self.target.url)
            extra = {key: value for key, value in _CONNECT_DEFAULTS.items() if key not in info}
            try:
                conn = psycopg.connect(make_conninfo(self.target.url, **extra), autocommit=True)
            except psycopg.Error as exc:
                raise StoreError(
                    f"cannot connect to {self.target.described}: {_connect_reason(exc)}"
                ) from None
            try:
                if self.exclusive:
                    self._lock_database(conn)
            except BaseException:
                conn.close()
                raise
            self.conn, self._backend = conn, conn.info.backend_pid
            return conn

    def _lock_database(self, conn: _Conn) -> None:
        lock = (_SERVER_LOCK,)
        which = "%b::integer, hashtext(coalesce(current_schema(), ''))"
        try:
            if self._backend is not None:
                [(held,)] = conn.execute(f"SELECT pg_try_advisory_lock({which})", lock).fetchall()
                if held:
                    return
                # Our last session may live on (the network failed, not the server): end it.
                conn.execute("SELECT pg_terminate_backend(%b::integer, 5000)", (self._backend,))
            # Wait a little: the session of a server that just stopped (or was killed) may
            # not have ended yet.
            conn.execute(f"SET lock_timeout = '{_LOCK_WAIT_SECONDS}s'")
            conn.execute(f"SELECT pg_advisory_lock({which})", lock)
            conn.execute("RESET lock_timeout")
        except psycopg.errors.LockNotAvailable:
            raise DatabaseInUse(
                f"the database {self.target.location} is in use by another trioworker server; "
                "stop that server first, or use another database"
            ) from None
        except psycopg.Error as exc:
            raise StoreError(f"cannot lock {self.target.described}: {_first_line(exc)}") from None

    def drop(self) -> None:
        """Forget a broken connection (the next :meth:`get` makes a new one)."""
        with self._lock:
            conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close the connection, its lock released first (so that a server started right
        after this one need not wait for the session to end)."""
        with self._lock:
            conn = self.conn
        if conn is not None and self.exclusive and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock_all()")
        self.drop()


def _lost(exc: BaseException, conn: _Conn) -> bool:
    """``exc`` means the connection is gone (the server restarted, the network failed)."""
    return isinstance(exc, psycopg.OperationalError) and conn.broken


def _retry(exc: BaseException) -> bool:
    """PostgreSQL asks to run the transaction again (it lost a race with another)."""
    return isinstance(exc, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure)


# --------------------------------------------------------------------------- notices

#: Most bytes of one notification's payload (PostgreSQL takes fewer than 8000).
NOTICE_BYTES: Final = 7800


def channel_of(schema: str) -> str:
    """The channel the servers sharing the schema ``schema`` announce their changes on
    (one per schema: the tests run many schemas in one database)."""
    return "trioworker_" + hashlib.sha1(schema.encode()).hexdigest()[:20]


def encode_notices(
    origin: uuid.UUID,
    keys: Sequence[str],
    changed: Sequence[uuid.UUID],
    *,
    workers: bool = False,
    schedules: bool = False,
) -> list[str]:
    """Payloads of at most :data:`NOTICE_BYTES` each announcing, from the server
    ``origin``, ready runs of ``keys`` and the ``changed`` runs: JSON objects
    ``{"o": origin, "k": [key, ...], "c": [run id hex, ...]}``, the first with ``"w": 1``
    when the server's ``workers`` changed; with ``schedules`` (schedules were changed), one
    more ``{"o": origin, "k": [], "c": [], "s": 1}``."""
    head = len(orjson.dumps({"o": origin.hex, "k": [], "c": [], "w": 1}))
    payloads: list[str] = []
    batch_keys: list[str] = []
    batch_ids: list[str] = []
    size = head
    flag = workers

    def flush() -> None:
        nonlocal size, flag
        if batch_keys or batch_ids or flag:
            notice: dict[str, object] = {"o": origin.hex, "k": batch_keys, "c": batch_ids}
            if flag:
                notice["w"] = 1
            payloads.append(orjson.dumps(notice).decode())
        batch_keys.clear()
        batch_ids.clear()
        size = head
        flag = False

    items: list[tuple[list[str], str]] = [(batch_keys, key) for key in keys]
    items += [(batch_ids, run_id.hex) for run_id in changed]
    for batch, item in items:
        cost = len(orjson.dumps(item)) + 1
        if size + cost > NOTICE_BYTES:
            flush()
        batch.append(item)
        size += cost
    flush()
    if schedules:
        payloads.append(orjson.dumps({"o": origin.hex, "k": [], "c": [], "s": 1}).decode())
    return payloads


def decode_notice(payload: str) -> Notice | None:
    """The :class:`Notice` in a payload of :func:`encode_notices` (None: not one)."""
    try:
        data = orjson.loads(payload)
        return Notice(
            uuid.UUID(hex=data["o"]),
            tuple(str(key) for key in data["k"]),
            tuple(uuid.UUID(hex=run_id) for run_id in data["c"]),
            workers=bool(data.get("w")),
            schedules=bool(data.get("s")),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


class PostgresListener:
    """A connection of its own that listens on a schema's channel (:func:`channel_of`).

    It never blocks Trio: it connects on a worker thread, then waits for its socket to be
    readable (``trio.lowlevel.wait_readable``, cancellable at once) and reads what came
    without blocking. TCP keepalives (unless the URL sets them) notice a connection whose
    peer vanished without closing it.
    """

    def __init__(self, target: PostgresTarget, channel: str) -> None:
        self.target = target
        self.channel = channel
        self._conn: _Conn | None = None

    async def connect(self) -> None:
        self.close()
        self._conn = await trio.to_thread.run_sync(self._connect)

    def _connect(self) -> _Conn:
        info = conninfo_to_dict(self.target.url)
        settings = {**_CONNECT_DEFAULTS, **_LISTEN_DEFAULTS}
        extra = {key: value for key, value in settings.items() if key not in info}
        try:
            conn = psycopg.connect(make_conninfo(self.target.url, **extra), autocommit=True)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to {self.target.described}: {_connect_reason(exc)}") from None
        try:
            conn.execute(f'LISTEN "{self.channel}"')
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"cannot listen on {self.target.described}: {_first_line(exc)}") from None
        return conn

    async def receive(self) -> list[Notice]:
        while True:
            conn = self._conn
            if conn is None:
                raise StoreError("the listener is not connected")
            try:
                notices = [n for n in map(decode_notice, (n.payload for n in conn.notifies(timeout=0))) if n]
            except psycopg.Error as exc:
                self.close()
                raise StoreError(
                    f"the connection to {self.target.described} was lost: {_first_line(exc)}"
                ) from None
            if notices:
                return notices
            if conn.closed or conn.broken:
                self.close()
                raise StoreError(f"the connection to {self.target.described} was lost")
            await trio.lowlevel.wait_readable(conn.fileno())

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


# --------------------------------------------------------------------------- rows


def _new_rev() -> int:
    """A fresh ``rev`` tag: random, so two writers never make the same one."""
    return random.getrandbits(63)


def _text(value: str | None) -> str | None:
    """``value`` fit for a text column that is only shown, never read back (PostgreSQL
    text holds no NUL)."""
    return None if value is None else value.replace("\x00", "\ufffd")


def _encode_workers(workers: Sequence[ConnectedWorker]) -> bytes:
    """``workers`` as the ``workers`` column of a server's row holds them: a JSON array of
    what ``GET /api/task_workers`` answers."""
    return orjson.dumps(converter.unstructure(list(workers), list[ConnectedWorker]))


def _decode_workers(data: bytes | None, server_id: uuid.UUID) -> list[ConnectedWorker]:
    """The workers of :func:`_encode_workers`, each connected to ``server_id`` (none when
    the row holds none yet, or what it holds cannot be read: logged)."""
    if data is None:
        return []
    try:
        workers = converter.structure(orjson.loads(data), list[ConnectedWorker])
    except (ValueError, TypeError, KeyError, cattrs.BaseValidationError) as exc:
        log.warning("the workers of server %s cannot be read (%s); shown without them", server_id, exc)
        return []
    return [attrs.evolve(worker, server=server_id) for worker in workers]


def _uuid_array(ids: Sequence[uuid.UUID]) -> str | None:
    """``ids`` as an array literal (NULL when empty), for a per-row array in ``unnest``."""
    return "{" + ",".join(map(str, ids)) + "}" if ids else None


#: A run id's canonical text, as the shape an id prefix must follow.
_ID_TEMPLATE: Final = str(uuid.UUID(int=0))


def _id_range(id_prefix: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """The first and the last run id whose text starts with ``id_prefix`` (ids are ordered
    as their text is); None when no id's text can."""
    digits = id_prefix.replace("-", "")
    shaped = len(id_prefix) <= len(_ID_TEMPLATE) and all(
        (char == "-") == (_ID_TEMPLATE[i] == "-") for i, char in enumerate(id_prefix)
    )
    if not shaped or not all(char in "0123456789abcdef" for char in digits):
        return None
    return uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))


def _lease(run: TaskRun) -> str | None:
    """The ``client_id`` column: the connection that holds the run, while it is held."""
    return _text(run.state.state_details.client_id) if run.state.type in ACTIVE_STATES else None


#: Appends the history rows of :func:`_log_columns` (in order): a statement, or a CTE's body.
_LOG: Final = (
    "INSERT INTO trioworker_task_run_states (run_seq, type, timestamp, body)"
    " SELECT h.run_seq, h.type, h.timestamp, h.body"
    " FROM unnest(%b::bigint[], %b::text[], %b::timestamptz[], %b::bytea[])"
    " WITH ORDINALITY AS h(run_seq, type, timestamp, body, n) ORDER BY h.n"
)


def _log_columns(states: Sequence[tuple[int, State]]) -> tuple[list[Any], ...]:
    """The parameters of :data:`_LOG` for ``(seq, state)`` pairs: name and message go as
    JSON bytes (exact, NUL included)."""
    return (
        [seq for seq, _ in states],
        [state.type.value for _, state in states],
        [state.timestamp for _, state in states],
        [orjson.dumps({"name": state.name, "message": state.message}) for _, state in states],
    )


class _Row(NamedTuple):
    """A row of a run as an operation read it (or will write it)."""

    seq: int
    rev: int
    run: TaskRun
    #: The server that the run is leased through while it is PENDING or RUNNING.
    replica: uuid.UUID | None


class _Cache:
    """Decoded runs by id with the ``rev`` of their row. An entry is used only when the row
    still has that ``rev``, so a write that rolled back (or came from another server)
    makes it stale, never wrong. Only the committer's thread touches it."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, _Row] = {}

    def get(self, run_id: uuid.UUID) -> _Row | None:
        return self.rows.get(run_id)

    def put(self, row: _Row) -> None:
        run = row.run
        if run.state.type.is_terminal:
            self.rows.pop(run.id, None)
        elif run.id in self.rows or len(self.rows) < CACHE_MAX_RUNS:
            self.rows[run.id] = row

    def drop(self, run_id: uuid.UUID) -> None:
        self.rows.pop(run_id, None)


class _PostgresOps(Operations):
    """The synchronous operations; each runs inside the committer's transaction on
    ``conn``, which the committer sets before each group."""

    def __init__(self) -> None:
        self.conn: _Conn | None = None
        self.cache = _Cache()
        #: The server the leases taken here are held through (None: the server is alone).
        self.replica_id: uuid.UUID | None = None
        #: Where this schema's servers hear of each other's changes (set by :meth:`migrate`).
        self.channel: str | None = None
        #: Task keys with runs made ready in this transaction: announced at its end.
        self.ready_keys: set[str] = set()
        #: Runs ended, handed back, cancelled or deleted in this transaction: announced too.
        self.changed: dict[uuid.UUID, None] = {}
        #: The workers this server wrote in its row in this transaction, when they differ
        #: from :attr:`published`: announced too.
        self.workers: bytes | None = None
        #: The workers this server last announced it wrote in its row.
        self.published: bytes | None = None
        #: Rows of dead servers were deleted in this transaction (their workers with them).
        self.reaped_servers = False
        #: Schedules were created, changed or deleted in this transaction: announced too.
        self.schedules_changed = False

    def forget_notices(self) -> None:
        """A transaction starts (again): nothing to announce yet."""
        self.ready_keys.clear()
        self.changed.clear()
        self.workers = None
        self.reaped_servers = False
        self.schedules_changed = False

    def announce(self) -> None:
        """Send what this transaction changed to every server that listens on this
        schema's channel (delivered when it commits; not at all when it rolls back): one
        ``pg_notify`` per :data:`NOTICE_BYTES` of payload, in one statement. Only a
        server with a replica id announces (another has no one to tell)."""
        if self.workers is not None:
            self.published = self.workers
        workers = self.workers is not None or self.reaped_servers
        if (
            self.channel is None
            or self.replica_id is None
            or not (self.ready_keys or self.changed or workers or self.schedules_changed)
        ):
            self.forget_notices()
            return
        payloads = encode_notices(
            self.replica_id,
            sorted(self.ready_keys),
            list(self.changed),
            workers=workers,
            schedules=self.schedules_changed,
        )
        self.forget_notices()
        self._execute("SELECT pg_notify(%b, p) FROM unnest(%b::text[]) AS p", (self.channel, payloads))

    def _holder_after(self, old: _Row, new: TaskRun) -> uuid.UUID | None:
        """The server a run written as ``new`` is leased through: the one it was leased
        through, while it stays held; this one, when it becomes held here."""
        if new.state.type not in ACTIVE_STATES:
            return None
        if old.run.state.type in ACTIVE_STATES:
            return old.replica
        return self.replica_id

    def _execute(self, query: str, params: Sequence[object] = ()) -> psycopg.Cursor[tuple[Any, ...]]:
        assert self.conn is not None, "operations run only inside the committer's transaction"
        return self.conn.execute(query, params, binary=True)

    # -- reading and writing rows
    def _fetch(
        self, run_ids: Iterable[uuid.UUID], *, lock: bool, ready: bool = False, skip_locked: bool = False
    ) -> dict[uuid.UUID, _Row]:
        """The rows of ``run_ids`` that exist; with ``lock``, locked for this transaction
        (``FOR UPDATE``, in ``seq`` order; ``skip_locked``: rows another transaction has
        locked are left out, not waited for). Rows whose ``rev`` the cache knows are not
        sent or decoded again.

        With ``ready``, only runs in ``trioworker_ready`` that no other transaction has
        locked there (``FOR UPDATE SKIP LOCKED``): the ones free to claim.
        """
        ids = list(dict.fromkeys(run_ids))
        if not ids:
            return {}
        known = [(run_id, row[1]) for run_id in ids if (row := self.cache.get(run_id)) is not None]
        source = (
            "SELECT run_seq AS seq FROM trioworker_ready WHERE run_id = ANY(%b::uuid[])"
            " FOR UPDATE SKIP LOCKED"
            if ready
            else "SELECT seq FROM trioworker_task_runs WHERE id = ANY(%b::uuid[])"
        )
        rows = self._execute(
            "SELECT r.seq, r.id, r.rev, r.replica_id,"
            " CASE WHEN k.rev = r.rev THEN NULL ELSE r.parameters END,"
            " CASE WHEN k.rev = r.rev THEN NULL ELSE r.body END"
            f" FROM ({source}) AS q JOIN trioworker_task_runs AS r ON r.seq = q.seq"
            " LEFT JOIN unnest(%b::uuid[], %b::bigint[]) AS k(id, rev) ON k.id = r.id"
            " ORDER BY r.seq"
            + (" FOR UPDATE OF r" if lock else "")
            + (" SKIP LOCKED" if lock and skip_locked else ""),
            (ids, [i for i, _ in known], [rev for _, rev in known]),
        )
        found: dict[uuid.UUID, _Row] = {}
        for seq, run_id, rev, replica, parameters, body in rows:
            if parameters is None:
                cached = self.cache.get(run_id)
                assert cached is not None
                found[run_id] = cached
            else:
                row = _Row(seq, rev, run_from_row(parameters, body), replica)
                self.cache.put(row)
                found[run_id] = row
        return found

    def _save(self, rows: Sequence[_Row], states: Sequence[tuple[int, State]] | None = None) -> None:
        """Write runs, each a :class:`_Row` of its ``seq``, the ``rev`` it was read at, its
        new content and the server it is leased through, only where the row still has that
        ``rev``; keep ``trioworker_ready`` to the SCHEDULED runs (a run queued again gets a
        new ``queued_seq``); append ``states`` (``(seq, state)``, in order; by default each
        run's new state) to the history. One statement. What became ready or changed is
        announced at the end of the transaction (:meth:`announce`).

        Raises:
            StoreError: a row changed since it was read (another server wrote it).
        """
        rows = list({row.seq: row for row in rows}.values())  # a run named twice is written once
        if not rows:
            return
        if states is None:
            states = [(row.seq, row.run.state) for row in rows]
        revs = [_new_rev() for _ in rows]
        [(written,)] = self._execute(
            "WITH w AS (SELECT * FROM unnest(%b::bigint[], %b::bigint[], %b::bigint[], %b::uuid[],"
            " %b::text[], %b::text[], %b::float8[], %b::text[], %b::uuid[], %b::bytea[])"
            " AS u(seq, old_rev, rev, id, task_key, state_type, scheduled_at, client_id, replica_id, body)),"
            " written AS (UPDATE trioworker_task_runs AS r SET rev = w.rev, state_type = w.state_type,"
            " scheduled_at = w.scheduled_at, client_id = w.client_id, replica_id = w.replica_id,"
            " body = w.body FROM w WHERE r.seq = w.seq AND r.rev = w.old_rev RETURNING r.seq),"
            " left_queue AS (DELETE FROM trioworker_ready AS q USING w"
            " WHERE q.run_seq = w.seq AND w.state_type <> 'SCHEDULED'),"
            " queued AS (INSERT INTO trioworker_ready (run_seq, run_id, task_key, scheduled_at)"
            " SELECT seq, id, task_key, scheduled_at FROM w WHERE state_type = 'SCHEDULED'"
            " ON CONFLICT (run_seq) DO UPDATE"
            " SET queued_seq = excluded.queued_seq, scheduled_at = excluded.scheduled_at),"
            f" logged AS ({_LOG})"
            " SELECT count(*) FROM written",
            (
                [row.seq for row in rows],
                [row.rev for row in rows],
                revs,
                [row.run.id for row in rows],
                [row.run.task_key for row in rows],
                [row.run.state.type.value for row in rows],
                [epoch(row.run.state.state_details.scheduled_time) for row in rows],
                [_lease(row.run) for row in rows],
                [row.replica for row in rows],
                [run_body(row.run) for row in rows],
                *_log_columns(states),
            ),
        )
        if written != len(rows):
            raise StoreError(
                f"{len(rows) - written} of {len(rows)} runs changed in the database while they "
                "were being updated; nothing of the operation was saved"
            )
        for row, rev in zip(rows, revs, strict=True):
            self.cache.put(row._replace(rev=rev))
            state_type = row.run.state.type
            if state_type is StateType.SCHEDULED:
                self.ready_keys.add(row.run.task_key)
            if state_type not in ACTIVE_STATES:
                self.changed[row.run.id] = None

    # -- schema
    def migrate(self) -> None:
        """Create the schema, or bring an older one up to :data:`SCHEMA_VERSION`, in one
        transaction under an advisory lock (servers starting together migrate once).

        Raises:
            StoreError: the schema is newer than this code knows, or the search path names
                no schema to create the tables in.
        """
        assert self.conn is not None
        with self.conn.transaction():
            self._execute(
                "SELECT pg_advisory_xact_lock(%b::integer, hashtext(coalesce(current_schema(), '')))",
                (_MIGRATION_LOCK,),
            )
            [(schema, exists)] = self._execute(
                "SELECT current_schema(), to_regclass('trioworker_schema') IS NOT NULL"
            ).fetchall()
            if schema is None:
                raise StoreError(
                    "the database's search_path names no schema that exists: create it, or fix search_path"
                )
            self.channel = channel_of(schema)
            version = 0
            if exists:
                row = self._execute("SELECT version FROM trioworker_schema").fetchone()
                version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the database has trioworker schema version {version}, newer than this "
                    f"trioworker knows ({SCHEMA_VERSION}); upgrade trioworker"
                )
            if version == SCHEMA_VERSION:
                return
            if not exists:
                self._execute("CREATE TABLE trioworker_schema (version integer NOT NULL)")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    if isinstance(statement, str):
                        self._execute(statement)
                    else:
                        statement(self.conn)
            self._execute("DELETE FROM trioworker_schema")
            self._execute("INSERT INTO trioworker_schema (version) VALUES (%b)", (SCHEMA_VERSION,))

    # -- operations
    def create_runs(
        self,
        creates: Sequence[TaskRunCreate],
        clock_now: float | None = None,
        leases: Mapping[int, str] | None = None,
    ) -> list[tuple[TaskRun, QueuedRun | None]]:
        """Insert new runs in one statement; a known idempotency key of the same task key,
        or else a known ``id``, gives back its run (and no QueuedRun), as SQLite's does.
        The runs of ``leases`` that can be leased are then leased through this server, as
        :meth:`claim_runs` leases (see :meth:`~trioworker.server.store.base.Store.create_runs`).

        The database enforces the keys (``ON CONFLICT DO NOTHING``): what it did not insert
        is read back, so a repeat in the same batch or from another server meets the run
        the first one made. A create with a cache key is decided by its key's entry (see
        :meth:`_use_cache`), one at a time.

        Raises:
            RunIdTaken: a given ``id`` belongs to a run the create is not a repeat of.
        """
        if not creates:
            return []
        given = [create.id for create in creates if create.id is not None]
        if len(given) != len(set(given)) or (
            len(creates) > 1 and any(create.cache_key is not None for create in creates)
        ):
            # One id twice, or a cache key: each create must see what the one before it made.
            return [
                result
                for index, create in enumerate(creates)
                for result in self.create_runs(
                    [create], clock_now, None if leases is None or index not in leases else {0: leases[index]}
                )
            ]
        doomed = self._born_cancelled(creates)
        now = utcnow()
        runs = [new_run(create, now) for create in creates]
        reused: TaskRun | None = None
        if runs[0].cache_key is not None and not doomed:  # the only create (not born CANCELLED)
            repeat = self._repeat_of(creates[0])
            if repeat is not None:
                return [(repeat, None)]
            decided = self._use_cache(runs[0], now, time.time() if clock_now is None else clock_now)
            if decided.state.type is StateType.SCHEDULED:
                runs = [decided]
            else:
                reused = decided  # inserted SCHEDULED, then answered from the cache
        parameters = [orjson.dumps(run.parameters) for run in runs]
        bodies = [run_body(run) for run in runs]
        revs = [_new_rev() for _ in runs]
        state = runs[0].state  # the same SCHEDULED state, stamped ``now``, for every new run
        inserted = dict(
            self._execute(
                "WITH w AS (SELECT * FROM unnest(%b::uuid[], %b::text[], %b::float8[], %b::text[],"
                " %b::text[], %b::uuid[], %b::bigint[], %b::bytea[], %b::bytea[], %b::uuid[], %b::boolean[])"
                " WITH ORDINALITY AS u(id, task_key, scheduled_at, idempotency_key, wait_for, parent_id, rev,"
                " parameters, body, group_id, detached, n)),"
                " inserted AS (INSERT INTO trioworker_task_runs (id, task_key, state_type, scheduled_at,"
                " idempotency_key, wait_for, parent_id, rev, parameters, body, group_id, detached)"
                " SELECT id, task_key, 'SCHEDULED', scheduled_at, idempotency_key, wait_for::uuid[],"
                " parent_id, rev, parameters, body, group_id, detached FROM w ORDER BY n"
                " ON CONFLICT DO NOTHING RETURNING id, seq, task_key, scheduled_at, wait_for),"
                " queued AS (INSERT INTO trioworker_ready (run_seq, run_id, task_key, scheduled_at, waiting)"
                " SELECT seq, id, task_key, scheduled_at, wait_for IS NOT NULL FROM inserted ORDER BY seq),"
                " logged AS (INSERT INTO trioworker_task_run_states (run_seq, type, timestamp, body)"
                " SELECT seq, 'SCHEDULED', %b::timestamptz, %b::bytea FROM inserted ORDER BY seq)"
                " SELECT id, seq FROM inserted",
                (
                    [run.id for run in runs],
                    [run.task_key for run in runs],
                    [epoch(create.scheduled_time) for create in creates],
                    [create.idempotency_key for create in creates],
                    [_uuid_array(waits_for(run)) for run in runs],
                    [run.parent_task_run_id for run in runs],
                    revs,
                    parameters,
                    bodies,
                    [run.group_id for run in runs],
                    [run.detached for run in runs],
                    state.timestamp,
                    orjson.dumps({"name": state.name, "message": state.message}),
                ),
            ).fetchall()
        )
        repeats = self._existing([c for c, run in zip(creates, runs, strict=True) if run.id not in inserted])
        tagged = [(tag, seq) for run in runs if (seq := inserted.get(run.id)) is not None for tag in run.tags]
        if tagged:
            self._execute(
                "INSERT INTO trioworker_task_run_tags (tag, run_seq) SELECT tag, run_seq"
                " FROM unnest(%b::text[], %b::bigint[]) AS t(tag, run_seq) ON CONFLICT DO NOTHING",
                ([_text(tag) for tag, _ in tagged], [seq for _, seq in tagged]),
            )
        out: list[tuple[TaskRun, QueuedRun | None]] = []
        cancelled: list[_Row] = []
        leased: list[_Row] = []
        clock = time.time() if clock_now is None else clock_now
        for index, (create, run, params, body, rev) in enumerate(
            zip(creates, runs, parameters, bodies, revs, strict=True)
        ):
            seq = inserted.get(run.id)
            if seq is None:
                out.append((repeats(create), None))
                continue
            entry = queued_run(run, seq, len(params) + len(body))
            if reused is not None:
                self._save([_Row(seq, rev, reused, None)])
                out.append((reused, entry))
                continue
            if index in doomed:
                _, changed = judged(run, cancel_request(doomed[index]), 0.0)
                assert changed is not None  # SCHEDULED -> CANCELLED is always allowed
                cancelled.append(_Row(seq, rev, changed, None))
                out.append((changed, entry))
                continue
            client = None if leases is None else leases.get(index)
            lease = None if client is None else leased_at_create(run, client, now, clock)
            if lease is not None:
                leased.append(_Row(seq, rev, lease, self.replica_id))
                out.append((lease, entry))
                continue
            self.cache.put(_Row(seq, rev, run, None))
            if not waits_for(run):
                self.ready_keys.add(run.task_key)
            out.append((run, entry))
        self._save(cancelled)  # out of the ready table, CANCELLED in the history
        if not leased:
            return out
        self._save(leased)  # out of the ready table, PENDING in the history
        # A repeat in the batch of a run leased in it was read before the lease: give it leased.
        now_leased = {row.run.id: row.run for row in leased}
        return [(now_leased.get(run.id, run), None) if entry is None else (run, entry) for run, entry in out]

    def _repeat_of(self, create: TaskRunCreate) -> TaskRun | None:
        """The run ``create`` repeats, by its idempotency key, else by its ``id``; None for a
        new run.

        Raises:
            RunIdTaken: its ``id`` belongs to a run it is not a repeat of.
        """
        if create.idempotency_key is not None:
            row = self._execute(
                "SELECT parameters, body FROM trioworker_task_runs"
                " WHERE task_key = %b AND idempotency_key = %b",
                (create.task_key, create.idempotency_key),
            ).fetchone()
            if row is not None:
                return run_from_row(*row)
        if create.id is not None:
            found = self._fetch([create.id], lock=False).get(create.id)
            if found is not None:
                return same_run(found.run, create)
        return None

    # -- the cache
    def _use_cache(self, run: TaskRun, now: datetime, clock_now: float) -> TaskRun:
        """``run`` (SCHEDULED, with a cache key) as its key's entry makes it: reused,
        waiting, or computing the key (then the entry names it, in flight).

        The entry's row decides between servers: a new one is inserted (``ON CONFLICT DO
        NOTHING`` waits for another transaction inserting the same key, then sees its
        row), an existing one is locked ``FOR UPDATE`` while it is read and changed.
        """
        key = (run.task_key, run.cache_key)
        while True:
            if self._execute(
                "INSERT INTO trioworker_cache (task_key, cache_key, run_id) VALUES (%b, %b, %b)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                (*key, run.id),
            ).fetchone():
                return run
            entry = self._execute(
                "SELECT run_id, expires_at FROM trioworker_cache WHERE task_key = %b AND cache_key = %b"
                " FOR UPDATE",
                key,
            ).fetchone()
            if entry is not None:
                break  # else deleted meanwhile (its run was deleted): insert again
        owner_id, expires_at = entry
        found = self._fetch([owner_id], lock=False).get(owner_id)
        owner = None if found is None else found.run
        use = cache_use(run, owner, expires_at, clock_now)
        if use is CacheUse.REUSE:
            assert owner is not None
            return reused_copy(run, owner, now)
        if use is CacheUse.WAIT:
            assert owner is not None
            return waiting_copy(run, owner.id, now)
        self._execute(
            "UPDATE trioworker_cache SET run_id = %b, expires_at = NULL"
            " WHERE task_key = %b AND cache_key = %b",
            (run.id, *key),
        )
        return run

    def _cache_completed(self, run: TaskRun) -> None:
        """The COMPLETED ``run`` made its key's result: the entry keeps it until it expires,
        unless another run computes the key now (a refresh took it over)."""
        self._execute(
            "INSERT INTO trioworker_cache AS c (task_key, cache_key, run_id, expires_at)"
            " VALUES (%b, %b, %b, %b) ON CONFLICT (task_key, cache_key)"
            " DO UPDATE SET expires_at = excluded.expires_at WHERE c.run_id = excluded.run_id",
            (run.task_key, run.cache_key, run.id, cache_expires_at(run)),
        )

    def settle_cached(self, run_ids: Sequence[uuid.UUID], clock_now: float) -> list[Change]:
        """Decide again the runs waiting for the run that computed their cache key (see
        :meth:`~trioworker.server.store.base.Store.settle_cached`); rows locked, oldest first."""
        found = self._fetch(run_ids, lock=True)
        changes: list[Change] = []
        for run_id in sorted(run_ids, key=lambda i: found[i].seq if i in found else 0):
            row = found.get(run_id)
            if row is None:
                changes.append(missing_run_change())
                continue
            run = row.run
            unchanged = SetStateResult(SetStateStatus.ACCEPT, run.state, "unchanged")
            if not waits_on_cache(run):
                queued = None
                if run.state.type is StateType.SCHEDULED:
                    queued = queued_run(run, row.seq)
                    if not queued.wait_for:
                        self._index_waits(row.seq, [])  # set SCHEDULED by force meanwhile: free it
                changes.append(Change(unchanged, run, queued))
                continue
            now = utcnow()
            settled = self._use_cache(computing_copy(run, now), now, clock_now)
            if (
                settled.state.type is StateType.SCHEDULED
                and settled.state.state_details.cache_owner == run.state.state_details.cache_owner
            ):
                changes.append(Change(unchanged, run, queued_run(run, row.seq)))  # the same run to wait for
                continue
            self._save([_Row(row.seq, row.rev, settled, None)])
            self._index_waits(row.seq, waits_for(settled))
            queued = queued_run(settled, row.seq) if settled.state.type is StateType.SCHEDULED else None
            changes.append(Change(SetStateResult(SetStateStatus.ACCEPT, settled.state), settled, queued))
        return changes

    def _index_waits(self, seq: int, waiting: Sequence[uuid.UUID]) -> None:
        """The run ``seq`` waits for ``waiting`` now: its ``wait_for`` column, and whether its
        ready row (if it has one) waits."""
        self._execute(
            "WITH w AS (UPDATE trioworker_task_runs SET wait_for = %b::uuid[] WHERE seq = %b)"
            " UPDATE trioworker_ready SET waiting = %b WHERE run_seq = %b",
            (_uuid_array(waiting), seq, bool(waiting), seq),
        )

    def _born_cancelled(self, creates: Sequence[TaskRunCreate]) -> dict[int, str]:
        """Which of ``creates`` (by position) are created CANCELLED, and why
        (:func:`~.runs.born_cancelled`); records the groups they name.

        The rows of their groups and parents are locked ``FOR SHARE`` until the commit: a
        cancel of one of them (which locks it ``FOR UPDATE``) that another server commits
        meanwhile is either seen here, or sees these runs when it looks for what to cancel."""
        groups = list(dict.fromkeys(c.group_id for c in creates if c.group_id is not None))
        parents = list(
            dict.fromkeys(
                c.parent_task_run_id for c in creates if c.parent_task_run_id is not None and not c.detached
            )
        )
        cancelled: set[uuid.UUID] = set()
        if groups:
            self._execute(
                "INSERT INTO trioworker_task_run_groups (id) SELECT unnest(%b::uuid[])"
                " ON CONFLICT DO NOTHING",
                (groups,),
            )
            rows = self._execute(
                "SELECT id, cancelled_at IS NOT NULL FROM trioworker_task_run_groups"
                " WHERE id = ANY(%b::uuid[]) ORDER BY id FOR SHARE",
                (groups,),
            )
            cancelled = {group_id for group_id, is_cancelled in rows if is_cancelled}
        parent_states: dict[uuid.UUID, StateType] = {}
        if parents:
            rows = self._execute(
                "SELECT id, state_type FROM trioworker_task_runs WHERE id = ANY(%b::uuid[])"
                " ORDER BY seq FOR SHARE",
                (parents,),
            )
            parent_states = {run_id: StateType(state) for run_id, state in rows}
        why: dict[int, str] = {}
        for index, create in enumerate(creates):
            parent = parent_states.get(create.parent_task_run_id) if create.parent_task_run_id else None
            reason = born_cancelled(create, parent, create.group_id in cancelled)
            if reason is not None:
                why[index] = reason
        return why

    def _existing(self, creates: Sequence[TaskRunCreate]) -> Callable[[TaskRunCreate], TaskRun]:
        """For creates the database did not insert: a function giving each the run it
        repeats (by idempotency key first, else by ``id``)."""
        keyed = [c for c in creates if c.idempotency_key is not None]
        by_key: dict[tuple[str, str], TaskRun] = {}
        if keyed:
            rows = self._by_idempotency_key(
                [(c.task_key, c.idempotency_key) for c in keyed if c.idempotency_key is not None],
                "r.parameters, r.body",
            )
            by_key = {(key, idem): run_from_row(p, b) for key, idem, p, b in rows}
        ids = [c.id for c in creates if c.id is not None]
        by_id = {run_id: row.run for run_id, row in self._fetch(ids, lock=False).items()}

        def repeated(create: TaskRunCreate) -> TaskRun:
            if create.idempotency_key is not None:
                run = by_key.get((create.task_key, create.idempotency_key))
                if run is not None:
                    return run
            if create.id is not None and create.id in by_id:
                return same_run(by_id[create.id], create)
            # Another server deleted the run it collided with in between: rare, and safe to retry.
            raise StoreError("a run this create repeats was deleted meanwhile; nothing was saved, try again")

        return repeated

    def states_of(self, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, StateType]:
        if not run_ids:
            return {}
        rows = self._execute(
            "SELECT id, state_type FROM trioworker_task_runs WHERE id = ANY(%b::uuid[])", (list(run_ids),)
        )
        return {run_id: StateType(state) for run_id, state in rows}

    def runs_by_idempotency_key(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], uuid.UUID]:
        # Keys with NUL cannot be stored (the API refuses them): none is found.
        pairs = [(task_key, key) for task_key, key in dict.fromkeys(keys) if "\x00" not in task_key + key]
        if not pairs:
            return {}
        return {(task_key, key): run_id for task_key, key, run_id in self._by_idempotency_key(pairs, "r.id")}

    def _by_idempotency_key(
        self, pairs: Sequence[tuple[str, str]], columns: str
    ) -> psycopg.Cursor[tuple[Any, ...]]:
        """The rows ``(task key, idempotency key, *columns)`` of the runs created with
        these pairs, found by the unique index on them (``columns``: of the row ``r``)."""
        return self._execute(
            f"SELECT r.task_key, r.idempotency_key, {columns} FROM trioworker_task_runs AS r"
            " JOIN unnest(%b::text[], %b::text[]) AS k(task_key, idempotency_key)"
            " ON r.task_key = k.task_key AND r.idempotency_key = k.idempotency_key",
            ([task_key for task_key, _ in pairs], [key for _, key in pairs]),
        )

    def read_runs(self, run_ids: Sequence[uuid.UUID]) -> list[TaskRun]:
        found = self._fetch(run_ids, lock=False)
        return [found[i].run for i in run_ids if i in found]

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
        if any("\x00" in text for text in (task_key or "", *tags)):
            return []  # no task key or tag holds NUL (PostgreSQL text cannot)
        # Only the conditions given, so that the planner picks the index that fits them
        # (by key, by state, by parent, or the runs' order alone).
        where: list[str] = []
        args: list[object] = []
        for column, value in (
            ("task_key = %b::text", task_key),
            ("state_type = %b::text", None if state is None else state.value),
            ("parent_id = %b::uuid", parent),
            ("group_id = %b::uuid", group),
        ):
            if value is not None:
                where.append(column)
                args.append(value)
        for tag in dict.fromkeys(tags):
            where.append("seq IN (SELECT run_seq FROM trioworker_task_run_tags WHERE tag = %b::text)")
            args.append(tag)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._execute(
            f"SELECT parameters, body FROM trioworker_task_runs {clause}"
            f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT %b OFFSET %b",
            (*args, limit, offset),
        )
        return [run_from_row(p, b) for p, b in rows]

    def find_runs(self, id_prefix: str, limit: int) -> list[TaskRun]:
        bounds = _id_range(id_prefix)
        if bounds is None:
            return []
        rows = self._execute(
            "SELECT parameters, body FROM trioworker_task_runs WHERE id BETWEEN %b AND %b"
            " ORDER BY id LIMIT %b",
            (*bounds, limit),
        )
        return [run_from_row(p, b) for p, b in rows]

    def count_runs(self) -> list[RunCount]:
        rows = self._execute("SELECT task_key, state_type, count(*) FROM trioworker_task_runs GROUP BY 1, 2")
        return [RunCount(key, StateType(state), n) for key, state, n in rows]

    def count_ended(self, since: datetime, until: datetime | None = None) -> list[EndedCount]:
        rows = self._execute(
            "SELECT date_trunc('minute', s.timestamp AT TIME ZONE 'UTC'), r.task_key, s.type, count(*)"
            " FROM trioworker_task_run_states AS s JOIN trioworker_task_runs AS r ON r.seq = s.run_seq"
            f" WHERE s.type IN ({_TERMINAL_SQL}) AND s.timestamp >= %b"
            + ("" if until is None else " AND s.timestamp < %b")
            + " GROUP BY 1, 2, 3",
            (since,) if until is None else (since, until),
        )
        counts = [EndedCount(minute.replace(tzinfo=UTC), key, StateType(t), n) for minute, key, t, n in rows]
        return sorted(counts, key=lambda c: (c.minute, c.task_key, c.state_type.value))

    def oldest_waiting(self, now: datetime) -> list[TaskRun]:
        # The ready table holds the SCHEDULED runs: walk its task keys along the index (a
        # skip scan, one probe per key), then take each key's first due run from the index.
        rows = self._execute(
            "WITH RECURSIVE keys AS ("
            " (SELECT task_key FROM trioworker_ready ORDER BY task_key LIMIT 1)"
            " UNION ALL SELECT (SELECT q.task_key FROM trioworker_ready AS q WHERE q.task_key > keys.task_key"
            " ORDER BY q.task_key LIMIT 1) FROM keys WHERE keys.task_key IS NOT NULL)"
            " SELECT r.parameters, r.body FROM keys CROSS JOIN LATERAL"
            " (SELECT q.run_seq FROM trioworker_ready AS q WHERE q.task_key = keys.task_key"
            " AND (q.scheduled_at IS NULL OR q.scheduled_at <= %b) ORDER BY q.run_seq LIMIT 1) AS first"
            " JOIN trioworker_task_runs AS r ON r.seq = first.run_seq",
            (now.timestamp(),),
        )
        return sorted((run_from_row(p, b) for p, b in rows), key=lambda run: run.task_key)

    def history(self, run_id: uuid.UUID) -> list[StateChange] | None:
        row = self._execute("SELECT seq FROM trioworker_task_runs WHERE id = %b", (run_id,)).fetchone()
        if row is None:
            return None
        rows = self._execute(
            "SELECT type, timestamp, body FROM trioworker_task_run_states WHERE run_seq = %b ORDER BY id",
            (row[0],),
        )
        changes = []
        for state_type, timestamp, body in rows:
            text = orjson.loads(body)
            changes.append(
                StateChange(StateType(state_type), text["name"], timestamp.astimezone(UTC), text["message"])
            )
        return changes

    def claim_runs(
        self,
        run_ids: Sequence[uuid.UUID],
        client_id: str,
        now: datetime,
        known: Mapping[uuid.UUID, TaskRun] | None = None,
    ) -> list[TaskRun]:
        """Claim the runs still SCHEDULED; ``known`` gives runs as the caller holds them
        (they are claimed only when the store holds them the same).

        The candidates come from ``trioworker_ready`` with ``FOR UPDATE SKIP LOCKED``: a run
        another transaction is claiming right now is skipped, not waited for.
        """
        found = self._fetch(run_ids, lock=True, ready=True)
        claims: dict[uuid.UUID, _Row] = {}
        for run_id in run_ids:
            if run_id not in found or run_id in claims:
                continue
            row = found[run_id]
            if row.run.state.type is not StateType.SCHEDULED:
                continue
            if known is not None:
                given = known[run_id]
                if given is not row.run and given != row.run:
                    continue  # changed since the caller's copy was made
            claims[run_id] = _Row(row.seq, row.rev, claimed_copy(row.run, client_id, now), self.replica_id)
        rows = list(claims.values())
        self._save(rows)
        return [row.run for row in rows]

    def claim_ready(
        self,
        keys: Sequence[str],
        limit: int,
        client_id: str,
        clock_now: float,
        known: Sequence[uuid.UUID] | None = None,
    ) -> Claimed:
        """Claim up to ``limit`` due runs of ``keys`` from ``trioworker_ready``, oldest
        first, for ``client_id`` through this server; due means at ``clock_now`` (epoch
        seconds, the dispatcher's clock). Rows another transaction has locked (another
        server claiming, a run being changed) are skipped, not waited for. When fewer than
        ``limit`` are claimed, :attr:`Claimed.next_due` says when the next delayed run of
        ``keys`` falls due.

        With ``known``, the PENDING runs leased to ``client_id`` through this server and
        not in ``known`` come first (already claimed: a claim whose commit the caller did
        not hear of)."""
        adopted: list[TaskRun] = []
        if known is not None:
            strays = [
                run_id
                for (run_id,) in self._execute(
                    "SELECT id FROM trioworker_task_runs WHERE replica_id = %b AND client_id = %b"
                    " AND state_type = 'PENDING' AND NOT id = ANY(%b::uuid[]) ORDER BY seq LIMIT %b",
                    (self.replica_id, _text(client_id), list(known), limit),
                )
            ]
            adopted = [row.run for row in self._fetch(strays, lock=True, skip_locked=True).values()]
            limit -= len(adopted)
        due = dict(
            self._execute(
                "SELECT run_id, scheduled_at FROM trioworker_ready WHERE task_key = ANY(%b::text[])"
                " AND NOT waiting"
                " AND (scheduled_at IS NULL OR scheduled_at <= %b) ORDER BY run_seq LIMIT %b"
                " FOR UPDATE SKIP LOCKED",
                (list(keys), clock_now, limit),
            ).fetchall()
        )
        ids = list(due)
        found = self._fetch(ids, lock=True, skip_locked=True)
        now = utcnow()
        rows = [
            _Row(row.seq, row.rev, claimed_copy(row.run, client_id, now), self.replica_id)
            for run_id in ids
            if (row := found.get(run_id)) is not None and row.run.state.type is StateType.SCHEDULED
        ]
        ready_since = {
            row.run.id: max(found[row.run.id].run.updated.timestamp(), due[row.run.id] or 0.0) for row in rows
        }
        self._save(rows)
        next_due = None
        if len(rows) < limit and limit > 0:
            [(next_due,)] = self._execute(
                "SELECT min(scheduled_at) FROM trioworker_ready WHERE task_key = ANY(%b::text[])"
                " AND NOT waiting AND scheduled_at > %b",
                (list(keys), clock_now),
            ).fetchall()
        return Claimed(adopted + [row.run for row in rows], next_due, ready_since)

    def set_states(
        self, requests: Sequence[tuple[uuid.UUID, SetStateRequest]], now: float, holder: str | None = None
    ) -> list[Change]:
        """Judge and apply proposed states; ``now`` is the dispatcher's clock (epoch seconds).
        A report from ``holder`` (through this server) changes only runs leased to it here."""
        found = self._fetch((run_id for run_id, _ in requests), lock=True)
        changes: list[Change] = []
        changed: dict[uuid.UUID, _Row] = {}
        logged: list[tuple[int, State]] = []
        #: Runs whose change cancels their descendants: (index of the change, why).
        roots: dict[uuid.UUID, tuple[int, str]] = {}
        for run_id, request in requests:
            if run_id not in found:
                changes.append(missing_run_change())
                continue
            row = found[run_id]
            if holder is not None and held_elsewhere(
                row.run, holder, replica=row.replica, me=self.replica_id
            ):
                changes.append(leased_elsewhere_change(row.run))
                continue
            result, changed_run = judged(row.run, request, now)
            if changed_run is None:
                changes.append(Change(result, row.run))
                continue
            if changed_run.cache_key is not None and changed_run.state.type is StateType.COMPLETED:
                self._cache_completed(changed_run)
            why = cancels_descendants(row.run, changed_run)
            if why is not None:
                roots.setdefault(run_id, (len(changes), why))
            # The write stays conditional on the rev that was read.
            new = _Row(row.seq, row.rev, changed_run, self._holder_after(row, changed_run))
            found[run_id] = changed[run_id] = new
            logged.append((row.seq, changed_run.state))
            queued = (
                queued_run(changed_run, row.seq) if changed_run.state.type is StateType.SCHEDULED else None
            )
            changes.append(Change(result, changed_run, queued))
        self._save(list(changed.values()), logged)  # once per run, every state logged
        if roots:
            cascaded = self._cancel_descendants({root: why for root, (_, why) in roots.items()}, now)
            for root, (index, _) in roots.items():
                changes[index] = attrs.evolve(changes[index], descendants=tuple(cascaded.get(root, ())))
        return changes

    def _cancel_descendants(
        self, roots: Mapping[uuid.UUID, str], now: float
    ) -> dict[uuid.UUID, list[Change]]:
        """Cancel the descendants of ``roots`` that have not ended, each with the clause
        (:func:`~.runs.cancel_request`) of its root, by root; as SQLite's does (detached
        runs and theirs left alone, ended ones passed through, ``UNION`` ending loops). The
        runs found are locked ``FOR UPDATE`` and judged as they are then; their writes are
        announced (:meth:`announce`), so that the servers holding them tell their workers."""
        rows = self._execute(
            "WITH RECURSIVE tree(id, root) AS ("
            " SELECT r.id, k.root FROM unnest(%b::uuid[]) AS k(root)"
            " JOIN trioworker_task_runs AS r ON r.parent_id = k.root WHERE NOT r.detached"
            " UNION SELECT r.id, tree.root FROM tree JOIN trioworker_task_runs AS r ON r.parent_id = tree.id"
            " WHERE NOT r.detached)"
            " SELECT tree.id, tree.root FROM tree JOIN trioworker_task_runs AS r ON r.id = tree.id"
            f" WHERE r.state_type NOT IN ({_TERMINAL_SQL}) ORDER BY r.seq",
            (list(roots),),
        ).fetchall()
        first: dict[uuid.UUID, uuid.UUID] = {}
        for run_id, root in rows:
            if run_id not in roots:
                first.setdefault(run_id, root)
        found = self._fetch(first, lock=True)
        requests = {root: cancel_request(why) for root, why in roots.items()}
        out: dict[uuid.UUID, list[Change]] = {}
        saved: list[_Row] = []
        for run_id, root in first.items():
            row = found.get(run_id)
            if row is None:
                continue
            result, cancelled = judged(row.run, requests[root], now)
            if cancelled is None:
                continue
            saved.append(_Row(row.seq, row.rev, cancelled, None))
            out.setdefault(root, []).append(Change(result, cancelled))
        self._save(saved)
        return out

    def cancel_group(self, group_id: uuid.UUID, now: float) -> list[Change]:
        """Mark the group cancelled (its row locked until the commit: a create in it that
        another server commits meanwhile is either seen here or created CANCELLED), and
        cancel its runs that have not ended, with their descendants."""
        self._execute(
            "INSERT INTO trioworker_task_run_groups AS g (id, cancelled_at) VALUES (%b, now())"
            " ON CONFLICT (id) DO UPDATE SET cancelled_at = coalesce(g.cancelled_at, excluded.cancelled_at)",
            (group_id,),
        )
        members = [
            run_id
            for (run_id,) in self._execute(
                "SELECT id FROM trioworker_task_runs WHERE group_id = %b"
                f" AND state_type NOT IN ({_TERMINAL_SQL}) ORDER BY seq",
                (group_id,),
            )
        ]
        request = cancel_request(group_clause(group_id))
        return self.set_states([(run_id, request) for run_id in members], now)

    def descendants(self, run_id: uuid.UUID, limit: int) -> list[TaskRun]:
        # PostgreSQL computes a recursive query only as far as its reader reads it: the
        # limit stops the walk, which goes level by level (one level per iteration).
        rows = self._execute(
            "WITH RECURSIVE tree(seq, id) AS ("
            " SELECT seq, id FROM trioworker_task_runs WHERE parent_id = %b"
            " UNION SELECT r.seq, r.id FROM tree JOIN trioworker_task_runs AS r ON r.parent_id = tree.id),"
            " found AS MATERIALIZED (SELECT seq FROM tree LIMIT %b)"
            " SELECT r.parameters, r.body FROM found JOIN trioworker_task_runs AS r ON r.seq = found.seq"
            " ORDER BY r.seq",
            (run_id, limit),
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
        """Hand back runs held (by ``holder`` through this server, when given)."""
        found = self._fetch(run_ids, lock=True)

        def mine(row: _Row) -> bool:
            return holder is None or not held_elsewhere(
                row.run, holder, replica=row.replica, me=self.replica_id
            )

        return self._requeue_rows(run_ids, found, reason, max_deliveries, mine)

    def _requeue_rows(
        self,
        run_ids: Sequence[uuid.UUID],
        found: dict[uuid.UUID, _Row],
        reason: str,
        max_deliveries: int | None,
        mine: Callable[[_Row], bool],
    ) -> list[Requeued]:
        """Requeue the held runs of ``found`` for which ``mine`` is true; report each of
        ``run_ids``."""
        out: list[Requeued] = []
        rows: list[_Row] = []
        now = utcnow()
        for run_id in run_ids:
            if run_id not in found:
                out.append(Requeued(run_id, None, None))
                continue
            row = found[run_id]
            run = row.run
            if run.state.type in ACTIVE_STATES:
                if not mine(row):
                    out.append(Requeued(run_id, run.state.type, None))  # another holder has it now
                    continue
                run = requeued(run, reason, max_deliveries, now)
                found[run_id] = new = _Row(row.seq, row.rev, run, None)  # named twice: requeued once
                rows.append(new)
            # SCHEDULED and not held: it was leased, but its claim never committed. Index it again.
            queued = queued_run(run, row.seq) if run.state.type is StateType.SCHEDULED else None
            out.append(Requeued(run_id, run.state.type, queued))
        self._save(rows)
        return out

    def reclaim(
        self, run_ids: Sequence[uuid.UUID], client_id: str
    ) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
        """Give back to ``client_id`` the runs nobody else took (:func:`.runs.reclaimed`),
        leased through this server from now on (whichever server they were leased through)."""
        found = self._fetch(run_ids, lock=True)
        kept: list[uuid.UUID] = []
        lost: list[uuid.UUID] = []
        rows: list[_Row] = []
        logged: list[tuple[int, State]] = []
        now = utcnow()
        for run_id in run_ids:
            row = found.get(run_id)
            kept_run = None if row is None else reclaimed(row.run, client_id, now)
            if row is None or kept_run is None:
                lost.append(run_id)
                continue
            if kept_run is not row.run:  # requeued meanwhile: RUNNING again under client_id
                logged.append((row.seq, kept_run.state))
            if kept_run is not row.run or row.replica != self.replica_id:
                rows.append(_Row(row.seq, row.rev, kept_run, self.replica_id))
            kept.append(run_id)
        self._save(rows, logged)
        return kept, lost

    def delete_run(self, run_id: uuid.UUID) -> TaskRun | None:
        found = self._fetch([run_id], lock=True)
        if run_id not in found:
            return None
        seq, run = found[run_id].seq, found[run_id].run
        self._execute(
            "WITH history AS (DELETE FROM trioworker_task_run_states WHERE run_seq = %b),"
            " queued AS (DELETE FROM trioworker_ready WHERE run_seq = %b),"
            " tagged AS (DELETE FROM trioworker_task_run_tags WHERE run_seq = %b),"
            " cached AS (DELETE FROM trioworker_cache WHERE run_id = %b)"
            " DELETE FROM trioworker_task_runs WHERE seq = %b",
            (seq, seq, seq, run_id, seq),
        )
        self.cache.drop(run_id)
        self.changed[run_id] = None
        return run

    #: The ends (terminal history rows) that are their run's last state, oldest first, along
    #: the partial index of ends by time: a run set back to SCHEDULED has an end that is not
    #: its last row. Format with ``conditions`` (on ``s``, the end, and ``r``, the run).
    _ENDS: Final = (
        "SELECT r.seq, r.id, s.timestamp FROM trioworker_task_run_states AS s"
        " JOIN trioworker_task_runs AS r ON r.seq = s.run_seq"
        f" WHERE s.type IN ({_TERMINAL_SQL}) AND r.state_type IN ({_TERMINAL_SQL}) {{conditions}}"
        " AND NOT EXISTS (SELECT 1 FROM trioworker_task_run_states AS later"
        " WHERE later.run_seq = s.run_seq AND later.id > s.id)"
        " ORDER BY s.timestamp, s.id LIMIT %b"
    )

    def purge_ended(
        self, before: datetime, task_key: str | None, state: StateType | None, limit: int
    ) -> list[uuid.UUID]:
        """Delete the runs that ended first, with their history, in one statement; a run
        another transaction is changing right now is skipped (it may not stay ended)."""
        if task_key is not None and "\x00" in task_key:
            return []
        conditions = "AND s.timestamp < %b"
        args: list[object] = [before]
        if task_key is not None:
            conditions += " AND r.task_key = %b"
            args.append(task_key)
        if state is not None:
            conditions += " AND r.state_type = %b"
            args.append(state.value)
        rows = self._execute(
            f"WITH ended AS ({self._ENDS.format(conditions=conditions)} FOR UPDATE OF r SKIP LOCKED),"
            " history AS (DELETE FROM trioworker_task_run_states AS h USING ended"
            " WHERE h.run_seq = ended.seq),"
            " tagged AS (DELETE FROM trioworker_task_run_tags AS t USING ended WHERE t.run_seq = ended.seq),"
            " cached AS (DELETE FROM trioworker_cache AS c USING ended WHERE c.run_id = ended.id),"
            " runs AS (DELETE FROM trioworker_task_runs AS r USING ended WHERE r.seq = ended.seq)"
            " SELECT id FROM ended ORDER BY timestamp, seq",
            (*args, limit),
        ).fetchall()
        for (run_id,) in rows:
            self.cache.drop(run_id)
            self.changed[run_id] = None
        if task_key is None and state is None:
            # Groups made before then, with no run left: their rows go too.
            self._execute(
                "DELETE FROM trioworker_task_run_groups WHERE id IN"
                " (SELECT g.id FROM trioworker_task_run_groups AS g WHERE g.created < %b"
                " AND NOT EXISTS (SELECT FROM trioworker_task_runs AS r"
                " WHERE r.group_id = g.id) LIMIT %b FOR UPDATE SKIP LOCKED)",
                (before, limit),
            )
        return [run_id for (run_id,) in rows]

    def oldest_end(self) -> datetime | None:
        row = self._execute(self._ENDS.format(conditions=""), (1,)).fetchone()
        return None if row is None else row[2].astimezone(UTC)

    def recover(self, max_deliveries: int) -> list[QueuedRun]:
        """At start: requeue the runs of dead servers (:meth:`reap`: every held run, when no
        other server shares the database), and return every SCHEDULED run in order (with
        its ``wait_for`` while it waits for them)."""
        self.reap(max_deliveries)
        rows = self._execute(
            "SELECT q.run_seq, q.run_id, q.task_key, q.scheduled_at,"
            " CASE WHEN q.waiting THEN r.wait_for END FROM trioworker_ready AS q"
            " JOIN trioworker_task_runs AS r ON r.seq = q.run_seq ORDER BY q.run_seq"
        )
        return self._queued_rows(rows.fetchall())

    def _queued_rows(self, rows: Sequence[tuple[Any, ...]]) -> list[QueuedRun]:
        """Queue entries of ``(seq, id, task key, scheduled_at, wait_for)`` rows; those that
        wait name the run computing their cache key, if they wait for one (read from the run)."""
        waiting = [run_id for _, run_id, _, _, wait in rows if wait]
        owners = {
            run_id: row.run.state.state_details.cache_owner
            for run_id, row in self._fetch(waiting, lock=False).items()
        }
        return [
            QueuedRun(seq, run_id, key, at, tuple(wait or ()), cache_owner=owners.get(run_id))
            for seq, run_id, key, at, wait in rows
        ]

    # -- schedules
    def upsert_schedule(self, create: ScheduleCreate, now: datetime) -> tuple[Schedule, bool]:
        """Create or change a schedule; its row is locked while it is decided (a server firing
        it waits, then sees the change)."""
        found = self._schedules("WHERE name = %b FOR UPDATE", (create.name,))
        existing = found[0] if found else None
        changed = new_schedule(create, now, existing)
        if changed is None:
            assert existing is not None
            return existing, False
        self._write_schedules([changed])
        self.schedules_changed = True
        return changed, existing is None

    def _schedules(self, condition: str, params: Sequence[object] = ()) -> list[Schedule]:
        rows = self._execute(f"SELECT body FROM trioworker_schedules {condition}", params)
        return [schedule_from_body(body) for (body,) in rows]

    def _write_schedules(self, schedules: Sequence[Schedule]) -> None:
        if not schedules:
            return
        self._execute(
            "INSERT INTO trioworker_schedules (name, next_fire_at, body)"
            " SELECT * FROM unnest(%b::text[], %b::float8[], %b::bytea[])"
            " ON CONFLICT (name) DO UPDATE SET next_fire_at = excluded.next_fire_at, body = excluded.body",
            (
                [s.name for s in schedules],
                [s.next_fire_time.timestamp() for s in schedules],
                [schedule_body(s) for s in schedules],
            ),
        )

    def read_schedules(self, name: str | None) -> list[Schedule]:
        if name is None:
            return self._schedules("ORDER BY name")
        return self._schedules("WHERE name = %b", (_text(name),))

    def delete_schedule(self, name: str) -> Schedule | None:
        rows = self._execute(
            "DELETE FROM trioworker_schedules WHERE name = %b RETURNING body", (_text(name),)
        ).fetchall()
        if not rows:
            return None
        self.schedules_changed = True
        return schedule_from_body(rows[0][0])

    def fire_schedules(self, now: float) -> Fired:
        """Fire the schedules due at ``now``: their rows are locked ``FOR UPDATE SKIP
        LOCKED``, so that of servers firing at once, each fires different schedules; a row
        another server fired meanwhile (its commit came first) no longer meets the condition
        when locked, and is left out. The runs' idempotency keys (schedule and tick) are a
        second guard: a tick makes one run."""
        due = self._schedules(
            "WHERE next_fire_at <= %b ORDER BY next_fire_at LIMIT %b FOR UPDATE SKIP LOCKED",
            (now, FIRE_BATCH),
        )
        written, created = fire_due(due, now, self.create_runs)
        self._write_schedules(written)
        [(earliest,)] = self._execute("SELECT min(next_fire_at) FROM trioworker_schedules").fetchall()
        if earliest is None:
            return Fired(created, written, None)
        if earliest <= now and len(due) < FIRE_BATCH:
            # Due, but locked by another server firing it: look again in a moment (it may
            # roll back); once it committed, its next fire time is later.
            return Fired(created, written, now + LOCKED_RETRY_SECONDS)
        return Fired(created, written, max(now, float(earliest)))

    # -- servers sharing the database
    def register_replica(self, silent_for: float, address: str | None) -> None:
        """Add (or renew) this server's row in ``trioworker_replicas``, with the version
        it runs: dead once silent for ``silent_for`` seconds."""
        self._execute(
            "INSERT INTO trioworker_replicas (id, timeout_seconds, address, version) VALUES (%b, %b, %b, %b)"
            " ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(),"
            " timeout_seconds = excluded.timeout_seconds, version = excluded.version,"
            " address = coalesce(excluded.address, trioworker_replicas.address)",
            (self.replica_id, silent_for, _text(address), __version__),
        )

    def publish_workers(self, workers: bytes) -> None:
        """Write ``workers`` (:func:`_encode_workers`) in this server's row; announce them
        when they differ from what was announced last."""
        self._execute("UPDATE trioworker_replicas SET workers = %b WHERE id = %b", (workers, self.replica_id))
        self._changed_workers(workers)

    def _changed_workers(self, workers: bytes) -> None:
        if workers != self.published:
            self.workers = workers

    def live_servers(self, here: LiveServer) -> list[LiveServer]:
        """``here``, then the other servers whose last heartbeat is younger than their
        timeout (by the database's clock), oldest first."""
        rows = self._execute(
            "SELECT id, version, started_at, heartbeat_at, address, workers FROM trioworker_replicas"
            " WHERE id = %b OR heartbeat_at >= now() - timeout_seconds * interval '1 second'"
            " ORDER BY started_at, id",
            (here.id,),
        ).fetchall()
        others: list[LiveServer] = []
        for server_id, version, started, heartbeat, address, workers in rows:
            if server_id == here.id:
                here = attrs.evolve(here, heartbeat=heartbeat.astimezone(UTC))
                continue
            others.append(
                LiveServer(
                    server_id,
                    version or "unknown",
                    started.astimezone(UTC),
                    address,
                    heartbeat.astimezone(UTC),
                    _decode_workers(workers, server_id),
                )
            )
        return [here, *others]

    def unregister_replica(self) -> None:
        """Delete this server's row (it stops; what it held was handed back)."""
        self._execute("DELETE FROM trioworker_replicas WHERE id = %b", (self.replica_id,))

    def heartbeat(self, max_deliveries: int, workers: bytes) -> Heartbeat:
        """Say this server lives (``heartbeat_at = now()``, the database's clock) with the
        ``workers`` connected to it now (:meth:`publish_workers`), then :meth:`reap` the dead."""
        alive = (
            self._execute(
                "UPDATE trioworker_replicas SET heartbeat_at = now(), workers = %b"
                " WHERE id = %b RETURNING id",
                (workers, self.replica_id),
            ).fetchone()
            is not None
        )
        if alive:
            self._changed_workers(workers)
        requeued_runs, dead = self.reap(max_deliveries)
        return Heartbeat(alive, requeued_runs, dead)

    def reap(self, max_deliveries: int) -> tuple[list[Requeued], list[uuid.UUID]]:
        """Hand back the runs held through dead servers, and delete those servers' rows:
        ``(runs, servers)``.

        Dead: silent for longer than its ``timeout_seconds`` by the database's clock,
        locked ``FOR UPDATE SKIP LOCKED`` (another server reaping it now is left to it).
        Held runs through a server with no row (or through none) are handed back too: a
        server that stops deletes its row, and what it still held has no one to answer
        for it. A run is requeued as by a lost connection (one delivery more: CRASHED
        after ``max_deliveries``), and only when it is still held through such a server
        once locked (a worker may have taken it to a live server meanwhile).
        """
        dead = [
            replica
            for (replica,) in self._execute(
                "SELECT id FROM trioworker_replicas"
                " WHERE heartbeat_at < now() - timeout_seconds * interval '1 second'"
                " AND id IS DISTINCT FROM %b FOR UPDATE SKIP LOCKED",
                (self.replica_id,),
            )
        ]
        held = [
            run_id
            for (run_id,) in self._execute(
                "SELECT r.id FROM trioworker_task_runs AS r WHERE r.state_type IN ('PENDING', 'RUNNING')"
                " AND (r.replica_id IS NULL OR r.replica_id = ANY(%b::uuid[]) OR NOT EXISTS"
                " (SELECT FROM trioworker_replicas AS x WHERE x.id = r.replica_id)) ORDER BY r.seq",
                (dead,),
            )
        ]
        requeued_runs: list[Requeued] = []
        if held:
            found = self._fetch(held, lock=True)
            holders = list({row.replica for row in found.values() if row.replica is not None})
            live = {
                replica
                for (replica,) in self._execute(
                    "SELECT id FROM trioworker_replicas WHERE id = ANY(%b::uuid[])", (holders,)
                )
            }.difference(dead)
            requeued_runs = [
                outcome
                for outcome in self._requeue_rows(
                    held, found, "redelivery", max_deliveries, lambda row: row.replica not in live
                )
                if outcome.queued is not None or outcome.state_type is StateType.CRASHED
            ]
        if dead:
            self._execute("DELETE FROM trioworker_replicas WHERE id = ANY(%b::uuid[])", (dead,))
            self.reaped_servers = True
        return requeued_runs, dead

    def release_waiting(self, run_ids: Sequence[uuid.UUID]) -> None:
        """The runs these runs waited for completed: they may be claimed now."""
        keys = self._execute(
            "UPDATE trioworker_ready SET waiting = false WHERE run_id = ANY(%b::uuid[]) AND waiting"
            " RETURNING task_key",
            (list(run_ids),),
        )
        self.ready_keys.update(key for (key,) in keys)

    def waiting_runs(self) -> list[QueuedRun]:
        """The runs waiting in the ready table for the runs they wait for."""
        rows = self._execute(
            "SELECT q.run_seq, q.run_id, q.task_key, q.scheduled_at, r.wait_for FROM trioworker_ready AS q"
            " JOIN trioworker_task_runs AS r ON r.seq = q.run_seq WHERE q.waiting ORDER BY q.run_seq"
        )
        return self._queued_rows(rows.fetchall())

    def read_leases(self, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[TaskRun, uuid.UUID | None]]:
        """The runs that exist, each with the server it is leased through (None: not held)."""
        return {run_id: (row.run, row.replica) for run_id, row in self._fetch(run_ids, lock=False).items()}

    def count_queued(self, clock_now: float) -> tuple[int, int]:
        """``(ready, delayed)``: SCHEDULED runs not waiting for others, due at ``clock_now``
        and not yet."""
        [(ready, delayed)] = self._execute(
            "SELECT count(*) FILTER (WHERE scheduled_at IS NULL OR scheduled_at <= %b),"
            " count(*) FILTER (WHERE scheduled_at > %b) FROM trioworker_ready WHERE NOT waiting",
            (clock_now, clock_now),
        ).fetchall()
        return int(ready), int(delayed)

    def count_ready(self, task_keys: Sequence[str], clock_now: float) -> dict[str, int]:
        rows = self._execute(
            "SELECT task_key, count(*) FROM trioworker_ready WHERE task_key = ANY(%b) AND NOT waiting"
            " AND (scheduled_at IS NULL OR scheduled_at <= %b) GROUP BY task_key",
            ([_text(key) for key in task_keys], clock_now),
        ).fetchall()
        return {key: int(count) for key, count in rows}


# --------------------------------------------------------------------------- the store


class _OperationFailed(Exception):
    """An operation raised without savepoints: its group runs again, each in its own."""


class PostgresStore(GroupCommitStore[_PostgresOps]):
    """A :class:`~trioworker.server.store.base.Store` in a PostgreSQL database. Open it with
    :meth:`open`; it lives as long as that block."""

    def __init__(
        self,
        target: PostgresTarget,
        send: trio.MemorySendChannel[Pending[_PostgresOps, object]],
        *,
        exclusive: bool = True,
    ) -> None:
        super().__init__(_PostgresOps(), send)
        self.target = target
        self._connection = _Connection(target, exclusive=exclusive)
        #: The counts' connection (made on the first count, again after it was lost).
        self._reader = _Connection(target, exclusive=False)
        self._reader_ops = _PostgresOps()
        self._reads_beside = True

    @property
    def location(self) -> str:
        """``postgresql://USER@HOST:PORT/DB`` (never the password)."""
        return self.target.location

    # -- servers sharing the database (see SharedStore)
    async def register_replica(self, replica_id: uuid.UUID, silent_for: float, address: str | None) -> None:
        self._ops.replica_id = replica_id  # before any lease is taken through it
        await self._run(lambda ops: ops.register_replica(silent_for, address))

    async def unregister_replica(self) -> None:
        await self._run(lambda ops: ops.unregister_replica())

    async def heartbeat(self, max_deliveries: int, workers: Sequence[ConnectedWorker]) -> Heartbeat:
        data = _encode_workers(workers)
        return await self._run(lambda ops: ops.heartbeat(max_deliveries, data))

    async def publish_workers(self, workers: Sequence[ConnectedWorker]) -> None:
        data = _encode_workers(workers)
        await self._run(lambda ops: ops.publish_workers(data))

    async def live_servers(self, here: LiveServer) -> list[LiveServer]:
        return await self._count(lambda ops: ops.live_servers(here))

    async def claim_ready(
        self,
        keys: Sequence[str],
        limit: int,
        client_id: str,
        now: float,
        *,
        known: Sequence[uuid.UUID] | None = None,
    ) -> Claimed:
        return await self._run(lambda ops: ops.claim_ready(keys, limit, client_id, now, known))

    async def release_waiting(self, run_ids: Sequence[uuid.UUID]) -> None:
        await self._run(lambda ops: ops.release_waiting(run_ids))

    async def waiting_runs(self) -> list[QueuedRun]:
        return await self._run(lambda ops: ops.waiting_runs())

    async def read_leases(
        self, run_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, tuple[TaskRun, uuid.UUID | None]]:
        return await self._run(lambda ops: ops.read_leases(run_ids))

    async def count_queued(self, now: float) -> tuple[int, int]:
        return await self._run(lambda ops: ops.count_queued(now))

    async def count_ready(self, task_keys: Sequence[str], now: float) -> dict[str, int]:
        return await self._run(lambda ops: ops.count_ready(task_keys, now))

    def listener(self) -> PostgresListener:
        assert self._ops.channel is not None, "the store is open"
        return PostgresListener(self.target, self._ops.channel)

    @property
    def kind(self) -> str:
        return "postgresql"

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, *, exclusive: bool = True) -> AsyncIterator[PostgresStore]:
        """Connect to the database ``url`` names, create or migrate its schema, and run the
        committer.

        Args:
            exclusive: refuse to share the database (its schema) with another exclusive
                store, as one server per SQLite file. ``False`` lets several stores use it
                at once: the SQL keeps each run's changes atomic and its leases exclusive,
                but each store's dispatcher knows only the runs queued through it.

        Raises:
            ValueError: ``url`` is not a PostgreSQL URL libpq can read.
            StoreError: the database cannot be reached, refuses the login, does not exist,
                or has a schema newer than this code knows. The message names the host,
                port, database and user, never the password.
            DatabaseInUse: another (exclusive) server has the database.

        **Resource handling:** the committer task and the connections (the committer's, and
        the counts' one, made on the first count) live exactly as long as the ``async with``
        block (as :meth:`SQLiteStore.open <trioworker.server.store.sqlite.SQLiteStore.open>`'s).
        When the database goes away, the operations of that moment fail with
        :class:`StoreError`; the next ones connect again.
        """
        target = PostgresTarget.parse(url)
        send, receive = trio.open_memory_channel[Pending[_PostgresOps, object]](math.inf)
        store = cls(target, send, exclusive=exclusive)
        try:
            await trio.to_thread.run_sync(store._start)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store._commit_forever, receive)
                try:
                    yield store
                finally:
                    send.close()  # the committer finishes what is queued, then returns
        finally:
            send.close()
            with trio.CancelScope(shield=True):
                await store._close_reader(store._reader.close)  # after a count under way
                await trio.to_thread.run_sync(store._connection.close)

    def _start(self) -> None:
        conn = self._connection.get()
        self._ops.conn = conn
        try:
            self._ops.migrate()
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot set up the schema in {self.target.described}: {_first_line(exc)}"
            ) from None

    def _read_beside(self, op: Callable[[_PostgresOps], T]) -> T:
        """Run ``op`` on the counts' connection (autocommit: each statement sees what was
        committed before it began); once more on a new connection when the last one was
        lost (it only reads).

        Raises:
            StoreError: PostgreSQL cannot be reached or failed to read.
        """
        for attempt in (1, 2):
            conn = self._reader.get()
            self._reader_ops.conn = conn
            try:
                return op(self._reader_ops)
            except psycopg.Error as exc:
                lost = _lost(exc, conn)
                if lost:
                    self._reader.drop()
                if not lost or attempt == 2:
                    raise StoreError(f"could not read {self.target.described}: {_first_line(exc)}") from None
        raise AssertionError("unreachable")

    def _commit_group(self, group: list[Pending[_PostgresOps, object]]) -> None:
        """Run ``group`` in one transaction, again when PostgreSQL asks (a deadlock) or when
        the connection was lost before the commit was sent (nothing was saved: the next
        attempt runs on a new connection). Operations run without savepoints (one round
        trip each saved); when one raises, the group runs again with one savepoint each,
        so that its failure undoes only its own writes."""
        savepoints = False
        attempts = 0
        while True:
            attempts += 1
            conn = self._connection.get()
            self._ops.conn = conn
            self._ops.forget_notices()
            committing = False
            try:
                with conn.transaction():
                    self._run_ops(conn, group, savepoints=savepoints)
                    self._ops.announce()
                    committing = True
                return
            except _OperationFailed:
                savepoints = True
            except psycopg.Error as exc:
                if _lost(exc, conn):
                    self._connection.drop()
                    reason = _first_line(exc)
                    if committing:
                        raise StoreError(
                            f"the connection to {self.target.described} was lost while committing "
                            f"({reason}); the operation may or may not have been saved"
                        ) from None
                    if attempts >= 2:
                        raise StoreError(
                            f"the connection to {self.target.described} was lost ({reason}); "
                            "nothing of the operation was saved"
                        ) from None
                elif not (_retry(exc) and attempts < _ATTEMPTS):
                    raise

    def _run_ops(
        self,
        conn: _Conn,
        group: list[Pending[_PostgresOps, object]],
        *,
        savepoints: bool,
    ) -> None:
        ops = self._ops
        for pending in group:
            pending.value = pending.error = None
            if not savepoints:
                try:
                    pending.value = pending.op(ops)
                except Exception as exc:
                    if _lost(exc, conn) or _retry(exc):
                        raise
                    raise _OperationFailed from exc
                continue
            announced = (set(ops.ready_keys), dict(ops.changed))
            try:
                with conn.transaction():  # a savepoint
                    pending.value = pending.op(ops)
            except Exception as exc:
                if _lost(exc, conn) or _retry(exc):
                    raise
                pending.error = exc
                ops.ready_keys, ops.changed = announced  # what it did is undone: announce none of it
