"""Futures of submitted runs: wait for them, read their results, cancel them.

:class:`TaskRunFuture` is the Trio side; :class:`SyncTaskRunFuture` is its blocking twin
with the same method names, for plain code.

**Waiting costs no polling loop per future.** In one Trio run, every future waiting on
the same server shares one long-poll: the first waiter asks the server for all the runs
being waited on and hands out what ends; when it has its own answer it passes the job to
another waiter. So 10,000 futures awaited at once cost a handful of requests, and
:func:`wait_all` / :func:`as_completed` cost one request per burst of completions.
"""

from __future__ import annotations

import builtins
import math
import sys
import time
import uuid
from collections.abc import AsyncGenerator, Iterable, Iterator, Sequence
from typing import Any, Final, Generic, Literal, Protocol, TypeVar, overload

import attrs
import trio

from trioworker import serializers
from trioworker.client.rest import TaskRunClient, using_client, using_sync_client
from trioworker.errors import (
    ApiError,
    NotFound,
    ParameterError,
    ResultDecodeError,
    ServerUnavailable,
    TaskRunFailed,
)
from trioworker.models import JSON, State, StateType, TaskRun
from trioworker.protocol import SERIALIZER_JSON, SERIALIZER_PICKLE

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class ResultReader(Protocol[R_co]):
    """What a future needs of its task: reading a COMPLETED run's JSON result.

    A :class:`trioworker.Task` is one (its return annotation structures the value), so
    this module needs nothing else of the tasks module.
    """

    @property
    def key(self) -> str:
        """The task key, to name the task in an error."""
        ...

    def load_result(self, data: JSON) -> R_co:
        """The value of a json result; raises :class:`trioworker.serializers.Unreadable`
        (or :class:`~trioworker.errors.ParameterError`) when ``data`` does not fit."""
        ...


#: Seconds of one long-poll before it is asked again (the client caps one poll at 60).
POLL_SECONDS: Final = 60.0
#: After the first run of a burst ends, how long the server gathers more ends: longer the
#: more runs are waited on (a bulk wait trades a little latency for far fewer requests).
LINGER_SECONDS: Final = 0.02
LINGER_PER_RUN: Final = 0.0001
LINGER_MAX: Final = 0.2


def linger_for(waiting: int) -> float:
    return min(LINGER_MAX, max(LINGER_SECONDS, waiting * LINGER_PER_RUN))


# --------------------------------------------------------------------------- results


def _rebuild_exception(data: JSON) -> BaseException | None:
    """The task's own exception, when its class is already imported here and rebuilds."""
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        return None
    module_name, _, qualname = data["type"].rpartition(".")
    module = builtins if module_name == "builtins" else sys.modules.get(module_name)
    if module is None:
        return None  # never import a module because a server said so
    cls: Any = module
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return None
    args = data.get("args")
    try:
        exc = cls(*args) if isinstance(args, list) else cls(data.get("message", ""))
    except Exception:
        return None
    if isinstance(data.get("traceback"), str):
        exc.add_note(f"Remote traceback (the task run's):\n{data['traceback']}")
    return exc


def failure_of(run: TaskRun) -> BaseException:
    """The exception a run that did not complete stands for."""
    state = run.state
    data = state.data if state.type is StateType.FAILED else None
    rebuilt = _rebuild_exception(data)
    if rebuilt is not None:
        return rebuilt
    exc_type = data.get("type") if isinstance(data, dict) else None
    remote = data.get("traceback") if isinstance(data, dict) else None
    message = f"task run {run.name} ({run.id}) ended {state.type.value}"
    if state.message:
        message += f": {state.message}"
    return TaskRunFailed(
        message, state_type=state.type.value, exc_type=exc_type, remote_traceback=remote, task_run=run
    )


def result_of(run: TaskRun, task: ResultReader[Any] | None) -> Any:
    """The value a COMPLETED run returned, structured by the task's return annotation.

    Without a task, the JSON as the server keeps it. Raises :class:`ResultDecodeError`
    when it cannot be read (the return annotation cannot be resolved here, the JSON does
    not fit it, a pickle does not load).
    """
    data = run.state.data
    try:
        if run.serializer == SERIALIZER_PICKLE:
            return serializers.pickle_loads(data)
        return data if task is None else task.load_result(data)
    except (ParameterError, serializers.Unreadable) as exc:
        typed = task is not None and run.serializer == SERIALIZER_JSON
        what = f" as {task.key}'s return annotation says" if typed and task is not None else ""
        raise ResultDecodeError(
            f"the result of task run {run.name} ({run.id}) cannot be read{what}: {exc}",
            data=data,
            task_run=run,
        ) from None


# --------------------------------------------------------------------------- shared waiting


@attrs.define(eq=False)
class _Slot:
    done: trio.Event = attrs.field(factory=trio.Event)
    #: Set when the slot is done or its waiters are asked to take over the long-poll.
    kick: trio.Event = attrs.field(factory=trio.Event)
    run: TaskRun | None = None
    missing: bool = False
    waiters: int = 0


@attrs.define(eq=False)
class _Watcher:
    """All futures of one Trio run waiting on one server: one long-poll at a time."""

    slots: dict[uuid.UUID, _Slot] = attrs.field(factory=dict)
    leading: bool = False
    #: Set when a new run is waited on (the leader asks again, including it).
    added: trio.Event = attrs.field(factory=trio.Event)

    async def wait(self, client: TaskRunClient, run_id: uuid.UUID, seconds: float) -> _Slot:
        slot = self.slots.get(run_id)
        if slot is None:
            slot = self.slots[run_id] = _Slot()
            self.added.set()
        slot.waiters += 1
        try:
            with trio.move_on_after(seconds):
                while not slot.done.is_set():
                    if not self.leading:
                        await self._lead(client, slot)
                    else:
                        # One event per slot, no helper tasks: 10,000 waiters stay cheap.
                        if slot.kick.is_set():
                            slot.kick = trio.Event()
                        await slot.kick.wait()
            return slot
        finally:
            slot.waiters -= 1
            if slot.waiters == 0:
                self.slots.pop(run_id, None)

    async def _lead(self, client: TaskRunClient, mine: _Slot) -> None:
        self.leading = True
        try:
            while not mine.done.is_set():
                ids = [i for i, s in self.slots.items() if not s.done.is_set()]
                self.added = trio.Event()
                async with trio.open_nursery() as nursery:
                    # A run waited on after the request left restarts it (after a short
                    # pause, so that a burst of new waiters costs one restart).
                    nursery.start_soon(_cancel_when, self.added, nursery.cancel_scope, LINGER_SECONDS)
                    answer = await client.wait_many(ids, seconds=POLL_SECONDS, linger=linger_for(len(ids)))
                    nursery.cancel_scope.cancel()
                    for run in answer.ended:
                        self._resolve(run.id, run)
                    for run_id in answer.missing:
                        self._resolve(run_id, None)
        finally:
            self.leading = False
            # Hand the long-poll to the waiters of one run still pending.
            for slot in self.slots.values():
                if not slot.done.is_set() and slot.waiters:
                    slot.kick.set()
                    break

    def _resolve(self, run_id: uuid.UUID, run: TaskRun | None) -> None:
        slot = self.slots.get(run_id)
        if slot is not None and not slot.done.is_set():
            slot.run, slot.missing = run, run is None
            slot.done.set()
            slot.kick.set()


async def _cancel_when(event: trio.Event, scope: trio.CancelScope, pause: float) -> None:
    await event.wait()
    await trio.sleep(pause)
    scope.cancel()


_watchers: Final[trio.lowlevel.RunVar[dict[tuple[tuple[str, ...], str | None], _Watcher]]] = (
    trio.lowlevel.RunVar("trioworker_watchers")
)


def _watcher_for(client: TaskRunClient) -> _Watcher:
    try:
        watchers = _watchers.get()
    except LookupError:
        watchers = {}
        _watchers.set(watchers)
    key = (client.api_urls, client.api_key)  # not the server in use: that one may change
    if key not in watchers:
        watchers[key] = _Watcher()
    return watchers[key]


# --------------------------------------------------------------------------- futures


def _run_id(value: uuid.UUID | str) -> uuid.UUID:
    """A run id from a UUID or its text (as ``trioworker submit`` prints it)."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not a task run id (a UUID, or its text)")


@attrs.define(eq=False, repr=False)
class _FutureBase(Generic[R]):
    #: The run's id; a ``str`` given here is read as a UUID (ValueError if it is not one).
    task_run_id: uuid.UUID = attrs.field(converter=_run_id)
    #: Reads the result (a :class:`trioworker.Task`); without it, the JSON as the server keeps it.
    task: ResultReader[R] | None = None
    #: The run as last seen (after a wait, its final form).
    task_run: TaskRun | None = None

    @property
    def state(self) -> State | None:
        """The state last seen (None before anything was read)."""
        return None if self.task_run is None else self.task_run.state

    @property
    def done(self) -> bool:
        return self.task_run is not None and self.task_run.state.is_terminal

    def _outcome(self, raise_on_failure: bool) -> R | BaseException:
        run = self.task_run
        if run is None or not run.state.is_terminal:
            raise TimeoutError(f"task run {self.task_run_id} has not finished yet")
        if run.state.type is StateType.COMPLETED:
            return result_of(run, self.task)  # type: ignore[no-any-return]
        failure = failure_of(run)
        if raise_on_failure:
            raise failure
        return failure

    def __repr__(self) -> str:
        state = "unknown" if self.state is None else self.state.type.value
        return f"<{type(self).__name__} {self.task_run_id} {state}>"


class TaskRunFuture(_FutureBase[R]):
    """A submitted run, from Trio: ``await future.result()``.

    All methods are async; each talks to the server through the client of the enclosing
    ``trioworker.connect()`` (or a short-lived one).
    """

    async def wait(self, timeout: float | None = None) -> TaskRun | None:  # noqa: ASYNC109 - the futures API
        """Wait until the run ends (or ``timeout`` seconds pass); returns the run as last seen.

        **Cancellation handling:** cancelling the wait leaves the run alone; use
        :meth:`cancel` for that.
        """
        if self.done:
            return self.task_run
        async with using_client() as client:
            return await wait_with(client, self, math.inf if timeout is None else timeout)

    @overload
    async def result(self, timeout: float | None = None, raise_on_failure: Literal[True] = True) -> R: ...  # noqa: ASYNC109
    @overload
    async def result(self, timeout: float | None = None, *, raise_on_failure: bool) -> R | BaseException: ...  # noqa: ASYNC109
    async def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> R | BaseException:  # noqa: ASYNC109
        """The task's return value; waits for it (``timeout``: TimeoutError if still running).

        A run that did not complete raises its task's own exception type when that class
        is importable here (with the remote traceback as a note), else :class:`TaskRunFailed`.
        With ``raise_on_failure=False`` that exception is returned instead. A run that
        completed with a result that cannot be read here as the return annotation says
        raises :class:`~trioworker.ResultDecodeError` either way (the run did not fail).
        """
        await self.wait(timeout)
        return self._outcome(raise_on_failure)

    async def get_state(self) -> State:
        """Read the run's current state from the server."""
        async with using_client() as client:
            self.task_run = await client.read_task_run(self.task_run_id)
        return self.task_run.state

    async def cancel(self) -> bool:
        """Cancel the run: never delivered if still queued; its cancel scope cancelled if
        it runs async code on a worker. The runs submitted from inside it (and from inside
        those) that have not ended are cancelled with it, but detached ones. False when it
        had already finished otherwise."""
        async with using_client() as client:
            try:
                result = await client.cancel(self.task_run_id)
            except ApiError as exc:
                if exc.status_code == 409:  # it had finished
                    return False
                raise
        self.task_run = None if self.task_run is None else attrs.evolve(self.task_run, state=result.state)
        return True


async def wait_with(client: TaskRunClient, future: TaskRunFuture[Any], seconds: float) -> TaskRun | None:
    """:meth:`TaskRunFuture.wait` with ``client``: the run once it ended (or as last seen
    after ``seconds``), set on ``future`` too. Over the client channel when it is open,
    else on the long-poll that every waiter of one Trio run on that server shares.

    Raises:
        NotFound: the run does not exist (deleted while waited for).
    """
    channel = client._live_channel()
    if channel is not None:
        try:
            ended = await channel.wait(future.task_run_id, seconds)
        except ServerUnavailable:
            pass  # the channel was lost: the shared long-poll takes over
        else:
            future.task_run = ended or future.task_run or await client.read_task_run(future.task_run_id)
            return future.task_run
    slot = await _watcher_for(client).wait(client, future.task_run_id, seconds)
    if slot.missing:
        raise_missing(future.task_run_id)
    if slot.run is not None:
        future.task_run = slot.run
    elif future.task_run is None:
        future.task_run = await client.read_task_run(future.task_run_id)
    return future.task_run


class SyncTaskRunFuture(_FutureBase[R]):
    """The blocking twin of :class:`TaskRunFuture`, for plain code: ``future.result()``."""

    def wait(self, timeout: float | None = None) -> TaskRun | None:
        if self.done:
            return self.task_run
        with using_sync_client() as client:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = POLL_SECONDS if deadline is None else max(0.0, deadline - time.monotonic())
                self.task_run = client.wait(self.task_run_id, seconds=min(left, POLL_SECONDS))
                if self.task_run.state.is_terminal or (deadline is not None and left <= 0):
                    return self.task_run

    @overload
    def result(self, timeout: float | None = None, raise_on_failure: Literal[True] = True) -> R: ...
    @overload
    def result(self, timeout: float | None = None, *, raise_on_failure: bool) -> R | BaseException: ...
    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> R | BaseException:
        self.wait(timeout)
        return self._outcome(raise_on_failure)

    def get_state(self) -> State:
        with using_sync_client() as client:
            self.task_run = client.read_task_run(self.task_run_id)
        return self.task_run.state

    def cancel(self) -> bool:
        with using_sync_client() as client:
            try:
                result = client.cancel(self.task_run_id)
            except ApiError as exc:
                if exc.status_code == 409:
                    return False
                raise
        self.task_run = None if self.task_run is None else attrs.evolve(self.task_run, state=result.state)
        return True


def raise_missing(run_id: uuid.UUID) -> None:
    raise NotFound(404, f"no task run {run_id} (deleted?)")


# --------------------------------------------------------------------------- many at once


def _take_pushed(client: TaskRunClient, pending: dict[uuid.UUID, TaskRunFuture[R]]) -> list[TaskRunFuture[R]]:
    """The futures of ``pending`` whose runs' ends the client channel has already (their
    creates were watched): taken out of ``pending``, their ``task_run`` set, in order.

    Raises:
        NotFound: the server said one of them is gone.
    """
    channel = client.channel
    if channel is None:
        return []
    taken: list[TaskRunFuture[R]] = []
    for run_id, future in list(pending.items()):
        ended = channel.ended(run_id)
        if ended is not None:
            future.task_run = ended
            taken.append(pending.pop(run_id))
    return taken


async def wait_all(futures: Iterable[TaskRunFuture[Any]], timeout: float | None = None) -> None:  # noqa: ASYNC109
    """Wait until every future's run ended (or ``timeout`` passes): one long-poll per answer
    (none for the runs whose ends the client channel has already)."""
    pending = {f.task_run_id: f for f in futures if not f.done}
    if not pending:
        await trio.lowlevel.checkpoint()
        return
    with trio.move_on_after(math.inf if timeout is None else timeout):
        async with using_client() as client:
            _take_pushed(client, pending)
            if not pending:
                await trio.lowlevel.checkpoint()
            while pending:
                answer = await client.wait_many(list(pending), seconds=POLL_SECONDS, wait_all=True)
                for run in answer.ended:
                    pending.pop(run.id).task_run = run
                for run_id in answer.missing:
                    raise_missing(run_id)


async def as_completed(
    futures: Iterable[TaskRunFuture[R]],
    timeout: float | None = None,  # noqa: ASYNC109
) -> AsyncGenerator[TaskRunFuture[R], None]:
    """Yield futures as their runs end, in the order they end.

    An async generator: use it in ``async with contextlib.aclosing(...)`` when you may
    stop early, so that its request is closed at once.

    Raises TimeoutError if ``timeout`` passes first.
    """
    pending: dict[uuid.UUID, TaskRunFuture[R]] = {}
    for future in futures:
        if future.done:
            yield future
        else:
            pending[future.task_run_id] = future
    deadline = trio.current_time() + (math.inf if timeout is None else timeout)
    async with using_client() as client:
        for future in _take_pushed(client, pending):
            yield future
        while pending:
            left = deadline - trio.current_time()
            if left <= 0:
                raise TimeoutError(f"{len(pending)} task run(s) still running")
            answer = await client.wait_many(
                list(pending), seconds=min(left, POLL_SECONDS), linger=linger_for(len(pending))
            )
            for run_id in answer.missing:
                raise_missing(run_id)
            for run in answer.ended:
                future = pending.pop(run.id)
                future.task_run = run
                yield future


def sync_wait_all(futures: Iterable[SyncTaskRunFuture[Any]], timeout: float | None = None) -> None:
    """Blocking :func:`wait_all` (``trioworker.sync.wait_all``)."""
    pending = {f.task_run_id: f for f in futures if not f.done}
    deadline = None if timeout is None else time.monotonic() + timeout
    with using_sync_client() as client:
        while pending:
            left = POLL_SECONDS if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return
            answer = client.wait_many(list(pending), seconds=min(left, POLL_SECONDS), wait_all=True)
            for run in answer.ended:
                pending.pop(run.id).task_run = run
            for run_id in answer.missing:
                raise_missing(run_id)


def sync_as_completed(
    futures: Iterable[SyncTaskRunFuture[R]], timeout: float | None = None
) -> Iterator[SyncTaskRunFuture[R]]:
    """Blocking :func:`as_completed` (``trioworker.sync.as_completed``)."""
    pending: dict[uuid.UUID, SyncTaskRunFuture[R]] = {}
    for future in futures:
        if future.done:
            yield future
        else:
            pending[future.task_run_id] = future
    deadline = None if timeout is None else time.monotonic() + timeout
    with using_sync_client() as client:
        while pending:
            left = POLL_SECONDS if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(pending)} task run(s) still running")
            answer = client.wait_many(
                list(pending), seconds=min(left, POLL_SECONDS), linger=linger_for(len(pending))
            )
            for run_id in answer.missing:
                raise_missing(run_id)
            for run in answer.ended:
                future = pending.pop(run.id)
                future.task_run = run
                yield future


def futures_of(runs: Sequence[TaskRun], task: ResultReader[R] | None) -> list[TaskRunFuture[R]]:
    return [TaskRunFuture(run.id, task, run) for run in runs]
