"""The operator's overview: per task key, its runs by state, the run first in line and how
long it has waited; the runs that ended per minute over the last hour; the connected
workers; the servers. ``GET /api/overview`` answers it, and the live feed pushes it.

Everything is read from the store (the truth, shared by every server) except the workers,
which are the sockets of this server.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Final

import attrs

from trioworker._version import __version__
from trioworker.models import StateType, TaskRun, utcnow
from trioworker.server.queue import Dispatcher, Subscription
from trioworker.server.store.base import EndedCount, Store

#: How far back the ends per minute go.
ENDED_WINDOW: Final = timedelta(hours=1)
#: A minute this long past its end is closed: its count is kept, not read again.
CLOSED_AFTER: Final = timedelta(seconds=5)


@attrs.frozen
class WaitingRun:
    """The run of a task key first in line (the due SCHEDULED run created first)."""

    id: uuid.UUID
    name: str
    #: Since when it waits: when it became SCHEDULED, or its scheduled time if later.
    since: datetime

    @classmethod
    def of(cls, run: TaskRun) -> WaitingRun:
        scheduled = run.state.state_details.scheduled_time
        since = run.state.timestamp if scheduled is None else max(scheduled, run.state.timestamp)
        return cls(run.id, run.name, since)


@attrs.frozen
class TaskKeyOverview:
    task_key: str
    #: Runs of this key by state type (types with no run are left out).
    counts: dict[StateType, int]
    oldest_waiting: WaitingRun | None = None
    #: Workers connected here that take runs of this key.
    workers: int = 0


@attrs.frozen
class ConnectedWorker:
    """One worker's subscription to this server (``GET /api/task_workers``)."""

    client_id: str
    task_keys: list[str]
    #: How many runs it may hold unfinished at once (its credit).
    limit: int
    #: How many more it may hold waiting in its buffer.
    prefetch: int
    #: Runs it holds now (delivered and not finished, buffered ones included).
    runs_in_flight: int
    connected_since: datetime

    @classmethod
    def of(cls, sub: Subscription) -> ConnectedWorker:
        return cls(sub.client_id, list(sub.keys), sub.credit, sub.prefetch, len(sub.held), sub.connected)


@attrs.frozen
class ServerReplica:
    """One server process on the store. SQLite has one; several servers on one PostgreSQL
    database will each be listed here."""

    version: str
    started: datetime
    #: The kind of store (:attr:`Store.kind <trioworker.server.store.base.Store.kind>`:
    #: ``"sqlite"`` or ``"postgresql"``).
    store: str
    #: Workers connected to it.
    workers: int


@attrs.frozen
class Overview:
    """The answer of ``GET /api/overview`` (and the live feed's ``overview`` message)."""

    #: The server's time when it was read (ages are measured from it).
    now: datetime
    task_keys: list[TaskKeyOverview]
    #: Runs that ended per minute, task key and state over the last hour, oldest first.
    ended: list[EndedCount]
    workers: list[ConnectedWorker]
    servers: list[ServerReplica]


def connected_workers(dispatcher: Dispatcher, task_key: str | None = None) -> list[ConnectedWorker]:
    """The workers subscribed here (to ``task_key``, when given), longest connected first."""
    subs = dispatcher.subscriptions
    if task_key is not None:
        subs = [sub for sub in subs if task_key in sub.keys]
    return sorted((ConnectedWorker.of(sub) for sub in subs), key=lambda w: (w.connected_since, w.client_id))


def _minute(when: datetime) -> datetime:
    return when.replace(second=0, microsecond=0)


@attrs.define(eq=False)
class OverviewReader:
    """Reads the :class:`Overview`; keeps the ends of closed minutes, so each read counts
    only the ends of the last minute or two, not of the whole hour."""

    store: Store
    dispatcher: Dispatcher
    store_kind: str = attrs.field(default=attrs.Factory(lambda self: self.store.kind, takes_self=True))
    started: datetime = attrs.field(factory=utcnow)
    #: Ends counted in minutes before ``_closed_until``.
    _closed: list[EndedCount] = attrs.field(factory=list)
    _closed_until: datetime | None = None
    #: How many times runs were deleted (:meth:`forget`): a read that overlapped one keeps
    #: nothing of what it counted.
    _deletions: int = 0

    def forget(self) -> None:
        """Runs were deleted (delete, purge, retention): the kept ends of closed minutes may
        count them, so the next read counts the whole hour again."""
        self._deletions += 1
        self._closed = []
        self._closed_until = None

    async def read(self) -> Overview:
        now = datetime.fromtimestamp(self.dispatcher.clock(), UTC)
        counts = await self.store.count_runs()
        waiting = await self.store.oldest_waiting(now)
        ended = await self._ended(now)
        workers = connected_workers(self.dispatcher)
        keys: dict[str, dict[StateType, int]] = {}
        for count in counts:
            keys.setdefault(count.task_key, {})[count.state_type] = count.count
        for worker in workers:
            for key in worker.task_keys:
                keys.setdefault(key, {})
        first = {run.task_key: WaitingRun.of(run) for run in waiting}
        per_key = [
            TaskKeyOverview(
                key,
                dict(sorted(keys[key].items())),
                first.get(key),
                sum(key in w.task_keys for w in workers),
            )
            for key in sorted(keys)
        ]
        server = ServerReplica(__version__, self.started, self.store_kind, len(workers))
        return Overview(now, per_key, ended, workers, [server])

    async def _ended(self, now: datetime) -> list[EndedCount]:
        since = _minute(now - ENDED_WINDOW) + timedelta(minutes=1)
        closed = [c for c in self._closed if c.minute >= since]
        start = since if self._closed_until is None or self._closed_until < since else self._closed_until
        deletions = self._deletions
        ended = closed + await self.store.count_ended(start)
        if deletions != self._deletions:
            return ended  # runs were deleted meanwhile: keep none of it (forget() cleared it)
        self._closed_until = _minute(now - CLOSED_AFTER)
        self._closed = [c for c in ended if c.minute < self._closed_until]
        return ended
