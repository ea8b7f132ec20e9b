"""Queue limits (``trioworker server --max-queued N``): at most N runs of one task key wait for
a worker; a create beyond that is turned back with 429 and ``Retry-After``, so that
submitters wait (backpressure) instead of growing the queue without bound.

**What counts** as queued: the runs of the key that are due and wait for a worker, as the
dispatcher holds them (its ready FIFO: a count in memory, no store read; see below for
several servers). A run scheduled
for later and a run held back by ``wait_for`` count once they are due (so they may take a
queue past the limit), and they are never turned back themselves. Runs a worker holds
(delivered, running, buffered by prefetch) do not count. A run cancelled or deleted while
queued leaves the count when a worker of its key next takes from the queue (the dispatcher
drops such entries then).

**Repeats never count**: a create that repeats a run already made (its ``id`` names one,
or its ``idempotency_key`` was used with its task key) gets that run back, not a new one,
so it is never turned back; nor is a create that repeats an earlier create of the same
request (the same ``id``, or the same task key and idempotency key). They are looked up
in the store only on the way to a refusal (:meth:`~trioworker.server.store.base.Store.states_of`,
:meth:`~trioworker.server.store.base.Store.runs_by_idempotency_key`).

**How a create is judged**: its runs that would be queued at once are counted, in order,
per key against the room left, together with the creates admitted and not yet queued (so
creates in flight at the same moment cannot overshoot together). The first create that
does not fit ends what fits: ``room`` is how many of the request's first creates fit. A
request is all or nothing by default (refused whole, nothing written); a *partial* one
(trioworker's clients ask for it) has those first ``room`` creates made, and the refusal
carries them (``created``), so the client sends only the rest again.

**How long to wait** (``retry_after``, seconds): the time until the queue has room for
:attr:`QueueFullRefusal.wanted` more runs (for a partial request, half the bound or fewer
if fewer were refused; else the whole request), judged from the room the key's workers
have now and how fast they took its runs over the last :data:`RATE_WINDOW` seconds (the
dispatcher tells every take). Nothing taken lately and no room (no worker, or every one
busy): a second. The ``Retry-After`` header rounds it up to whole seconds (at least 1), as
HTTP has it; the body gives it to the millisecond.

**Told when there is room**: instead of waiting that long, a client may wait until the room
is there (:meth:`QueueLimit.wait_room`, woken by the takes, never polling): the client
channel sends a ``room`` message after a partial refusal, and ``GET /api/task_runs/room``
is a long-poll for it.

With several servers on one PostgreSQL database (replicas), no dispatcher holds ready runs:
each create counts the key's ready runs in the store's ready table (one read per create
request). Creates in flight on other servers at that moment are not seen, so servers
creating at once may overshoot the limit by what they admit together; the wait is judged
from this server's own claims, and no ``room`` is announced.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final

import attrs
import trio

from trioworker.models import JSON, TaskRun, TaskRunCreate, converter
from trioworker.server.queue import Dispatcher
from trioworker.server.sockets import Refusal
from trioworker.server.store.base import SharedStore, Store

#: Seconds a client is told to wait when nothing says how fast the queue drains.
DEFAULT_RETRY_AFTER: Final = 1.0
#: The shortest and the longest wait a refusal gives, in seconds.
MIN_RETRY_AFTER: Final = 0.005
MAX_RETRY_AFTER: Final = 30.0
#: Seconds of takes a drain rate is judged from, and the width of the slices it counts in.
RATE_WINDOW: Final = 2.0
RATE_SLICE: Final = 0.05
#: Task keys whose drain rates are kept before those with no recent take are forgotten.
MAX_RATES: Final = 1024


class QueueFullRefusal(Refusal):
    """429: a create would take the queue of ``task_key`` past ``max_queued``.

    ``room`` is how many of the request's first creates fit (0 for one create); of a
    partial request, those were made: ``created``. ``retry_after`` is seconds to wait
    until ``wanted`` more runs of the key fit: of a partial request, how many of its runs
    of the key were refused, up to half the bound; else all its runs of the key.
    ``room_announced`` is set by a socket that will say when there is room (a ``room``
    message).
    """

    def __init__(
        self,
        task_key: str,
        queued: int,
        max_queued: int,
        room: int,
        *,
        retry_after: float = DEFAULT_RETRY_AFTER,
        wanted: int = 1,
    ) -> None:
        super().__init__(
            429,
            f"the queue of task {task_key!r} is full: {queued} runs wait for a worker "
            f"(--max-queued {max_queued})",
        )
        self.task_key = task_key
        self.max_queued = max_queued
        self.room = room
        self.retry_after = retry_after
        self.wanted = wanted
        #: The runs a partial request made (None: the request was all or nothing).
        self.created: list[TaskRun] | None = None
        self.room_announced = False

    def body(self) -> dict[str, JSON]:
        body: dict[str, JSON] = {
            **super().body(),
            "task_key": self.task_key,
            "max_queued": self.max_queued,
            "room": self.room,
            "retry_after": round(self.retry_after, 3),
        }
        if self.created is not None:
            body["created"] = converter.unstructure(self.created)
        if self.room_announced:
            body["room_announced"] = True
        return body

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


@attrs.define(eq=False)
class DrainRate:
    """How fast the ready runs of one key were taken lately: counts per slice of
    :data:`RATE_SLICE` seconds over the last :data:`RATE_WINDOW` seconds (Trio's clock)."""

    _slices: deque[tuple[float, int]] = attrs.field(factory=deque)

    def add(self, count: int, now: float) -> None:
        if self._slices and now - self._slices[-1][0] < RATE_SLICE:
            start, counted = self._slices[-1]
            self._slices[-1] = (start, counted + count)
        else:
            self._slices.append((now, count))
        self._forget(now)

    def per_second(self, now: float) -> float | None:
        """Runs per second over the window; None when none was taken in it."""
        self._forget(now)
        if not self._slices:
            return None
        span = max(now - self._slices[0][0], RATE_SLICE)
        return sum(counted for _, counted in self._slices) / span

    def _forget(self, now: float) -> None:
        while self._slices and self._slices[0][0] < now - RATE_WINDOW:
            self._slices.popleft()


@attrs.frozen
class Admission:
    """What a request may create: its first ``admitted`` creates; ``refusal`` when that is
    not all of them (a partial request)."""

    admitted: int
    refusal: QueueFullRefusal | None = None


@attrs.define(eq=False)
class QueueLimit:
    """The bound on queued runs per task key; None: no bound (the default)."""

    max_queued: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )
    #: Per task key: runs of creates admitted and not yet in the dispatcher's queue.
    _admitted: Counter[str] = attrs.field(factory=Counter)
    #: Per task key: how fast its ready runs were taken lately.
    _rates: dict[str, DrainRate] = attrs.field(factory=dict)
    #: Per task key: set the next time runs of it leave the ready queue.
    _taken_events: dict[str, trio.Event] = attrs.field(factory=dict)

    def taken(self, counts: Mapping[str, int]) -> None:
        """Runs of these keys left the ready queue (``key -> how many``): the dispatcher
        calls it as workers take runs (see :attr:`Dispatcher.on_taken`)."""
        now = trio.current_time()
        for key, count in counts.items():
            rate = self._rates.get(key)
            if rate is None:
                rate = self._rates[key] = DrainRate()
            rate.add(count, now)
            event = self._taken_events.pop(key, None)
            if event is not None:
                event.set()
        if len(self._rates) > MAX_RATES:  # forget the keys nobody took from lately
            self._rates = {key: rate for key, rate in self._rates.items() if rate.per_second(now)}

    def room(self, task_key: str, ready: int) -> int:
        """How many more runs of ``task_key`` fit, ``ready`` of them waiting for a worker."""
        assert self.max_queued is not None
        return max(0, self.max_queued - ready - self._admitted[task_key])

    async def wait_room(self, task_key: str, wanted: int, dispatcher: Dispatcher) -> int:
        """Wait until ``wanted`` more runs of ``task_key`` fit in the dispatcher's queue
        (woken by takes, not by polling); returns the room then. Not for a shared
        dispatcher, which holds no ready run."""
        while (room := self.room(task_key, dispatcher.ready_count(task_key))) < wanted:
            event = self._taken_events.get(task_key)
            if event is None:
                event = self._taken_events[task_key] = trio.Event()
            await event.wait()
        return room

    @asynccontextmanager
    async def admitting(
        self,
        creates: Sequence[TaskRunCreate],
        dispatcher: Dispatcher,
        store: Store,
        *,
        partial: bool = False,
    ) -> AsyncIterator[Admission]:
        """Hold room for the creates admitted while the block writes and queues them.

        Yields every create admitted, or (``partial``) the first ones that fit and the
        refusal of the rest.

        Raises:
            QueueFullRefusal: they do not all fit and the request is not ``partial``
                (nothing is held then).
        """
        if self.max_queued is None:
            yield Admission(len(creates))
            return
        now = dispatcher.clock()
        counted = [
            c
            for c in _new_in_request(creates)
            if not c.wait_for and (c.scheduled_time is None or c.scheduled_time.timestamp() <= now)
        ]
        ready = await self._ready_counts(counted, dispatcher, store)
        fit = self._fit(counted, creates, ready)
        if fit < len(creates):
            # Only now, on the way to a refusal: repeats of runs already made do not count.
            position = {id(c): n for n, c in enumerate(creates)}
            repeats = await _repeats([c for c in counted if position[id(c)] >= fit], store)
            counted = [c for c in counted if id(c) not in repeats]
            fit = self._fit(counted, creates, ready)
        refusal = None
        if fit < len(creates):
            refusal = self._refusal(counted, creates, ready, fit, dispatcher, partial=partial)
            if not partial:
                raise refusal
        counting = {id(c) for c in counted}
        held = Counter(c.task_key for c in creates[:fit] if id(c) in counting)
        self._admitted.update(held)
        try:
            yield Admission(fit, refusal)
        finally:
            self._admitted.subtract(held)
            for key in held:
                if self._admitted[key] <= 0:
                    del self._admitted[key]

    @staticmethod
    async def _ready_counts(
        counted: Sequence[TaskRunCreate], dispatcher: Dispatcher, store: Store
    ) -> Mapping[str, int]:
        """Per task key of ``counted``: its runs ready now. The dispatcher's queue holds
        them; a shared one holds none (several servers claim from the store's ready table),
        so they are counted there, in one read."""
        keys = sorted({c.task_key for c in counted})
        if dispatcher.shared and isinstance(store, SharedStore):
            return await store.count_ready(keys, dispatcher.clock()) if keys else {}
        return {key: dispatcher.ready_count(key) for key in keys}

    def _fit(
        self, counted: Sequence[TaskRunCreate], creates: Sequence[TaskRunCreate], ready: Mapping[str, int]
    ) -> int:
        """How many of the first ``creates`` fit, the ``counted`` of them counting."""
        assert self.max_queued is not None
        counting = {id(c) for c in counted}
        added: Counter[str] = Counter()
        for position, create in enumerate(creates):
            if id(create) not in counting:
                continue
            key = create.task_key
            if ready.get(key, 0) + self._admitted[key] + added[key] + 1 > self.max_queued:
                return position
            added[key] += 1
        return len(creates)

    def _refusal(
        self,
        counted: Sequence[TaskRunCreate],
        creates: Sequence[TaskRunCreate],
        ready: Mapping[str, int],
        fit: int,
        dispatcher: Dispatcher,
        *,
        partial: bool,
    ) -> QueueFullRefusal:
        """The refusal of ``creates[fit:]`` (``partial``: the first ``fit`` are made): the
        key of the first, how many of it wait then, and how long to wait."""
        assert self.max_queued is not None
        key = creates[fit].task_key
        counting = {id(c) for c in counted}
        queued = ready.get(key, 0) + self._admitted[key]
        made = sum(1 for c in creates[:fit] if id(c) in counting and c.task_key == key)
        refused = sum(1 for c in creates[fit:] if id(c) in counting and c.task_key == key)
        if partial:  # the rest is sent again: wait for room for some of it
            queued += made
            wanted = max(1, min(refused, (self.max_queued + 1) // 2))
        else:  # the whole request is sent again: wait for room for all of it
            wanted = made + refused
        # Runs that must be taken before ``wanted`` more fit.
        to_take = queued + wanted - self.max_queued
        # Workers with room take that many at once; the rest as fast as they took lately.
        to_take -= dispatcher.takers_room(key)
        rate = self._rates.get(key)
        per_second = None if rate is None else rate.per_second(trio.current_time())
        if to_take <= 0:
            retry_after = MIN_RETRY_AFTER
        elif per_second is None:
            retry_after = DEFAULT_RETRY_AFTER
        else:
            retry_after = min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, to_take / per_second))
        return QueueFullRefusal(key, queued, self.max_queued, fit, retry_after=retry_after, wanted=wanted)


def _new_in_request(creates: Sequence[TaskRunCreate]) -> list[TaskRunCreate]:
    """``creates`` without those that repeat an earlier one of the same request (its ``id``,
    or its task key and idempotency key): the store gives those the run the first made."""
    ids: set[object] = set()
    keys: set[tuple[str, str]] = set()
    new: list[TaskRunCreate] = []
    for create in creates:
        pair = None if create.idempotency_key is None else (create.task_key, create.idempotency_key)
        repeated = pair in keys if pair is not None else create.id is not None and create.id in ids
        if repeated:
            continue
        if pair is not None:
            keys.add(pair)
        if create.id is not None:
            ids.add(create.id)
        new.append(create)
    return new


async def _repeats(creates: Sequence[TaskRunCreate], store: Store) -> set[int]:
    """The ``id()`` of those of ``creates`` that repeat a run the store holds: by their
    task key and idempotency key, or else by their ``id`` (as the store answers them)."""
    pairs = [(c.task_key, c.idempotency_key) for c in creates if c.idempotency_key is not None]
    used = await store.runs_by_idempotency_key(pairs) if pairs else {}
    ids = [c.id for c in creates if c.id is not None]
    known = await store.states_of(ids) if ids else {}
    return {
        id(c)
        for c in creates
        if (c.idempotency_key is not None and (c.task_key, c.idempotency_key) in used) or c.id in known
    }
