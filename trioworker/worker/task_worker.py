"""The worker: :class:`TaskWorker` and :func:`serve`.

The nursery tree of a running worker::

    TaskWorker.start()
      nursery
        status server (hypercorn, only with a port)     started with nursery.start
        subscription: websocket, reconnecting           started with nursery.start
        schedules: the tasks' schedule= registered with the server once subscribed
        runs nursery: one task per run; async code runs here, sync code in
                      trio.to_thread.run_sync; a CapacityLimiter bounds them all

When ``start()`` returns, every task and socket of the worker has ended, and no thread runs
its code, except the thread of a sync task still running when the grace period ran out:
the worker stopped waiting for it (see :class:`TaskWorker`). (The threads that ran sync
tasks belong to Trio's thread cache, which keeps them idle for a while for reuse.)
"""

from __future__ import annotations

import contextlib
import enum
import gc
import logging
import math
import os
import random
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, final

import attrs
import httpx
import trio

from trioworker._util import only_exception
from trioworker._websocket import OpenStream
from trioworker.client.rest import TaskRunClient, connect, using_client
from trioworker.client.schedules import declared_schedules
from trioworker.connection import connection_options
from trioworker.errors import ApiError, NotFound, ServerUnavailable, StopTaskWorker
from trioworker.models import (
    ScheduleCreate,
    SetStateResult,
    SetStateStatus,
    State,
    StateDetails,
    StateType,
    TaskRun,
    make_state,
    utcnow,
)
from trioworker.servers import ApiUrls, UsesServers, as_servers, next_backoff
from trioworker.settings import (
    DEFAULT_SHUTDOWN_GRACE_SECONDS,
    DEFAULT_STATUS_HOST,
    MAX_PREFETCH,
    Settings,
)
from trioworker.tasks import Task
from trioworker.worker import _threads, engine, failures
from trioworker.worker.engine import Outcome
from trioworker.worker.statistics import WorkerStatistics
from trioworker.worker.subscription import SubscriptionClient

log = logging.getLogger("trioworker.worker")

#: Credit asked for when the worker has no limit.
UNLIMITED_CREDIT: Final = 1000
#: Threads for sync tasks when the worker has no limit.
UNLIMITED_THREADS: Final = 100
#: Seconds to wait for the server to confirm the quit once runs are done or handed back.
QUIT_TIMEOUT: Final = 5.0
#: The same after a stop without grace (a second signal): the hand-back is best effort.
FORCED_QUIT_TIMEOUT: Final = 1.0
#: While stopping, the runs still going are logged this often (seconds).
WAITING_LOG_INTERVAL: Final = 5.0
#: Runs named in one such log line (the rest are counted).
WAITING_LOG_RUNS: Final = 10
#: Runs whose recent worker faults are remembered (for the hand-back backoff).
FAULTS_REMEMBERED: Final = 1024
#: A run whose handling faults in this worker this many times in a row (faults that are not
#: the server's or the network's) ends FAILED instead of being handed back again.
MAX_WORKER_FAULTS: Final = 3


class WorkerState(enum.Enum):
    UNOPENED = "unopened"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class _RestReporter:
    """Reports over REST, for runs handed to :meth:`TaskWorker.execute_task_run`."""

    def __init__(self, client: TaskRunClient) -> None:
        self.client = client

    async def report(self, run_id: uuid.UUID, state: State) -> SetStateResult:
        return await self.client.set_state(run_id, state)


def _check_tasks(tasks: Iterable[object]) -> dict[str, Task[..., Any]]:
    by_key: dict[str, Task[..., Any]] = {}
    for item in tasks:
        if not isinstance(item, Task):
            raise TypeError(f"{item!r} is not a task: decorate the function with @trioworker.task")
        if item.key in by_key and by_key[item.key] is not item:
            raise ValueError(f"two different tasks share the key {item.key!r}")
        by_key[item.key] = item
    if not by_key:
        raise ValueError("a worker needs at least one task")
    return by_key


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@final
class TaskWorker(UsesServers):
    """Subscribes to runs of ``tasks`` and runs them, at most ``limit`` at once.

    Args:
        tasks: the :class:`~trioworker.Task` objects this worker serves.
        limit: the most runs at once (None: no limit; the worker then asks for up to
            1,000 runs at a time and runs sync tasks on up to 100 threads).
        api_url, api_key: the server (default ``TRIOWORKER_API_URL`` / ``TRIOWORKER_API_KEY``);
            ``http://host:port`` as the server prints it, or ``.../api``. Or several servers,
            replicas of one deployment, in the order to try them: comma-separated in one
            string, or a sequence. The subscription and the REST client share the position
            in the list (:attr:`api_url` is the server in use, :attr:`api_urls` all of
            them): when the server in use goes away (its socket lost, closed with 1012,
            refused), the worker subscribes to the next one at once, naming the runs it
            still holds, and keeps them; see :mod:`trioworker.servers`.
        shutdown_grace_seconds: after :meth:`stop`, how long in-flight runs may finish
            before they are cancelled and handed back to the queue.
        status_server_port: serve ``/status``, ``/health`` and ``/metrics`` on this port
            (0 picks a free one; see :attr:`status_url`).
        status_server_host: the address the status server listens on (``"0.0.0.0"``: every
            interface, for a probe on another host).
        allow_pickle: accept runs whose parameters are pickled (they can run any code).
        client_id: how the server knows this worker (default ``"<hostname>-<pid>"``).
        prefetch: runs the server may send ahead into this worker's buffer, so that a
            freed slot starts its next run at once instead of after a round trip to the
            server (worth it for short runs; 0, the default, keeps every waiting run on the
            server). A run waits in the buffer only while no other worker of its task has
            a free slot; when one gets one, the server takes back the runs not started.
            Without a limit there is nothing to wait for, and prefetch is 0.
        ca_bundle, insecure, headers: how to connect to the servers, over HTTP and
            websockets alike (default ``TRIOWORKER_API_CA_BUNDLE``,
            ``TRIOWORKER_API_INSECURE``, ``TRIOWORKER_API_HEADERS``): the CA certificates an
            ``https://`` server's certificate is checked against (a PEM file or a folder;
            default the system's), no check at all (a warning is logged), headers sent on
            every request and websocket handshake (see :mod:`trioworker.connection`).
        open_stream: a test seam: opens the byte stream under the worker's websockets
            (the subscription and the client channel; see :mod:`trioworker._websocket`).
            The default is TCP, with TLS for ``https://``; tests pass one that returns
            an in-memory stream whose other end plays the server.

    **Cancellation handling:** :meth:`stop` (or SIGTERM/SIGINT under :func:`serve`)
    stops taking runs, lets in-flight runs finish within the grace period, then cancels
    them and hands them back to the queue (SCHEDULED/Redelivered) for another worker.
    A sync task's thread cannot be interrupted: it is told (its
    ``trio.from_thread.check_cancelled()`` raises), and once the grace period is over the
    worker stops waiting for it. Such a thread runs on in the background until its
    function returns (in a ``trioworker worker`` process it ends with the process);
    whatever it returns is discarded, and its run is never reported twice. Before the
    grace period is over, a cancelled sync run (a cancel from the server, a timeout)
    waits for its thread as ``trio.to_thread.run_sync`` does. Cancelling :meth:`start`'s
    scope from outside cancels every run at once and waits for their threads.
    A sync task's ``trio.from_thread.run`` calls run in Trio's system nursery.

    **Error handling:** each run is its own failure domain. What its task raises ends
    the run (FAILED or a retry). An error of the worker's own handling of one run (a
    REST call that fails while it reads a dependency's result, a bug) is logged with the
    run id and the run is handed back to the queue, after a backoff that grows for that
    run (up to 15 s); the other runs are untouched.
    """

    def __init__(
        self,
        *tasks: Task[..., Any],
        limit: int | None = 10,
        api_url: ApiUrls | None = None,
        api_key: str | None = None,
        shutdown_grace_seconds: float = DEFAULT_SHUTDOWN_GRACE_SECONDS,
        status_server_port: int | None = None,
        status_server_host: str = DEFAULT_STATUS_HOST,
        allow_pickle: bool = False,
        client_id: str | None = None,
        prefetch: int = 0,
        open_stream: OpenStream | None = None,
        ca_bundle: str | Path | None = None,
        insecure: bool | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._tasks = _check_tasks(tasks)
        if limit is not None and limit < 1:
            raise ValueError("limit must be >= 1, or None for no limit")
        if not 0 <= prefetch <= MAX_PREFETCH:
            raise ValueError(f"prefetch must be from 0 to {MAX_PREFETCH}")
        if shutdown_grace_seconds < 0:
            raise ValueError("shutdown_grace_seconds must be >= 0")
        settings = Settings.from_env()
        #: The servers, and the one in use (shared by the subscription and the REST client).
        self.servers = as_servers(api_url or settings.api_url)
        self.api_key = api_key if api_key is not None else settings.api_key
        #: TLS and the extra headers of every connection to the servers.
        self.connection = connection_options(ca_bundle, insecure, headers)
        self.limit = limit
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self.status_server_port = status_server_port
        self.status_server_host = status_server_host
        self.allow_pickle = allow_pickle
        self.prefetch = prefetch if limit is not None else 0
        self.delete_failed_submissions = _env_flag("TRIOWORKER_DELETE_FAILED_SUBMISSIONS")
        self.client_id = client_id or f"{socket.gethostname()}-{os.getpid()}"
        self.started_at: datetime | None = None
        self.status_url: str | None = None
        #: Per task key: run id -> when it started running here.
        self.in_flight_task_runs: dict[str, dict[uuid.UUID, datetime]] = {k: {} for k in self._tasks}
        #: Per task key: runs that ended here (completed, failed, retrying or cancelled).
        self.finished_task_runs: dict[str, int] = dict.fromkeys(self._tasks, 0)
        self.started_task_runs: dict[str, int] = dict.fromkeys(self._tasks, 0)
        self.failed_task_runs: dict[str, int] = dict.fromkeys(self._tasks, 0)
        self._state = WorkerState.UNOPENED
        self._limiter = trio.CapacityLimiter(limit if limit is not None else math.inf)
        self._thread_limiter = trio.CapacityLimiter(limit if limit is not None else UNLIMITED_THREADS)
        #: Runs whose lease the subscription holds for this worker.
        self._held: set[uuid.UUID] = set()
        #: Runs this worker is executing or about to (from the subscription or
        #: execute_task_run): one execution per run id at a time.
        self._claimed: set[uuid.UUID] = set()
        #: Runs whose attempt here is over while its last report is still on its way.
        self._ending: dict[uuid.UUID, _Ending] = {}
        self._faults: dict[uuid.UUID, int] = {}
        self._hard_faults: dict[uuid.UUID, int] = {}
        self._thread_waits = _threads.ThreadWaits()
        self._stopping = trio.Event()
        self._stop_deadline = math.inf
        self._stop_changed = trio.Event()
        self._forced = False
        self._grace_scope: trio.CancelScope | None = None
        self._quit_scope: trio.CancelScope | None = None
        self._scopes: dict[uuid.UUID, trio.CancelScope] = {}
        self._cancel_requested: set[uuid.UUID] = set()
        self._dispatch_scope: trio.CancelScope | None = None
        #: The runs nursery while the worker takes runs (None before and once stopping).
        self._runs: trio.Nursery | None = None
        #: Delivered runs on their way through the deliveries channel to :meth:`_take`
        #: (while there are any, a new one queues behind them: runs start in order).
        self._queued = 0
        self._startup_scope: trio.CancelScope | None = None
        self._subscription: SubscriptionClient | None = None
        self._running_context: Any = None
        self._open_stream = open_stream

    def _connect(self) -> contextlib.AbstractAsyncContextManager[TaskRunClient]:
        """:func:`trioworker.connect` to this worker's servers, as this worker connects."""
        options = self.connection
        return connect(
            self.servers,
            self.api_key,
            open_stream=self._open_stream,
            ca_bundle=options.ca_bundle,
            insecure=options.insecure,
            headers=dict(options.headers),
        )

    # -- what users read
    @property
    def task_keys(self) -> list[str]:
        return list(self._tasks)

    @property
    def started(self) -> bool:
        return self._state is not WorkerState.UNOPENED

    @property
    def stopping(self) -> bool:
        return self._state in (WorkerState.STOPPING, WorkerState.STOPPED)

    @property
    def stop_deadline(self) -> float:
        """Trio time (``trio.current_time()``) by which this stopping worker has given up on
        its runs and only hands back what it holds: the end of the grace period, plus the
        second to hand runs back after a stop without grace. ``math.inf`` while running."""
        return self._stop_deadline + (FORCED_QUIT_TIMEOUT if self._forced else 0.0)

    @property
    def stopped_without_grace(self) -> bool:
        """``stop(grace_seconds=0)`` was called (a second signal under :func:`serve`)."""
        return self._forced

    async def stop_deadline_changed(self) -> None:
        """Return when :attr:`stop_deadline` next changes (a stop, a shorter stop)."""
        await self._stop_changed.wait()

    def unfinished_runs(self) -> list[str]:
        """The runs still executing, oldest first: ``"<task key> <run id> (running 3.2 s)"``."""
        return self._running_names()

    def _set_stop_deadline(self, deadline: float) -> None:
        self._stop_deadline = deadline
        self._stop_changed.set()
        self._stop_changed = trio.Event()

    @property
    def connected(self) -> bool:
        """True while the worker holds a live subscription to the server."""
        subscription = self._subscription
        return self._state is not WorkerState.STOPPED and subscription is not None and subscription.connected

    @property
    def current_tasks(self) -> int:
        """Runs executing right now."""
        return int(self._limiter.borrowed_tokens)

    @property
    def available_tasks(self) -> float:
        """Free slots (``math.inf`` without a limit)."""
        return self._limiter.available_tokens

    def statistics(self) -> WorkerStatistics:
        """A frozen snapshot of the counters and state above (copies: later runs do not
        change it); the status server reads only this."""
        return WorkerStatistics(
            client_id=self.client_id,
            started_at=self.started_at,
            stopping=self.stopping,
            connected=self.connected,
            limit=self.limit,
            prefetch=self.prefetch,
            current_tasks=self.current_tasks,
            available_tasks=self.available_tasks,
            task_keys=tuple(self._tasks),
            in_flight_task_runs={key: dict(runs) for key, runs in self.in_flight_task_runs.items()},
            started_task_runs=dict(self.started_task_runs),
            finished_task_runs=dict(self.finished_task_runs),
            failed_task_runs=dict(self.failed_task_runs),
        )

    def __repr__(self) -> str:
        return f"<TaskWorker {self.client_id} {self._state.value} tasks={self.task_keys} limit={self.limit}>"

    # -- lifecycle
    async def start(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - Prefect's name: serve at most that long
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until :meth:`stop` (or until ``timeout`` seconds passed); reports ``started``
        once subscribed.

        Args:
            timeout: serve for at most this many seconds (Trio's clock, counted from this
                call), then stop as :meth:`stop` does, the grace period included, log that
                the time ran out, and return normally. None (the default): until stopped.

        Raises:
            ValueError: ``timeout`` is negative or NaN.
            RuntimeError: the worker was started before.

        **Error handling:** a failing run never stops the worker (it ends FAILED). Errors
        of the worker itself (a refused API key, a status port in use) propagate: one error
        as itself, several at once as an exception group.
        """
        _check_timeout(timeout)
        if self._state is not WorkerState.UNOPENED:
            raise RuntimeError("this TaskWorker was already started; create a new one to start again")
        self._state = WorkerState.RUNNING
        self.started_at = utcnow()
        log.info("Subscribing to runs of task(s): %s", " | ".join(self._tasks))
        send, receive = trio.open_memory_channel[TaskRun](math.inf)
        self._subscription = SubscriptionClient(
            api_url=self.servers,
            api_key=self.api_key,
            keys=tuple(self._tasks),
            client_id=self.client_id,
            credit=self.limit if self.limit is not None else UNLIMITED_CREDIT,
            held=lambda: set(self._held),
            on_cancel=self._on_cancel,
            on_delivery=self._start_now,
            prefetch=self.prefetch,
            open_stream=self._open_stream,
            connection=self.connection,
        )
        try:
            await self._run_tree(send, receive, task_status, timeout)
        except BaseExceptionGroup as group:
            single = only_exception(group)
            if single is None:
                raise
            raise single from None
        finally:
            self._state = WorkerState.STOPPED
            log.info("worker %s stopped", self.client_id)

    async def _run_tree(
        self,
        send: trio.MemorySendChannel[TaskRun],
        receive: trio.MemoryReceiveChannel[TaskRun],
        task_status: trio.TaskStatus[None],
        seconds: float | None = None,
    ) -> None:
        """The nursery tree (see the module docstring)."""
        # One client for everything the worker's runs say over REST (their own .delay()
        # calls included: it is the ambient client of their context).
        async with (
            self._connect(),
            trio.open_nursery() as nursery,
        ):
            if seconds is not None:
                nursery.start_soon(self._stop_at, trio.current_time() + seconds, seconds)
            if self.status_server_port is not None:
                # Only here: a worker without a status port never imports quart or hypercorn.
                from trioworker.worker.status import serve_status

                self.status_url = await nursery.start(
                    serve_status, self.statistics, self.status_server_port, self.status_server_host
                )
            subscription_done = trio.Event()

            async def hold_subscription(*, task_status: trio.TaskStatus[None]) -> None:
                assert self._subscription is not None
                try:
                    await self._subscription.run(send, task_status=task_status)
                finally:
                    subscription_done.set()

            # stop() before the first subscribe (a server still unreachable) ends the wait.
            with trio.CancelScope() as self._startup_scope:
                if self._state is not WorkerState.RUNNING:
                    self._startup_scope.cancel()
                await nursery.start(hold_subscription)
            self._startup_scope = None
            task_status.started()
            if self._state is not WorkerState.RUNNING and not (
                self._subscription and self._subscription.connected
            ):
                nursery.cancel_scope.cancel()
                return
            nursery.start_soon(self._register_schedules)
            async with receive:
                await self._dispatch(receive)
            with trio.CancelScope() as self._quit_scope:
                self._quit_scope.deadline = trio.current_time() + (
                    FORCED_QUIT_TIMEOUT if self._forced else QUIT_TIMEOUT
                )
                await subscription_done.wait()
            self._quit_scope = None
            nursery.cancel_scope.cancel()

    async def _register_schedules(self) -> None:
        """Register with the server the schedules of the tasks served (``@task(schedule=...)``),
        once subscribed; while no server answers, again with backoff. A schedule the server
        refuses, or that cannot be made (arguments that do not fit), is logged: the worker
        serves on. Lives in the worker's nursery (cancelled when the worker stops)."""
        creates: list[ScheduleCreate] = []
        for task in self._tasks.values():
            try:
                creates += declared_schedules(task, task.schedule)
            except (TypeError, ValueError) as exc:
                log.error("task %s: its schedule cannot be registered: %s", task.key, exc)
        if not creates:
            return
        rng = random.Random()
        async with using_client() as client:  # the worker's own (see _run_tree)
            for create in creates:
                attempt = 0
                while True:
                    try:
                        registered = await client.upsert_schedule(create)
                    except ServerUnavailable:
                        await trio.sleep(next_backoff(attempt, rng))
                        attempt += 1
                        continue
                    except ApiError as exc:
                        log.error("schedule %s of %s was refused: %s", create.name, create.task_key, exc)
                        break
                    log.info(
                        "schedule %s of %s registered; next run at %s",
                        registered.name,
                        registered.task_key,
                        registered.next_fire_time.isoformat(),
                    )
                    break

    def stop(self, *, grace_seconds: float | None = None) -> None:
        """Stop taking runs; in-flight runs get the grace period, then are handed back.

        Safe to call from any Trio task of the worker's run, and more than once: a later
        call can only shorten the wait (``grace_seconds=0`` stops at once: the runs are
        cancelled, handed back as far as the server can still be told within a second,
        and no thread is waited for). See the class docstring for threads.

        Args:
            grace_seconds: seconds in-flight runs may still take (default: the worker's
                ``shutdown_grace_seconds``).

        Raises:
            RuntimeError: the worker was never started.
            ValueError: ``grace_seconds`` is negative.
        """
        if self._state is WorkerState.UNOPENED:
            raise RuntimeError("this TaskWorker is not running: start() it before calling stop()")
        grace = self.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        if grace < 0:
            raise ValueError("grace_seconds must be >= 0")
        if self._state is WorkerState.STOPPED:
            return
        deadline = trio.current_time() + grace
        if self._state is WorkerState.RUNNING:
            log.info("worker %s stopping (grace %g s)", self.client_id, grace)
            self._state = WorkerState.STOPPING
            self._stopping.set()
            if self._startup_scope is not None:
                self._startup_scope.cancel()
            if self._dispatch_scope is not None:
                self._dispatch_scope.cancel()
        elif deadline < self._stop_deadline:
            log.info("worker %s stopping sooner: runs get %g s more", self.client_id, grace)
        else:
            return
        self._forced = self._forced or grace == 0
        self._set_stop_deadline(deadline)
        if grace == 0 and self._quit_scope is not None:
            self._quit_scope.deadline = min(
                self._quit_scope.deadline, trio.current_time() + FORCED_QUIT_TIMEOUT
            )
        if self._grace_scope is not None:
            self._grace_scope.deadline = deadline

    async def _stop_at(self, deadline: float, seconds: float) -> None:
        """``start(timeout=...)``: stop at ``deadline`` (Trio time), as :meth:`stop` does.
        Lives in the worker's nursery, which cancels it when the worker ends first."""
        await trio.sleep_until(deadline)
        if self._state is WorkerState.RUNNING:
            log.info("worker %s: its timeout of %g s ran out", self.client_id, seconds)
            self.stop()

    @asynccontextmanager
    async def _run_in_background(self) -> AsyncIterator[Self]:
        body_error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.start)
                try:
                    yield self
                except BaseException as exc:
                    body_error = exc
                    raise
                finally:
                    if self._state is WorkerState.RUNNING:
                        self.stop()
        except BaseExceptionGroup as group:
            # Give the caller its own exception back, not wrapped by our nursery.
            if body_error is not None and list(group.exceptions) == [body_error]:
                raise body_error from None
            raise

    async def __aenter__(self) -> Self:
        """``async with TaskWorker(...) as worker:`` runs it until the block ends."""
        context = self._run_in_background()
        worker = await context.__aenter__()
        self._running_context = context
        return worker

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        context, self._running_context = self._running_context, None
        assert context is not None, "__aexit__ without __aenter__"
        return bool(await context.__aexit__(exc_type, exc, tb))

    # -- dispatch
    async def _dispatch(self, receive: trio.MemoryReceiveChannel[TaskRun]) -> None:
        subscription = self._subscription
        assert subscription is not None
        async with trio.open_nursery() as timers:
            async with trio.open_nursery() as runs:
                with trio.CancelScope() as self._dispatch_scope:
                    if self._state is not WorkerState.RUNNING:
                        self._dispatch_scope.cancel()
                    self._runs = runs
                    try:
                        async for run in receive:
                            await self._take(run, runs, subscription)
                            self._queued -= 1
                    finally:
                        self._runs = None
                # Stopping: no new runs; the ones running get the grace period.
                subscription.quit()
                if math.isinf(self._stop_deadline):  # the deliveries ended without stop()
                    self._set_stop_deadline(trio.current_time() + self.shutdown_grace_seconds)
                timers.start_soon(self._grace_period, runs.cancel_scope)
            timers.cancel_scope.cancel()
        while True:
            try:
                self._held.add(receive.receive_nowait().id)
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        if self._held:
            log.info("handing back %d unfinished run(s)", len(self._held))
            subscription.release(sorted(self._held))
            self._held.clear()

    def _start_now(self, run: TaskRun) -> bool:
        """The subscription's ``on_delivery``: start ``run`` at once if nothing stands in
        the way, in the task that read it (no hop through the deliveries channel: a pass
        of the event loop less between a delivery and its start); True when started.

        False leaves the run to :meth:`_take` through the channel, as anything out of the
        ordinary (a run queued before it, no free slot, an unknown task, a run already
        here, a stopping worker) is.
        """
        runs, subscription = self._runs, self._subscription
        task = self._tasks.get(run.task_key)
        if (
            runs is None
            or subscription is None
            or task is None
            or self._queued
            or self._state is not WorkerState.RUNNING
            or run.id in self._claimed
            or run.id in self._held
        ):
            self._queued += 1
            return False
        try:
            self._limiter.acquire_on_behalf_of_nowait(run.id)  # not past a task waiting for one
        except trio.WouldBlock:
            self._queued += 1
            return False
        if not subscription.take(run.id):  # pragma: no cover - revoked runs wait in the channel
            self._limiter.release_on_behalf_of(run.id)
            return True
        self._held.add(run.id)
        self._claimed.add(run.id)
        runs.start_soon(self._run_one, task, run, subscription)
        return True

    async def _take(self, run: TaskRun, runs: trio.Nursery, subscription: SubscriptionClient) -> None:
        """Start one delivered run in ``runs`` (or not); errors stay with this run."""
        acquired = claimed = False
        task = self._tasks.get(run.task_key)
        try:
            if task is None:
                subscription.take(run.id)
                await self._unknown_key(run, subscription.release)
                return
            ending = self._ending.get(run.id)
            if ending is not None:
                # Its attempt here is over and its report (a retry, say) on its way: the
                # server may already have queued and delivered its next attempt. Which it
                # is shows once that report is answered.
                await ending.done.wait()
            next_attempt = ending is not None and ending.requeued and run.id not in self._claimed
            if not next_attempt and (run.id in self._claimed or run.id in self._held):
                # Delivered again while it runs here (after a reconnect, or while
                # execute_task_run runs it): one execution; the lease is ours to answer.
                subscription.take(run.id)
                if run.id not in self._held:
                    self._held.add(run.id)  # released when that execution ends
                    log.info("run %s was delivered while it runs here; it runs once", run.id)
                return
            self._held.add(run.id)
            self._claimed.add(run.id)
            claimed = True
            # A free slot is taken without a schedule point (a pass of the event loop less
            # between a delivery and its start); a stopping worker still stops here.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                self._limiter.acquire_on_behalf_of_nowait(run.id)
            except trio.WouldBlock:
                await self._limiter.acquire_on_behalf_of(run.id)
            acquired = True
            if not subscription.take(run.id):
                # Revoked while it waited in the buffer: handed back, not ours.
                self._held.discard(run.id)
                self._claimed.discard(run.id)
                self._limiter.release_on_behalf_of(run.id)
                return
            runs.start_soon(self._run_one, task, run, subscription)
            claimed = acquired = False  # _run_one owns them now
        except BaseException as exc:
            if claimed:
                self._claimed.discard(run.id)
            if acquired:
                self._limiter.release_on_behalf_of(run.id)
            if not isinstance(exc, Exception):
                raise  # Cancelled: a stopping worker hands back what it holds
            log.exception("run %s of %s: the worker failed to take it; handing it back", run.id, run.task_key)
            if claimed or task is None:
                self._held.add(run.id)
                self._release_held(run.id)

    async def _grace_period(self, runs: trio.CancelScope) -> None:
        """Log what stopping waits for; when the grace period is over, stop waiting."""
        with trio.CancelScope(deadline=self._stop_deadline) as self._grace_scope:
            while True:
                # A timer for the log line only: the end of the runs is the runs nursery's
                # exit, which cancels this task.
                self._log_waiting()
                await trio.sleep(WAITING_LOG_INTERVAL)
        self._grace_scope = None
        names = self._running_names()
        if names:
            log.warning(
                "grace period over: cancelling %d run(s) and handing them back: %s",
                len(names),
                ", ".join(names),
            )
        self._thread_waits.give_up()
        runs.cancel()

    def _running_names(self) -> list[str]:
        started = {run_id: at for by_id in self.in_flight_task_runs.values() for run_id, at in by_id.items()}
        keys = {run_id: key for key, by_id in self.in_flight_task_runs.items() for run_id in by_id}
        now = utcnow()
        names = []
        for run_id in sorted(self._scopes, key=lambda i: started.get(i, now)):
            at = started.get(run_id)
            running = f"running {(now - at).total_seconds():.1f} s" if at is not None else "starting"
            names.append(f"{keys.get(run_id, 'run')} {run_id} ({running})")
        return names

    def _log_waiting(self) -> None:
        names = self._running_names()
        if not names:
            return
        left = max(0.0, self._stop_deadline - trio.current_time())
        shown = ", ".join(names[:WAITING_LOG_RUNS])
        more = f" and {len(names) - WAITING_LOG_RUNS} more" if len(names) > WAITING_LOG_RUNS else ""
        log.info("stopping: waiting %.1f s more for %d run(s) to finish: %s%s", left, len(names), shown, more)

    async def _unknown_key(self, run: TaskRun, release: Callable[[list[uuid.UUID]], None]) -> None:
        if self.delete_failed_submissions:
            log.warning("deleting run %s: this worker does not serve task %r", run.id, run.task_key)
            async with TaskRunClient(self.servers, self.api_key) as client:
                with contextlib.suppress(NotFound):
                    await client.delete(run.id)
        else:
            log.warning("releasing run %s: this worker does not serve task %r", run.id, run.task_key)
            release([run.id])

    def _on_cancel(self, run_ids: list[uuid.UUID]) -> None:
        for run_id in run_ids:
            scope = self._scopes.get(run_id)
            if scope is not None:
                scope.cancel()
            else:
                self._cancel_requested.add(run_id)

    async def _run_one(self, task: Task[..., Any], run: TaskRun, reporter: engine.Reporter) -> None:
        """Execute one claimed run (its limiter token is held); a worker fault hands it back.

        **Error handling:** the run is its own failure domain: an exception of the
        worker's handling (not of the task: the engine reports those) is logged with the
        run id, and the run is handed back after a backoff; it never leaves this method.
        Cancellation propagates (a stopping worker hands back what it still holds).
        """
        key = task.key
        scope = trio.CancelScope()
        self._scopes[run.id] = scope
        if run.id in self._cancel_requested:
            scope.cancel()
        slot_free = False
        from_subscription = self._subscription is not None and reporter is self._subscription

        ending = _Ending()

        def free_slot() -> None:
            """The task's code is done: the next run may start (its report is on its way)."""
            nonlocal slot_free
            if not slot_free:
                slot_free = True
                if from_subscription:
                    self._ending[run.id] = ending
                self.in_flight_task_runs[key].pop(run.id, None)
                self._limiter.release_on_behalf_of(run.id)

        threads = _threads.current_thread_waits.set((self._thread_waits, f"run {run.id} of {key}"))
        try:

            def on_running() -> None:
                self.in_flight_task_runs[key][run.id] = utcnow()
                self.started_task_runs[key] += 1

            try:
                outcome = await engine.execute(
                    task,
                    run,
                    reporter,
                    scope=scope,
                    thread_limiter=self._thread_limiter,
                    allow_pickle=self.allow_pickle,
                    on_running=on_running,
                    on_attempt_end=free_slot,
                    fetch=self._fetch_runs,
                    # Runs from the subscription were just leased to us: RUNNING is all but
                    # certain, and a cancel would reach us anyway.
                    queue_report=self._subscription.send_report
                    if self._subscription is not None and from_subscription
                    else None,
                )
            except Exception as exc:
                free_slot()
                await self._hand_back_after_fault(task, run, reporter, exc)
                return
            self._faults.pop(run.id, None)
            self._hard_faults.pop(run.id, None)
            if outcome is not Outcome.REFUSED:
                self.finished_task_runs[key] += 1
            if outcome is Outcome.FAILED:
                self.failed_task_runs[key] += 1
            if outcome is Outcome.CANCELLED or not from_subscription:
                # A cancelled run: frees the lease the server kept for our answer. A run
                # executed over REST that the subscription also delivered: its lease.
                self._release_held(run.id)
            self._held.discard(run.id)
            ending.requeued = outcome in (Outcome.RETRYING, Outcome.STOP)
            if outcome is Outcome.STOP:
                self.stop()
        finally:
            if self._ending.get(run.id) is ending:
                del self._ending[run.id]
            ending.done.set()
            _threads.current_thread_waits.reset(threads)
            self._scopes.pop(run.id, None)
            self._cancel_requested.discard(run.id)
            self._claimed.discard(run.id)
            free_slot()

    def _release_held(self, run_id: uuid.UUID) -> None:
        if run_id in self._held and self._subscription is not None:
            self._subscription.release([run_id])
        self._held.discard(run_id)

    async def _hand_back_after_fault(
        self, task: Task[..., Any], run: TaskRun, reporter: engine.Reporter, exc: Exception
    ) -> None:
        """A fault of the worker while it handled ``run``: log it, wait, hand the run back.

        The :data:`MAX_WORKER_FAULTS`-th fault in a row that is not the server's or the
        network's ends the run FAILED instead ("the worker could not handle this run: ..."):
        a run that always breaks its handling is not handed back forever.
        """
        faults = _count(self._faults, run.id)
        transient = isinstance(exc, ServerUnavailable | OSError | TimeoutError | httpx.HTTPError)
        hard_faults = 0 if transient else _count(self._hard_faults, run.id)
        if hard_faults >= MAX_WORKER_FAULTS and await self._fail_after_faults(task, run, reporter, exc):
            return
        delay = next_backoff(faults - 1, self._subscription.rng if self._subscription else random.Random())
        log.error(
            "run %s of %s: the worker failed while handling it (%s: %s); handing it back in %.1f s",
            run.id,
            task.key,
            type(exc).__name__,
            exc,
            delay,
            exc_info=None if transient else exc,
        )
        with trio.move_on_after(delay):
            await self._stopping.wait()  # a stopping worker hands it back at once
        if self._subscription is not None and reporter is self._subscription:
            self._release_held(run.id)
            return
        back = make_state(
            StateType.SCHEDULED,
            "Redelivered",
            message=f"the worker failed while handling it: {type(exc).__name__}",
            details=StateDetails(reason="release"),
        )
        try:
            await reporter.report(run.id, back)
        except Exception as again:
            log.warning("run %s: could not hand it back (%r); it stays as the server has it", run.id, again)
        self._release_held(run.id)

    async def _fail_after_faults(
        self, task: Task[..., Any], run: TaskRun, reporter: engine.Reporter, exc: Exception
    ) -> bool:
        """End ``run`` FAILED for the worker's fault ``exc``; False if the server was not told."""
        line = failures.exception_line(exc, 1024)
        log.error(
            "run %s of %s: the worker failed while handling it %d times (%s); failing it",
            run.id,
            task.key,
            MAX_WORKER_FAULTS,
            line,
        )
        failed = make_state(
            StateType.FAILED,
            message=failures.clip_text(f"the worker could not handle this run: {line}"),
            data=failures.describe_exception(exc),
        )
        try:
            answer = await reporter.report(run.id, failed)
        except Exception as again:
            log.warning("run %s: could not fail it (%s); handing it back", run.id, type(again).__name__)
            return False
        self._faults.pop(run.id, None)
        self._hard_faults.pop(run.id, None)
        if answer.status is SetStateStatus.ACCEPT:
            self.finished_task_runs[task.key] += 1
            self.failed_task_runs[task.key] += 1
        if self._subscription is None or reporter is not self._subscription:
            self._release_held(run.id)  # run over REST: the subscription's lease, if any
        self._held.discard(run.id)  # a final state ends the lease
        return True

    async def _fetch_runs(self, run_ids: list[uuid.UUID]) -> list[TaskRun]:
        async with using_client() as client:
            return (await client.wait_many(run_ids, seconds=0)).ended

    async def execute_task_run(self, task_run: TaskRun) -> None:
        """Run one given run here and now (reporting over REST), outside the subscription.

        The same run handed over while it runs here (twice at once, or while the
        subscription runs it) runs once: the later call returns at once. A fault of the
        worker while it handles the run is logged and the run handed back
        (SCHEDULED/Redelivered), as far as the server can be told.
        """
        if task_run.id in self._claimed:
            log.info("run %s is already executing here", task_run.id)
            return
        task = self._tasks.get(task_run.task_key)
        self._claimed.add(task_run.id)
        try:
            async with self._connect() as client:
                if task is None:
                    await self._unknown_key(task_run, lambda ids: None)
                    return
                await self._limiter.acquire_on_behalf_of(task_run.id)
                await self._run_one(task, task_run, _RestReporter(client))
        finally:
            self._claimed.discard(task_run.id)


@attrs.define(eq=False)
class _Ending:
    """A run's execution here between the end of its attempt and the answer to its report."""

    done: trio.Event = attrs.field(factory=trio.Event)
    #: The answered report handed the run back to the queue (a retry, StopTaskWorker).
    requeued: bool = False


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"timeout must be a number of seconds >= 0 (or None), got {timeout!r}")


def _count(faults: dict[uuid.UUID, int], run_id: uuid.UUID) -> int:
    """Count one more fault for ``run_id`` in ``faults`` (the newest kept); the new count."""
    count = faults.pop(run_id, 0) + 1
    faults[run_id] = count
    while len(faults) > FAULTS_REMEMBERED:
        del faults[next(iter(faults))]
    return count


async def serve(
    *tasks: Task[..., Any],
    limit: int | None = 10,
    status_server_port: int | None = None,
    timeout: float | None = None,  # noqa: ASYNC109 - Prefect's name: serve at most that long
    **options: Any,
) -> None:
    """Serve ``tasks`` until SIGINT, SIGTERM or :class:`StopTaskWorker` (or for at most
    ``timeout`` seconds); then return.

    Use it as ``trio.run(serve, say, yell)`` or with ``functools.partial`` for options
    (any :class:`TaskWorker` argument). Any other error propagates.

    **Timeout:** with ``timeout``, the worker stops once that many seconds passed since the
    call, as a first signal stops it (the grace period included), logs that the time ran
    out, and ``serve()`` returns normally (see :meth:`TaskWorker.start`).

    **Signals:** the first SIGINT or SIGTERM stops the worker with its grace period
    (``shutdown_grace_seconds``): no new runs, in-flight runs may finish, then the rest
    are cancelled and handed back to the queue. A second one stops at once: runs are
    cancelled and handed back as far as the server can be told within a second.

    **Threads:** a sync task's thread still running when the grace period is over (or at
    the second signal) is not waited for: ``serve()`` returns while it runs on in the
    background, its result discarded (its run was handed back and runs again elsewhere).
    In an application that keeps running after ``serve()`` returns, such a thread lives
    until its function returns (Trio stopped waiting for it too:
    ``trio.testing.active_thread_count()`` does not count it); make long sync tasks call
    ``trio.from_thread.check_cancelled()`` now and then so that they end when stopped.
    Every other thread has finished the task code it ran when ``serve()`` returns.

    **Async code that ignores cancellation** (a shielded scope, a loop catching
    ``trio.Cancelled``) delays the return until it ends, like any task in a nursery; code
    that blocks the event loop blocks signal handling too. The ``trioworker worker``
    process does not wait for such runs (it exits, see the CLI).

    **Garbage collection:** while it serves, the objects alive when it started (modules,
    classes, the tasks' code) are kept out of the collector's passes (``gc.collect()``
    then ``gc.freeze()``, and ``gc.unfreeze()`` when it returns), unless the process had
    frozen objects itself.
    """
    worker = TaskWorker(*tasks, limit=limit, status_server_port=status_server_port, **options)
    await serve_worker(worker, timeout=timeout)


async def serve_worker(worker: TaskWorker, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
    """:func:`serve` for a worker made beforehand (the same signals, timeout and ending)."""
    _check_timeout(timeout)
    with _start_up_heap_frozen():
        await _serve_until_stopped(worker, timeout)


@contextlib.contextmanager
def _start_up_heap_frozen() -> Iterator[None]:
    """While the worker serves, keep the objects made before it started (modules, classes,
    the tasks' code: some 40,000 in a plain worker, alive as long as the process) out of the
    garbage collector's sight: one collection, then ``gc.freeze()``; ``gc.unfreeze()`` at
    the end. The collector's full passes, which a busy worker makes every thousand runs or
    so, then walk only what the runs made: each took 3-10 ms instead of 27-31 ms in a
    drain of no-op runs at limit 100 (a pause of the event loop, all runs included). Left
    alone when objects were frozen already (by an application that manages this itself)."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _serve_until_stopped(worker: TaskWorker, timeout: float | None) -> None:  # noqa: ASYNC109
    async with trio.open_nursery() as nursery:

        async def stop_on_signals(*, task_status: trio.TaskStatus[None]) -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                task_status.started()
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not worker.stopping:
                        log.info("received %s", name)
                        worker.stop()
                    else:
                        log.warning("received %s again: stopping now, without waiting for runs", name)
                        worker.stop(grace_seconds=0)

        await nursery.start(stop_on_signals)
        try:
            await worker.start(timeout=timeout)
        except* StopTaskWorker:
            log.info("StopTaskWorker: the worker stopped")
        nursery.cancel_scope.cancel()
