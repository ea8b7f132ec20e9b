"""The live feed: the changes the dashboard's tabs hear about, pushed as they happen.

The service tells the :class:`LiveFeed` of every change it makes (runs created, states
changed, runs deleted, workers connected or gone): :meth:`LiveFeed.runs_changed` and its
siblings cost nothing while no tab listens, and one dictionary write per listening tab
otherwise. Nothing polls: each tab's session (:mod:`~trioworker.server.events`) sleeps on
its :class:`FeedListener`'s event until something changed.

**Coalescing:** a listener keeps only the latest note per run, and its session sends at
most one message per :data:`COALESCE_SECONDS`: a run created, started and completed within
that time reaches the tab as one note, and a burst of 1,000 runs a second as a few messages.

**Bounded buffers:** a listener holds at most :data:`MAX_PENDING_NOTES` runs. A tab that
falls behind (more changes than that between two messages, or a socket that does not
drain) loses its notes and is told to read its view again (``resync``): the feed never
waits for a tab, so a slow tab cannot slow the server.

**The overview** (:meth:`LiveFeed.overview`) is read from the store once for every caller
that wants it at a moment (one read at a time; those who come meanwhile share the next).
For the tabs' pushes it is also read not more often than :meth:`LiveFeed.overview_interval`
allows (at least :data:`MIN_OVERVIEW_SECONDS`, and 20 times what the last read cost), so
that open tabs never take more than a small share of the store's time; a request
(``GET /api/overview``, a scrape of ``/metrics``) does not wait for that interval, which
can grow to seconds while the store is busy.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Final, Generic, TypeVar

import attrs
import trio

from trioworker.models import JSON, StateType, TaskRun

T = TypeVar("T")

#: A tab's session sends at most one message of run changes per this many seconds.
COALESCE_SECONDS: Final = 0.25
#: Most runs a tab's buffer holds between two messages; beyond that it resyncs.
MAX_PENDING_NOTES: Final = 1000
#: The overview is read at most once per this many seconds...
MIN_OVERVIEW_SECONDS: Final = 0.5
#: ...and at most once per this many times what its last read took.
OVERVIEW_COST_FACTOR: Final = 20


@attrs.frozen
class RunNote:
    """One change of one run, as a tab hears of it.

    ``deleted``: the run is gone. Otherwise ``state_type`` is its state now, or None when the
    change is known but not the state (the tab reads the run again). ``task_key``,
    ``name`` and ``state_name`` are None where the change did not say.
    """

    id: uuid.UUID
    state_type: StateType | None = None
    state_name: str | None = None
    task_key: str | None = None
    name: str | None = None
    #: When the run reached that state (its state's timestamp).
    timestamp: datetime | None = None
    #: The run it was submitted from (so that run's page hears of its new children).
    parent_task_run_id: uuid.UUID | None = None
    deleted: bool = False

    @classmethod
    def of(cls, run: TaskRun) -> RunNote:
        state = run.state
        return cls(
            run.id, state.type, state.name, run.task_key, run.name, state.timestamp, run.parent_task_run_id
        )

    def to_json(self) -> dict[str, JSON]:
        return {
            "id": str(self.id),
            "state_type": None if self.state_type is None else self.state_type.value,
            "state_name": self.state_name,
            "task_key": self.task_key,
            "name": self.name,
            "timestamp": None if self.timestamp is None else self.timestamp.isoformat(),
            "parent_task_run_id": None if self.parent_task_run_id is None else str(self.parent_task_run_id),
            "deleted": self.deleted,
        }


@attrs.define(eq=False)
class FeedListener:
    """One tab's side of the feed: what changed since its session last sent."""

    #: The latest note per run, in the order the runs first changed.
    pending: dict[uuid.UUID, RunNote] = attrs.field(factory=dict)
    #: More runs changed than :data:`MAX_PENDING_NOTES`: the notes were dropped.
    overflowed: bool = False
    #: Set when a note (or an overflow) is waiting.
    runs_changed: trio.Event = attrs.field(factory=trio.Event)
    #: Set when anything the overview shows changed.
    overview_changed: trio.Event = attrs.field(factory=trio.Event)
    #: Set when schedules were created, changed, deleted or fired (the tab reads them again).
    schedules_changed: trio.Event = attrs.field(factory=trio.Event)

    def add(self, notes: list[RunNote]) -> None:
        if not self.overflowed:
            for note in notes:
                self.pending[note.id] = note
            if len(self.pending) > MAX_PENDING_NOTES:
                self.pending.clear()
                self.overflowed = True
        self.runs_changed.set()
        self.overview_changed.set()

    def take(self) -> tuple[list[RunNote], bool]:
        """``(notes, overflowed)`` since the last take, and a fresh start."""
        notes, overflowed = list(self.pending.values()), self.overflowed
        self.pending.clear()
        self.overflowed = False
        self.runs_changed = trio.Event()
        return notes, overflowed


@attrs.define(eq=False)
class _Cached(Generic[T]):
    value: T
    #: The feed's version when the read began: the changes it may not show came later.
    version: int
    #: ``trio.current_time()`` when the read ended.
    at: float


@attrs.define(eq=False)
class LiveFeed(Generic[T]):
    """Where the service reports changes and the tabs' sessions listen; ``T`` is what the
    overview is (:class:`~trioworker.server.overview.Overview`)."""

    _listeners: set[FeedListener] = attrs.field(factory=set)
    #: Counts every change; an overview read at version v shows every change up to v.
    version: int = 0
    _overview: _Cached[T] | None = None
    _overview_cost: float = 0.0
    _overview_lock: trio.Lock = attrs.field(factory=trio.Lock)

    @property
    def listening(self) -> int:
        """How many tabs listen."""
        return len(self._listeners)

    @property
    def listeners(self) -> list[FeedListener]:
        """The listeners now (a copy)."""
        return list(self._listeners)

    @contextmanager
    def listen(self) -> Iterator[FeedListener]:
        """A listener that hears every change while the block lasts."""
        listener = FeedListener()
        self._listeners.add(listener)
        try:
            yield listener
        finally:
            self._listeners.discard(listener)

    # -- what the service reports
    def runs_changed(self, runs: Iterable[TaskRun]) -> None:
        """These runs were created or changed (each as it is now)."""
        self.version += 1
        if self._listeners:
            self._publish([RunNote.of(run) for run in runs])

    def states_changed(self, states: Iterable[tuple[uuid.UUID, StateType | None]]) -> None:
        """These runs changed to these state types (None: to a state not known here)."""
        self.version += 1
        if self._listeners:
            self._publish([RunNote(run_id, state) for run_id, state in states])

    def deleted(self, run_ids: Iterable[uuid.UUID]) -> None:
        self.version += 1
        if self._listeners:
            self._publish([RunNote(run_id, deleted=True) for run_id in run_ids])

    def workers_changed(self) -> None:
        """A worker connected or left (the overview lists them)."""
        self.version += 1
        for listener in self._listeners:
            listener.overview_changed.set()

    def schedules_changed(self) -> None:
        """Schedules were created, changed, deleted, or fired (their fire times moved on)."""
        for listener in self._listeners:
            listener.schedules_changed.set()

    def _publish(self, notes: list[RunNote]) -> None:
        if notes:
            for listener in self._listeners:
                listener.add(notes)

    # -- the overview
    def overview_interval(self) -> float:
        """Seconds between two reads of the overview: :data:`MIN_OVERVIEW_SECONDS`, or
        :data:`OVERVIEW_COST_FACTOR` times what the last read took, whichever is longer."""
        return max(MIN_OVERVIEW_SECONDS, OVERVIEW_COST_FACTOR * self._overview_cost)

    async def overview(self, read: Callable[[], Awaitable[T]], *, throttled: bool) -> T:
        """The overview, showing at least every change made before this call.

        The last one read is shared when nothing changed since; otherwise ``read`` reads a
        new one, one read at a time: callers that come while one is under way wait for it,
        and share it or the next. ``throttled`` (a tab's push) first waits until
        :meth:`overview_interval` has passed since the last read, without holding up the
        callers that do not.

        **Cancellation handling:** a caller cancelled while it waits (or reads) leaves;
        the next caller reads in its place.
        """
        wanted = self.version
        cached = self._overview
        if throttled and cached is not None and cached.version < wanted:
            await trio.sleep_until(cached.at + self.overview_interval())
        async with self._overview_lock:
            cached = self._overview
            if cached is not None and cached.version >= wanted:
                return cached.value
            version, started = self.version, trio.current_time()
            value = await read()
            now = trio.current_time()
            self._overview = _Cached(value, version, now)
            self._overview_cost = now - started
            return value
