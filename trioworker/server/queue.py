"""The dispatcher: which SCHEDULED run goes to which subscription, and when.

It keeps, in memory, an index over the store: per task key a FIFO of ready runs, a heap
of delayed runs, and the subscriptions with their credit and leases. It never blocks and
never touches the store; :mod:`trioworker.server.service` does, and keeps the two in step.
The index may hold stale entries (a run cancelled while queued): claiming a run in the
store is the atomic step, and it skips anything no longer SCHEDULED.

A ``shared`` dispatcher (several servers on one PostgreSQL database) indexes no ready run:
other servers create and claim runs too, so the store's table of ready runs is the only
queue. Queuing a run then only *hints* the subscriptions of its key that work may be
there (they claim from the store), and the heap keeps due times, to hint again then.
"""

from __future__ import annotations

import heapq
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

import attrs
import trio

from trioworker.models import TaskRun, utcnow
from trioworker.server.store.base import QueuedRun

#: Seconds of wall-clock time since the epoch, as the dispatcher sees them.
WallClock = Callable[[], float]


def trio_anchored_clock() -> WallClock:
    """A wall clock that advances with Trio's clock (so a ``MockClock`` drives it in tests).

    Call it inside ``trio.run``: it is anchored to the real time at that moment.
    """
    wall0, trio0 = time.time(), trio.current_time()
    return lambda: wall0 + (trio.current_time() - trio0)


@attrs.define(eq=False)
class Subscription:
    """One subscribed connection: its keys, its credit and the runs it holds."""

    client_id: str
    keys: tuple[str, ...]
    credit: int
    #: Runs it may hold beyond its credit, waiting in its buffer for a free slot. They go
    #: to it only while no other subscription of their key has a free slot, and are
    #: revoked (if not started yet) when one gets one.
    prefetch: int = 0
    held: set[uuid.UUID] = attrs.field(factory=set)
    #: Held runs whose final report arrived and is being applied. They keep their lease
    #: (a lost connection still hands them back) but no longer take room: the worker's
    #: slot is free, so the next run can be claimed while the report is committed.
    finishing: set[uuid.UUID] = attrs.field(factory=set)
    #: Held runs the server wants stopped (cancelled or deleted from elsewhere).
    cancels: list[uuid.UUID] = attrs.field(factory=list)
    #: Held runs delivered beyond the credit and not reported started: id -> task key.
    prefetched: dict[uuid.UUID, str] = attrs.field(factory=dict)
    #: Prefetched runs the server asked back and has not yet heard about.
    revoking: set[uuid.UUID] = attrs.field(factory=set)
    #: Revocations to send (the delivery loop sends them).
    revokes: list[uuid.UUID] = attrs.field(factory=list)
    #: Work may be ready for it in a shared store (see :meth:`hint`): it should try a claim.
    hinted: bool = True
    #: A claim for it from a shared store failed, maybe after its commit: the next claim
    #: also takes the runs leased to it there that it does not know of.
    claim_failed: bool = False
    #: When the connection subscribed (UTC).
    connected: datetime = attrs.field(factory=utcnow)
    #: Free slots held for runs being created, to be leased to it in the create's own
    #: transaction (see :meth:`Dispatcher.reserve`).
    reserved: int = 0
    #: Held runs leased to it when they were created, not sent yet: id -> the run as the
    #: store holds it. The delivery loop sends them (no claim: they are claimed already).
    unsent: dict[uuid.UUID, TaskRun] = attrs.field(factory=dict)
    #: It takes new runs: False once it quit or left (nothing is leased to it at create then).
    taking: bool = True
    _wakeup: trio.Event | None = None
    #: Woken since it last waited: the next :meth:`wait_for_work` returns at once.
    _woken: bool = False

    def hint(self) -> None:
        """Runs of its keys may be ready (in a shared store, to claim)."""
        self.hinted = True
        self.wake()

    def take_hint(self) -> bool:
        """Whether it was hinted since the last call (the hint is used up)."""
        hinted, self.hinted = self.hinted, False
        return hinted

    def request_cancel(self, run_id: uuid.UUID) -> None:
        self.cancels.append(run_id)
        self.wake()

    @property
    def free_slots(self) -> int:
        """Credit not taken by runs it works on (negative while runs wait in its buffer)."""
        return self.credit - len(self.held) + len(self.finishing) - self.reserved

    @property
    def room(self) -> int:
        return max(0, self.free_slots + self.prefetch)

    def finished(self, run_ids: Iterable[uuid.UUID]) -> None:
        """The worker reported these runs final: their room is free before the reports apply."""
        before = len(self.finishing)
        self.finishing.update(run_id for run_id in run_ids if run_id in self.held)
        if len(self.finishing) != before:
            self.wake()

    def started(self, run_ids: Iterable[uuid.UUID]) -> None:
        """The worker reported on these runs: they left its buffer, nothing to revoke."""
        for run_id in run_ids:
            if self.prefetched.pop(run_id, None) is not None:
                self.revoking.discard(run_id)

    def forget(self, run_id: uuid.UUID) -> None:
        """The run is no longer leased to this subscription."""
        self.held.discard(run_id)
        self.finishing.discard(run_id)
        self.prefetched.pop(run_id, None)
        self.revoking.discard(run_id)
        self.unsent.pop(run_id, None)

    def forget_all(self) -> None:
        """No run is leased to this subscription any more."""
        self.held.clear()
        self.finishing.clear()
        self.prefetched.clear()
        self.revoking.clear()
        self.unsent.clear()

    def wake(self) -> None:
        self._woken = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def wait_for_work(self) -> None:
        """Sleep until a run for one of our keys is ready or our room grows (at once when
        either happened since the last wait: a wake while the last claim was in the store
        is not lost)."""
        if not self._woken:
            self._wakeup = trio.Event()
            await self._wakeup.wait()
            self._wakeup = None
        self._woken = False


@attrs.define(eq=False)
class Dispatcher:
    clock: WallClock = time.time
    #: The ready runs are in a store other servers share: index none, hint subscriptions.
    shared: bool = False
    # Index entries are plain tuples of ints, floats and strings: CPython stops tracking
    # such tuples in its garbage collector, so 100,000 queued runs cost full collections
    # nothing. (Objects, even slotted ones, would be walked by every full collection.)
    #: task key -> FIFO of (seq, run id as str, ready since: epoch seconds)
    _ready: dict[str, deque[tuple[int, str, float]]] = attrs.field(factory=dict)
    #: heap of (due epoch seconds, seq, run id as str, task key)
    _delayed: list[tuple[float, int, str, str]] = attrs.field(factory=list)
    _delayed_changed: trio.Event = attrs.field(factory=trio.Event)
    _subscribers: dict[str, list[Subscription]] = attrs.field(factory=dict)
    _leases: dict[uuid.UUID, Subscription] = attrs.field(factory=dict)
    #: task key -> the earliest due time in the heap of a hint (:meth:`hint_at`) for it
    _hinted: dict[str, float] = attrs.field(factory=dict)
    #: task key -> runs of it being created that will be queued if they are new and due
    #: (none was leased at create): while there are any, no run of the key is (see :meth:`reserve`).
    _creating: dict[str, int] = attrs.field(factory=dict)
    #: Told, as runs leave the ready queue for a subscription, how many of each key did
    #: (``{key: count}``; in a shared store, the runs claimed here; the service tells the
    #: runs leased at create too, see :meth:`reserve`): the queue limit's
    #: drain rates (:meth:`trioworker.server.limits.QueueLimit.taken`). None: nobody asks.
    on_taken: Callable[[Mapping[str, int]], None] | None = None

    # -- queues
    def enqueue(self, runs: Iterable[QueuedRun], *, front: bool = False, due: bool = False) -> None:
        """Index runs that are SCHEDULED in the store.

        A run due now is ready since now; the others wait in the delayed heap.

        Args:
            front: they were queued before (a redelivery): put them ahead of newer runs.
            due: they are delayed runs whose time came: ready since their scheduled time.
        """
        runs = list(runs)
        now = self.clock()
        woken: set[str] = set()
        ready = [r for r in runs if r.scheduled_at is None or r.scheduled_at <= now]
        for run in runs:
            if run.scheduled_at is not None and run.scheduled_at > now:
                self._delay(run.scheduled_at, run.seq, str(run.id), run.task_key)
        if self.shared:
            self.hint_keys({run.task_key for run in ready})
            return
        if front:
            ready.sort(key=lambda r: r.seq, reverse=True)
        for run in ready:
            queue = self._ready.setdefault(run.task_key, deque())
            since = run.scheduled_at if due and run.scheduled_at is not None else now
            if front:
                queue.appendleft((run.seq, str(run.id), since))
            else:
                queue.append((run.seq, str(run.id), since))
            woken.add(run.task_key)
        for key in woken:
            for sub in self._subscribers.get(key, ()):
                sub.hint()

    def _delay(self, due: float, seq: int, run_id: str, task_key: str) -> None:
        entry = (due, seq, run_id, task_key)
        heapq.heappush(self._delayed, entry)
        if self._delayed[0] is entry:
            self._delayed_changed.set()

    def hint_keys(self, keys: Iterable[str]) -> None:
        """Runs of these task keys may be ready: their subscriptions try a claim."""
        for key in keys:
            for sub in self._subscribers.get(key, ()):
                sub.hint()

    def hint_at(self, due: float, keys: Iterable[str]) -> None:
        """Hint the subscriptions of ``keys`` at ``due`` (epoch seconds on :attr:`clock`):
        a delayed run in a shared store falls due then."""
        for key in keys:
            earliest = self._hinted.get(key)
            if earliest is None or due < earliest:  # a later hint comes from the next claim
                self._hinted[key] = due
                self._delay(due, 0, "", key)

    def hint_all(self, *, with_room: bool = False) -> None:
        """Hint every subscription (``with_room``: those with room for a run)."""
        for sub in self.subscriptions:
            if not with_room or sub.room > 0:
                sub.hint()

    def ready_count(self, task_key: str | None = None) -> int:
        if task_key is not None:
            return len(self._ready.get(task_key, ()))
        return sum(len(q) for q in self._ready.values())

    @property
    def delayed_count(self) -> int:
        return len(self._delayed)

    def take(self, sub: Subscription) -> list[uuid.UUID]:
        """Lease up to ``sub.room`` ready runs to ``sub``, oldest first across its keys.

        Beyond its free slots (into its prefetch buffer) it takes only runs of keys for
        which no other subscription has a free slot.
        """
        return list(self.take_timed(sub))

    def take_timed(self, sub: Subscription) -> dict[uuid.UUID, float]:
        """What :meth:`take` takes, each with the time it has been ready since (epoch
        seconds on :attr:`clock`: when it was queued, or its scheduled time when it was
        delayed), in the order taken."""
        room, slots = sub.room, sub.free_slots
        taken: dict[uuid.UUID, float] = {}
        queues = {key: q for key in sub.keys if (q := self._ready.get(key))}
        buffering = False
        drained: dict[str, int] | None = None if self.on_taken is None else {}
        while room > 0 and queues:
            if not buffering and len(taken) >= slots:  # what is taken now waits in sub's buffer
                buffering = True
                queues = {k: q for k, q in queues.items() if not self._free_slot_elsewhere(sub, k)}
                if not queues:
                    break
            key = min(queues, key=lambda k: queues[k][0][0]) if len(queues) > 1 else next(iter(queues))
            queue = queues[key]
            _, text_id, since = queue.popleft()
            if drained is not None:  # a stale entry leaves the queue too: room for one more
                drained[key] = drained.get(key, 0) + 1
            run_id = uuid.UUID(text_id)
            if not queue:
                del queues[key]
            if run_id in self._leases:
                continue  # a stale duplicate of a run someone holds
            if buffering:
                sub.prefetched[run_id] = key
            taken[run_id] = since
            self._leases[run_id] = sub
            sub.held.add(run_id)
            room -= 1
        if drained:
            assert self.on_taken is not None
            self.on_taken(drained)
        return taken

    # -- leases at create (a store one server has to itself)
    def reserve(self, task_key: str) -> Subscription | None:
        """Hold a free slot for a run of ``task_key`` being created, so that the store leases
        the run to its subscription in the create's own transaction; None when no
        subscription may have it (then call :meth:`creating`: the run is to be queued).

        The subscription takes runs of the key, has a free slot (its prefetch buffer is not
        for this), and nothing to take before it: no run of any of its keys is ready, or
        being created to be queued (a run must not pass older ready runs). Of those, the one
        with the most free slots. A shared dispatcher reserves nothing (other servers claim
        the ready runs too).

        Call :meth:`lease_created` or :meth:`unreserve` once the store answered.
        """
        if self.shared:
            return None
        best: Subscription | None = None
        for sub in self._subscribers.get(task_key, ()):
            slots = sub.free_slots
            if not sub.taking or slots <= 0 or (best is not None and slots <= best.free_slots):
                continue
            if any(self._ready.get(key) or self._creating.get(key) for key in sub.keys):
                continue
            best = sub
        if best is not None:
            best.reserved += 1
        return best

    def unreserve(self, sub: Subscription) -> None:
        """Give back a slot :meth:`reserve` held (the create leased no run to ``sub``)."""
        sub.reserved -= 1
        sub.wake()

    def lease_created(self, sub: Subscription, run: TaskRun) -> bool:
        """The store leased ``run`` to ``sub`` as it created it, in a slot :meth:`reserve`
        held: lease it here too, for ``sub`` to send (:attr:`Subscription.unsent`). False
        (nothing leased here) when ``sub`` stopped taking runs meanwhile: the caller hands
        the run back."""
        sub.reserved -= 1
        if not sub.taking:
            return False
        self.lease(sub, run.id)
        sub.unsent[run.id] = run
        sub.wake()
        return True

    def creating(self, task_keys: Iterable[str], n: int = 1) -> None:
        """Runs of ``task_keys`` (one each) are being created that will be queued when new
        and due (``n=-1``: they were, or were not made): meanwhile no run of those keys is
        leased at create."""
        for key in task_keys:
            count = self._creating.get(key, 0) + n
            if count > 0:
                self._creating[key] = count
            else:
                self._creating.pop(key, None)

    def takers_room(self, task_key: str) -> int:
        """How many runs of ``task_key`` the subscriptions of it could take now."""
        return sum(sub.room for sub in self._subscribers.get(task_key, ()))

    def claim_room(self, sub: Subscription) -> tuple[int, int]:
        """For a claim from a shared store: ``(how many runs sub may claim, how many of
        those go to its free slots)``; the rest wait in its buffer, which it fills only
        while no other subscription of its keys here has a free slot."""
        slots = max(0, sub.free_slots)
        room = sub.room
        if room > slots and any(self._free_slot_elsewhere(sub, key) for key in sub.keys):
            room = slots
        return room, slots

    def lease_claimed(self, sub: Subscription, runs: Iterable[tuple[uuid.UUID, str]], slots: int) -> None:
        """Lease to ``sub`` runs it claimed from a shared store, ``(id, task key)`` in the
        order claimed; those beyond ``slots`` wait in its buffer."""
        drained: dict[str, int] = {}
        for n, (run_id, key) in enumerate(runs):
            self.lease(sub, run_id)
            if n >= slots:
                sub.prefetched[run_id] = key
            drained[key] = drained.get(key, 0) + 1
        if drained and self.on_taken is not None:
            self.on_taken(drained)

    def _free_slot_elsewhere(self, sub: Subscription, key: str) -> bool:
        return any(other.free_slots > 0 for other in self._subscribers.get(key, ()) if other is not sub)

    def revoke_for(self, sub: Subscription) -> None:
        """``sub`` has free slots and nothing ready: ask other subscriptions of its keys to
        hand back runs waiting in their buffers (the ones they have not started yet)."""
        wanted = sub.free_slots
        if wanted <= 0:
            return
        others = {
            id(other): other
            for key in sub.keys
            for other in self._subscribers.get(key, ())
            if other is not sub and other.prefetched
        }.values()
        # Runs already asked back will come to the free slots: ask only for the rest.
        wanted -= sum(len(other.revoking) for other in others)
        if wanted <= 0:
            return
        keys = set(sub.keys)
        for other in others:
            ids = [
                run_id
                for run_id, key in other.prefetched.items()
                if key in keys and run_id not in other.revoking
            ][:wanted]
            if ids:
                other.revoking.update(ids)
                other.revokes += ids
                other.wake()
                wanted -= len(ids)
                if wanted <= 0:
                    return

    # -- leases
    def holder(self, run_id: uuid.UUID) -> Subscription | None:
        return self._leases.get(run_id)

    @property
    def leased(self) -> list[uuid.UUID]:
        """Every run leased to a subscription here."""
        return list(self._leases)

    def release(self, run_id: uuid.UUID) -> Subscription | None:
        """Drop the lease on a run (it finished, was requeued or deleted); wake its holder."""
        sub = self._leases.pop(run_id, None)
        if sub is not None:
            sub.forget(run_id)
            sub.wake()
        return sub

    def lease(self, sub: Subscription, run_id: uuid.UUID) -> None:
        """Lease ``run_id`` to ``sub``, taking it from any subscription that held it."""
        previous = self._leases.get(run_id)
        if previous is not None and previous is not sub:
            previous.forget(run_id)
        self._leases[run_id] = sub
        sub.held.add(run_id)

    # -- subscriptions
    def subscribe(self, sub: Subscription) -> None:
        for key in sub.keys:
            self._subscribers.setdefault(key, []).append(sub)

    def stop_taking(self, sub: Subscription) -> None:
        """``sub`` quit: nothing more is leased to it at create."""
        sub.taking = False

    def unsubscribe(self, sub: Subscription) -> set[uuid.UUID]:
        """Forget ``sub``; returns the runs it still held (to be requeued by the caller)."""
        sub.taking = False
        for key in sub.keys:
            subs = self._subscribers.get(key, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._subscribers.pop(key, None)
        held = {run_id for run_id in sub.held if self._leases.get(run_id) is sub}
        for run_id in held:
            del self._leases[run_id]
        sub.forget_all()
        return held

    def set_credit(self, sub: Subscription, credit: int) -> None:
        sub.credit = max(0, credit)
        sub.wake()

    @property
    def subscriptions(self) -> list[Subscription]:
        seen: dict[int, Subscription] = {}
        for subs in self._subscribers.values():
            for sub in subs:
                seen[id(sub)] = sub
        return list(seen.values())

    # -- delayed runs
    async def release_delayed_runs(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Move delayed runs to the ready queues when they fall due (``shared``: hint the
        subscriptions of their keys); runs until cancelled.

        It sleeps until the earliest due time or until an earlier run is added, whichever
        comes first: a Trio deadline, not a polling loop.
        """
        task_status.started()
        while True:
            now = self.clock()
            due: list[QueuedRun] = []
            keys: set[str] = set()
            while self._delayed and self._delayed[0][0] <= now:
                at, seq, run_id, key = heapq.heappop(self._delayed)
                if self.shared:
                    keys.add(key)
                    if self._hinted.get(key) == at:
                        del self._hinted[key]
                else:
                    due.append(QueuedRun(seq, uuid.UUID(run_id), key, at))
            if due:
                self.enqueue(due, due=True)
            self.hint_keys(keys)
            self._delayed_changed = trio.Event()
            wait = self._delayed[0][0] - now if self._delayed else math.inf
            with trio.move_on_after(wait):
                await self._delayed_changed.wait()
