"""The operator's overview: per task key, its runs by state, the run first in line and how
long it has waited; the runs that ended per minute over the last hour; the connected
workers; the servers. ``GET /api/overview`` answers it, and the live feed pushes it.

Everything is read from the store (the truth, shared by every server) except this server's
own workers, its sockets, read from its dispatcher as they are now. Several servers on one
PostgreSQL database each write theirs in the store at every heartbeat and when one comes
or goes (:meth:`~trioworker.server.store.base.Store.live_servers`), so that any of them
lists every server and every worker.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Final

import attrs

from trioworker.models import StateType, TaskRun
from trioworker.server.queue import Dispatcher, Subscription
from trioworker.server.store.base import ConnectedWorker, EndedCount, LiveServer, Store

__all__ = [
    "ConnectedWorker",
    "Overview",
    "OverviewReader",
    "ServerReplica",
    "TaskKeyOverview",
    "WaitingRun",
    "connected_workers",
    "workers_of",
]

#: How far back the ends per minute go.
ENDED_WINDOW: Final = timedelta(hours=1)
#: An end this old is settled: no end stamped earlier is still to commit, so its count is
#: kept, not read again.
SETTLED_AFTER: Final = timedelta(seconds=5)


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
    #: Workers (of every server listed) that take runs of this key.
    workers: int = 0


@attrs.frozen
class ServerReplica:
    """One server using the store: SQLite has one; several servers on one PostgreSQL
    database are each listed while they heartbeat."""

    id: uuid.UUID
    version: str
    started: datetime
    #: Its URL, as it listens (None until it does).
    url: str | None
    #: When its last heartbeat reached the database (None on SQLite: a server alone sends none).
    heartbeat: datetime | None
    #: The kind of store (:attr:`Store.kind <trioworker.server.store.base.Store.kind>`:
    #: ``"sqlite"`` or ``"postgresql"``).
    store: str
    #: Workers connected to it.
    workers: int
    #: It is the server that answered.
    answering: bool = False


@attrs.frozen
class Overview:
    """The answer of ``GET /api/overview`` (and the live feed's ``overview`` message)."""

    #: The server's time when it was read (ages are measured from it).
    now: datetime
    task_keys: list[TaskKeyOverview]
    #: Runs that ended per minute, task key and state over the last hour, oldest first.
    ended: list[EndedCount]
    #: The workers of every server listed, longest connected first.
    workers: list[ConnectedWorker]
    #: The servers using the store: the one that answered first, then the others, oldest first.
    servers: list[ServerReplica]


def connected_workers(dispatcher: Dispatcher, server: uuid.UUID) -> list[ConnectedWorker]:
    """The workers subscribed to this server (``server`` is its id), longest connected first."""
    return _in_order(_worker_of(sub, server) for sub in dispatcher.subscriptions)


def workers_of(servers: Iterable[LiveServer], task_key: str | None = None) -> list[ConnectedWorker]:
    """The workers of ``servers`` (that take runs of ``task_key``, when given), longest
    connected first."""
    workers = (w for server in servers for w in server.workers)
    return _in_order(w for w in workers if task_key is None or task_key in w.task_keys)


def _in_order(workers: Iterable[ConnectedWorker]) -> list[ConnectedWorker]:
    return sorted(workers, key=lambda w: (w.connected_since, w.client_id, str(w.server)))


def _worker_of(sub: Subscription, server: uuid.UUID) -> ConnectedWorker:
    return ConnectedWorker(
        sub.client_id, list(sub.keys), sub.credit, sub.prefetch, len(sub.held), sub.connected, server
    )


def _minute(when: datetime) -> datetime:
    return when.replace(second=0, microsecond=0)


@attrs.define(eq=False)
class OverviewReader:
    """Reads the :class:`Overview`; keeps the counts of the ends that settled (more than
    :data:`SETTLED_AFTER` old), so each read counts only the ends since the last read and
    those of the last few seconds, not those of the whole hour."""

    store: Store
    dispatcher: Dispatcher
    #: This server as it is now, its workers included.
    here: Callable[[], LiveServer]
    store_kind: str = attrs.field(default=attrs.Factory(lambda self: self.store.kind, takes_self=True))
    #: The counts of the ends before ``_kept_until``, by minute.
    _kept: list[EndedCount] = attrs.field(factory=list)
    _kept_until: datetime | None = None
    #: How many times runs were deleted (:meth:`forget`): a read that overlapped one keeps
    #: nothing of what it counted.
    _deletions: int = 0

    def forget(self) -> None:
        """Runs were deleted (delete, purge, retention): the kept counts may count them, so
        the next read counts the whole hour again."""
        self._deletions += 1
        self._kept = []
        self._kept_until = None

    async def read(self) -> Overview:
        now = datetime.fromtimestamp(self.dispatcher.clock(), UTC)
        counts = await self.store.count_runs()
        waiting = await self.store.oldest_waiting(now)
        ended = await self._ended(now)
        servers = await self.store.live_servers(self.here())
        workers = workers_of(servers)
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
        listed = [
            ServerReplica(
                server.id,
                server.version,
                server.started,
                server.url,
                server.heartbeat,
                self.store_kind,
                len(server.workers),
                answering=n == 0,
            )
            for n, server in enumerate(servers)
        ]
        return Overview(now, per_key, ended, workers, listed)

    async def _ended(self, now: datetime) -> list[EndedCount]:
        """The ends of the last hour: those kept, those settled since the last read (more
        than :data:`SETTLED_AFTER` old: added to the kept ones), and the latest few seconds,
        counted afresh each time."""
        since = _minute(now - ENDED_WINDOW) + timedelta(minutes=1)
        start = since if self._kept_until is None or self._kept_until < since else self._kept_until
        edge = max(start, now - SETTLED_AFTER)
        deletions = self._deletions
        settled = await self.store.count_ended(start, edge) if start < edge else []
        latest = await self.store.count_ended(edge)
        kept = _summed([c for c in self._kept if c.minute >= since], settled)
        if deletions == self._deletions:  # else runs were deleted meanwhile: keep none of it
            self._kept, self._kept_until = kept, edge
        return _summed(kept, latest)


def _summed(*counts: Iterable[EndedCount]) -> list[EndedCount]:
    """The counts of the same minute, task key and state added up, oldest minute first."""
    totals: dict[tuple[datetime, str, StateType], int] = {}
    for count in (c for group in counts for c in group):
        key = (count.minute, count.task_key, count.state_type)
        totals[key] = totals.get(key, 0) + count.count
    return [
        EndedCount(minute, task_key, state_type, n)
        for (minute, task_key, state_type), n in sorted(
            totals.items(), key=lambda i: (i[0][0], i[0][1], i[0][2].value)
        )
    ]
