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

**How a create is judged**: its runs that would be queued at once are counted per key
against the room left, together with the creates admitted and not yet queued (so creates
in flight at the same moment cannot overshoot together). A batch is all or nothing, as
ever: if its creates do not all fit, it is refused whole, and the refusal says how many of
its first creates fit (``room``), so that a client sends those and waits for the rest.
Before refusing, the creates that repeat a run already made (their ``id`` names one) are
left out of the count: a create sent again after a lost answer gets its run back, never a
429. Nothing is written for a refused create.

With several servers on one PostgreSQL database (replicas), no dispatcher holds ready runs:
each create counts the key's ready runs in the store's ready table (one read per create
request). Creates in flight on other servers at that moment are not seen, so servers
creating at once may overshoot the limit by what they admit together.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final

import attrs

from trioworker.models import JSON, TaskRunCreate
from trioworker.server.queue import Dispatcher
from trioworker.server.sockets import Refusal
from trioworker.server.store.base import SharedStore, Store

#: Seconds a client is told to wait before it sends a refused create again (``Retry-After``).
RETRY_AFTER_SECONDS: Final = 1


class QueueFullRefusal(Refusal):
    """429: a create would take the queue of ``task_key`` past ``max_queued``.

    ``room`` is how many of the request's first creates would have fit (0 for one create).
    """

    def __init__(self, task_key: str, queued: int, max_queued: int, room: int) -> None:
        super().__init__(
            429,
            f"the queue of task {task_key!r} is full: {queued} runs wait for a worker "
            f"(--max-queued {max_queued})",
        )
        self.task_key = task_key
        self.max_queued = max_queued
        self.room = room

    def body(self) -> dict[str, JSON]:
        return {
            **super().body(),
            "task_key": self.task_key,
            "max_queued": self.max_queued,
            "room": self.room,
            "retry_after": RETRY_AFTER_SECONDS,
        }

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_SECONDS)}


@attrs.define(eq=False)
class QueueLimit:
    """The bound on queued runs per task key; None: no bound (the default)."""

    max_queued: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )
    #: Per task key: runs of creates admitted and not yet in the dispatcher's queue.
    _admitted: Counter[str] = attrs.field(factory=Counter)

    @asynccontextmanager
    async def admitting(
        self, creates: Sequence[TaskRunCreate], dispatcher: Dispatcher, store: Store
    ) -> AsyncIterator[None]:
        """Hold room for ``creates`` while the block writes and queues them.

        Raises:
            QueueFullRefusal: they do not all fit (nothing is held then).
        """
        if self.max_queued is None:
            yield
            return
        now = dispatcher.clock()
        counted = [c for c in creates if c.scheduled_time is None or c.scheduled_time.timestamp() <= now]
        counted = [c for c in counted if not c.wait_for]
        ready = await self._ready_counts(counted, dispatcher, store)
        if self._refusal(counted, creates, ready) is not None:
            # Only now, on the way to a refusal: repeats of runs already made do not count.
            ids = [c.id for c in counted if c.id is not None]
            known = set(await store.states_of(ids)) if ids else set()
            counted = [c for c in counted if c.id not in known]
            refusal = self._refusal(counted, creates, ready)
            if refusal is not None:
                raise refusal
        held = Counter(c.task_key for c in counted)
        self._admitted.update(held)
        try:
            yield
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

    def _refusal(
        self, counted: Sequence[TaskRunCreate], creates: Sequence[TaskRunCreate], ready: Mapping[str, int]
    ) -> QueueFullRefusal | None:
        """The refusal of ``creates`` when the ``counted`` of them do not all fit; else None."""
        assert self.max_queued is not None
        counting = {id(c) for c in counted}
        added: Counter[str] = Counter()
        for position, create in enumerate(creates):
            if id(create) not in counting:
                continue
            key = create.task_key
            queued = ready.get(key, 0) + self._admitted[key]
            if queued + added[key] + 1 > self.max_queued:
                return QueueFullRefusal(key, queued, self.max_queued, position)
            added[key] += 1
        return None
