"""Servers sharing one PostgreSQL database (replicas): each one's heartbeat, the reaper,
the listener of the others' notices, the safety net, and the fence.

The database is the only shared truth; a server's memory holds its own sockets and caches.
:class:`Replica` runs, for the life of one server:

- the **heartbeat**: every ``timeout / 4`` seconds it renews the server's row in
  ``trioworker_replicas`` (the database's clock), with the workers connected to it then
  (what the others list of it: the runs each holds are as of the last heartbeat) and, in
  the same transaction, hands back the runs held through servers silent for longer than
  their timeout (the **reaper**: ``FOR UPDATE SKIP LOCKED`` on their rows, so one server
  reaps each), then deletes their rows;
- the **publisher**: when a worker subscribes or leaves, it writes the workers in the row
  at once (at most once per :data:`PUBLISH_SECONDS`: a burst of workers is one write);
- the **watchdog**: a server that could not heartbeat for ``timeout`` seconds raises its
  :class:`~trioworker.server.fence.Fence` (its sockets close with 1012, requests get 503)
  before the others can find it dead, and lowers it at the next heartbeat. A heartbeat
  that finds the row gone (the others found the server dead) raises it too, then
  registers the server again;
- the **listener**: a connection of its own that hears what the others announce (runs
  ready per task key, runs ended, cancelled, requeued or deleted) and hands it to the
  service; after it lost its connection, the service re-reads what it cares about;
- the **safety net**: every :data:`SAFETY_NET_SECONDS`, subscriptions with room try a
  claim, in case a notice was lost.

Its timers run on real time (:class:`RealTimers`, a thread of its own), not on Trio's
clock: a test's ``MockClock`` neither fires them early nor gets a deadline from them.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Final

import attrs
import trio

from trioworker.server.service import TaskRunService
from trioworker.server.store.base import NoticeListener, SharedStore, StoreError

log = logging.getLogger("trioworker.server")

#: Real seconds between two claim attempts of the subscriptions with room, whatever the notices.
SAFETY_NET_SECONDS: Final = 1.0
#: Real seconds at least between two writes of the workers when they come and go (a burst
#: of them is written once); the heartbeat writes them besides.
PUBLISH_SECONDS: Final = 0.25
#: Real seconds before the first attempt to connect the listener again, doubled up to a quarter
#: of the replica timeout.
RECONNECT_SECONDS: Final = 0.2
#: The fence's reason when the server could not heartbeat.
UNREACHABLE: Final = "the server cannot reach its database"
#: The fence's reason when the others found the server dead.
FOUND_DEAD: Final = "the server was found dead by the others sharing its database; its runs went back"


class RealTimers:
    """Sleeps on real time (``time.monotonic``) for Trio tasks: one thread of its own waits
    for the earliest alarm and wakes its task (``TrioToken.run_sync_soon``). A task that
    sleeps here is blocked without a Trio deadline, so a ``MockClock`` (autojump included)
    neither ends the sleep early nor stops at it.

    **Resource handling:** :meth:`start` the thread inside ``trio.run``; :meth:`stop` ends
    and joins it (at once: it only waits), before the run ends.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._alarms: dict[int, tuple[float, Callable[[], None]]] = {}
        self._count = 0
        self._stopped = False
        self._thread = threading.Thread(
            target=self._ring_forever, name="trioworker replica timers", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of real time. **Cancellation:** at once."""
        woken = trio.Event()
        token = trio.lowlevel.current_trio_token()
        with self._cond:
            self._count += 1
            key = self._count
            self._alarms[key] = (time.monotonic() + seconds, lambda: token.run_sync_soon(woken.set))
            self._cond.notify()
        try:
            await woken.wait()
        finally:
            with self._cond:
                self._alarms.pop(key, None)

    def _ring_forever(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                for key in [key for key, (at, _) in self._alarms.items() if at <= now]:
                    self._alarms.pop(key)[1]()
                earliest = min((at for at, _ in self._alarms.values()), default=None)
                self._cond.wait(None if earliest is None else earliest - now)


@attrs.define(eq=False)
class Replica:
    """One server among those sharing ``store``: see the module's docstring.

    Call :meth:`register` before the service recovers (so that it recovers only what dead
    servers held), start :meth:`run` in a nursery, and call :meth:`unregister` when the
    server stopped cleanly.
    """

    store: SharedStore
    service: TaskRunService
    #: Seconds this server may be silent before the others call it dead.
    timeout: float
    #: The server's id among those sharing the store: its service's.
    id: uuid.UUID = attrs.field(default=attrs.Factory(lambda self: self.service.server_id, takes_self=True))
    #: ``time.monotonic()`` when the last heartbeat that succeeded was sent.
    _last_beat: float = 0.0
    _beat: trio.Event = attrs.field(factory=trio.Event)
    _timers: RealTimers = attrs.field(factory=RealTimers)

    @property
    def interval(self) -> float:
        """Seconds between two heartbeats."""
        return self.timeout / 4

    async def register(self, address: str | None = None) -> None:
        """Add this server's row (``address`` shown to operators); the service's leases are
        held through it from now on.

        Raises:
            StoreError: the database cannot be reached.
        """
        sent = time.monotonic()
        await self.store.register_replica(self.id, self.timeout, address)
        self.service.replica_id = self.id
        self._last_beat = sent

    async def unregister(self) -> None:
        """The server stopped cleanly: delete its row (a failure is only logged: its row then
        dies in ``timeout`` seconds)."""
        try:
            await self.store.unregister_replica()
        except StoreError as exc:
            log.warning("this server's row was not deleted (%s); it expires in %g s", exc, self.timeout)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeat, watch, listen and sweep until cancelled; started once the listener
        was connected once (or failed to: it keeps trying)."""
        listener = self.store.listener()
        self._timers.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeat_forever)
                nursery.start_soon(self._publish_forever)
                nursery.start_soon(self._watch_forever)
                await nursery.start(self._listen_forever, listener)
                nursery.start_soon(self._sweep_forever)
                task_status.started()
        finally:
            listener.close()
            self._timers.stop()

    async def _heartbeat_forever(self) -> None:
        failing = False
        while True:
            await self._timers.sleep(self.interval)
            sent = time.monotonic()
            try:
                beat = await self.store.heartbeat(self.service.max_deliveries, self.service.workers())
                if not beat.alive:
                    log.warning("%s: closing every socket, then registering again", FOUND_DEAD)
                    self.service.fence.raise_(FOUND_DEAD)
                    await self.store.register_replica(self.id, self.timeout, None)
            except StoreError as exc:
                if not failing:
                    log.warning("heartbeat failed (%s); trying again every %g s", exc, self.interval)
                failing = True
                continue
            if failing:
                log.info("heartbeat succeeded again")
            failing = False
            self._last_beat = sent
            self._beat.set()
            self._beat = trio.Event()
            if self.service.fence.raised:
                log.info("serving again")
                self.service.fence.lower()
            if beat.dead:
                log.info(
                    "%d dead server(s) found; %d of their runs handed back", len(beat.dead), len(beat.reaped)
                )
            try:
                await self.service.reaped(beat)
            except StoreError as exc:
                log.warning(
                    "the runs handed back were not all queued here (%s); the safety net claims them", exc
                )

    async def _publish_forever(self) -> None:
        """Write the workers in the server's row when one subscribed or left (a failure
        is only logged: the next heartbeat writes them)."""
        while True:
            await self.service.workers_changed.wait()
            self.service.workers_changed = trio.Event()  # before the write: no change is missed
            try:
                await self.store.publish_workers(self.service.workers())
            except StoreError as exc:
                log.debug("the workers were not written (%s); the next heartbeat writes them", exc)
            await self._timers.sleep(PUBLISH_SECONDS)

    async def _watch_forever(self) -> None:
        """Raise the fence once no heartbeat succeeded for ``timeout`` seconds (counted from
        when the last good one was sent: before the others can find the server dead)."""
        while True:
            left = self._last_beat + self.timeout - time.monotonic()
            if left > 0:
                await self._timers.sleep(left)
                continue
            if not self.service.fence.raised:
                log.error("no heartbeat for %g s: %s; closing every socket", self.timeout, UNREACHABLE)
                self.service.fence.raise_(UNREACHABLE)
            await self._beat.wait()

    async def _listen_forever(self, listener: NoticeListener, *, task_status: trio.TaskStatus[None]) -> None:
        delay = RECONNECT_SECONDS
        started = False
        while True:
            try:
                await listener.connect()
            except StoreError as exc:
                log.warning("cannot listen to the other servers (%s); trying again in %g s", exc, delay)
                if not started:
                    started = True  # the server starts; what is announced meanwhile is re-read later
                    task_status.started()
                await self._timers.sleep(delay)
                delay = min(delay * 2, self.interval)
                continue
            delay = RECONNECT_SECONDS
            try:
                if started:
                    await self.service.resync()  # whatever was announced meanwhile went unheard
                else:
                    started = True
                    task_status.started()
                while True:
                    await self.service.apply_notices(await listener.receive())
            except StoreError as exc:
                log.warning("lost the connection that listens to the other servers (%s)", exc)

    async def _sweep_forever(self) -> None:
        while True:
            await self._timers.sleep(SAFETY_NET_SECONDS)
            self.service.dispatcher.hint_all(with_room=True)
