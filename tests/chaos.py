"""Chaos on the real thing: ``trioworker server`` and ``trioworker worker`` processes on one
PostgreSQL database, some of them killed with SIGKILL (or the database restarted) while
runs go through; then the tally of what happened to every run.

Shared by ``tests/test_chaos.py`` (a few hundred runs with kills; a database restarted) and
``benchmarks/chaos.py`` (10,000 runs)::

    async with Deployment.start(config) as deployment:      # the servers, then the workers
        report = await deployment.drive(runs, disrupt)      # submit, disrupt, wait, tally

The servers keep their ports (a replacement listens where the killed one did), so every
worker and the submitter keep one list of URLs. Each worker gets the list starting at its
own server, so that the workers spread over the servers.

**The tally.** Each execution of the task (:mod:`tests.chaos_tasks`) appends a line naming
its run, its worker process and a token of its own, which the run returns: the run's
result says which execution completed it. A run is *lost* when it did not complete
(whatever its end, or none by the deadline). A run executed more than once had
executions that did not complete it; each of those must have been in flight at a
disruption the harness made, else it is *unexplained*:

- its worker process was killed afterwards (its report never arrived);
- the run was held through a server when that server was killed after the execution
  started (read from the database just before and just after the kill);
- the run was held when the database went down or restarted, after the execution started
  (read just before the outage and once the database is back);
- the run was held through a server that, short of CPU, missed its heartbeats for its
  ``--replica-timeout`` and fenced itself (read when it logs so): the others then hand
  back its runs as they do a dead server's. Not a kill, but the same event for the runs;
  reported apart (``server fenced``), as on a loaded machine it does happen.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Final, Literal, TypeVar

import attrs
import psycopg
import trio

import trioworker
from trioworker.client.futures import TaskRunFuture
from trioworker.client.submission import build_create
from trioworker.errors import ApiError, ServerUnavailable
from trioworker.models import StateType

from .chaos_tasks import RECORD_VARIABLE, SLEEP_VARIABLE, record

TASKS_FILE: Final = Path(__file__).with_name("chaos_tasks.py")
PROJECT: Final = Path(__file__).resolve().parent.parent
#: Seconds a process may take to start (print that it listens, or that it subscribed).
START_SECONDS: Final = 60.0
#: Seconds a process may take to stop after SIGTERM before it is killed.
STOP_SECONDS: Final = 20.0
#: Runs per create request of the submitter.
BATCH: Final = 50
#: Seconds between two attempts of a create or a wait that no server could serve.
AGAIN_SECONDS: Final = 0.5
#: What a server logs when it raises its fence after missing its heartbeats (replicas.py).
FENCED: Final = b"no heartbeat for "

T = TypeVar("T")
Kind = Literal["server", "worker"]
#: What disrupts a deployment while its runs are submitted: ``disrupt(deployment, submitted)``,
#: to return soon after ``submitted`` is set.
Disrupt = Callable[["Deployment", trio.Event], Awaitable[None]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.frozen
class ChaosConfig:
    """What to start and how hard to push it."""

    #: The PostgreSQL database of the servers (``--db``): a fresh one, or a fresh schema.
    database: str
    #: Where the log of each process and the executions' file go.
    workdir: Path
    servers: int = 3
    workers: int = 3
    #: ``--replica-timeout`` of every server, in seconds.
    replica_timeout: float = 3.0
    #: ``--max-deliveries``: high, so that a run in flight at several kills does not crash.
    max_deliveries: int = 20
    #: ``--limit`` of every worker.
    worker_limit: int = 10
    #: Each execution then sleeps up to this many seconds (so that kills find runs in flight).
    task_sleep: float = 0.02
    #: Runs submitted per second (in batches of :data:`BATCH`).
    rate: float = 200.0
    #: Seconds to wait for every run to end once all are submitted (and disruptions are over).
    deadline: float = 120.0


@attrs.frozen
class Execution:
    """One line of the executions' file."""

    run_id: uuid.UUID
    pid: int
    token: str
    at: float


def read_executions(path: Path) -> list[Execution]:
    """Every execution recorded in ``path`` (none if it does not exist)."""
    if not path.exists():
        return []
    executions = []
    for line in path.read_text().splitlines():
        run_id, pid, token, at = line.split()
        executions.append(Execution(uuid.UUID(run_id), int(pid), token, float(at)))
    return executions


@attrs.frozen
class Disruption:
    """Something the harness did to the deployment: a process killed, the database restarted."""

    #: ``"worker killed"``, ``"server killed"``, ``"database restarted"``, ...
    what: str
    #: ``time.time()`` when it began, and when it was over (the process was gone and what
    #: it held read; the database answered again): a run delivered before may start a
    #: little after it began.
    at: float
    until: float
    #: The killed worker's pid.
    pid: int | None = None
    #: The runs held (PENDING or RUNNING) through the killed server, or through any server
    #: when the database went away.
    held: frozenset[uuid.UUID] = frozenset()

    def explains(self, execution: Execution) -> bool:
        """Was ``execution`` in flight at this disruption (so that it may not complete)?"""
        if execution.at > self.until:
            return False
        if self.pid is not None:
            return execution.pid == self.pid
        return execution.run_id in self.held


@attrs.frozen
class Report:
    """What happened to every run."""

    runs: int
    #: The runs that did not complete: id -> their end (or "not ended").
    lost: dict[uuid.UUID, str]
    executions: int
    #: The runs executed more than once -> why each execution that did not complete it ended
    #: (the disruptions it was in flight at; "unexplained" when none).
    repeated: dict[uuid.UUID, list[str]]
    disruptions: tuple[Disruption, ...]
    #: From the first submission until every run ended (or the deadline).
    seconds: float
    submit_seconds: float
    #: Creates and waits that no server could serve (each was sent again).
    refusals: int = 0

    @property
    def unexplained(self) -> list[uuid.UUID]:
        return [run_id for run_id, why in self.repeated.items() if "unexplained" in why]

    @property
    def ok(self) -> bool:
        return not self.lost and not self.unexplained

    def lines(self) -> list[str]:
        """The figures, for people."""
        kinds = ", ".join(
            f"{n} {what}" for what, n in sorted(Counter(d.what for d in self.disruptions).items())
        )
        reasons = Counter(reason for why in self.repeated.values() for reason in set(why))
        most = max((len(why) + 1 for why in self.repeated.values()), default=1)
        lines = [
            f"runs: {self.runs}, executions: {self.executions}, "
            f"disruptions: {len(self.disruptions)} ({kinds})",
            f"runs lost: {len(self.lost)}",
            f"runs executed more than once: {len(self.repeated)} (at most {most} times)",
            f"  of those, in flight at a disruption: {len(self.repeated) - len(self.unexplained)}"
            + "".join(f"; {n} {reason}" for reason, n in sorted(reasons.items()) if reason != "unexplained"),
            f"  not explained by a disruption: {len(self.unexplained)}",
            f"time: {self.seconds:.1f} s ({self.runs / self.seconds:.0f} runs/s; "
            f"submitted in {self.submit_seconds:.1f} s"
            + (
                f"; {self.refusals} creates or waits no server could serve, sent again)"
                if self.refusals
                else ")"
            ),
        ]
        for run_id, end in list(self.lost.items())[:10]:
            lines.append(f"  lost: {run_id} ({end})")
        for run_id in self.unexplained[:10]:
            lines.append(f"  unexplained: {run_id} ({', '.join(self.repeated[run_id])})")
        return lines


def tally(
    futures: Sequence[TaskRunFuture[str]],
    executions: Sequence[Execution],
    disruptions: Sequence[Disruption],
    *,
    seconds: float,
    submit_seconds: float,
    refusals: int = 0,
) -> Report:
    """The :class:`Report` of the runs of ``futures`` (waited for), given what was recorded."""
    by_run: dict[uuid.UUID, list[Execution]] = {}
    for execution in executions:
        by_run.setdefault(execution.run_id, []).append(execution)
    lost: dict[uuid.UUID, str] = {}
    repeated: dict[uuid.UUID, list[str]] = {}
    for future in futures:
        run = future.task_run
        done = by_run.get(future.task_run_id, [])
        if run is None or not future.done:
            lost[future.task_run_id] = "not ended"
            continue
        if run.state.type is not StateType.COMPLETED:
            lost[future.task_run_id] = f"{run.state.type.value}: {run.state.message}"
            continue
        token = run.state.data
        if not any(e.token == token for e in done):
            lost[future.task_run_id] = "completed by no recorded execution"
            continue
        if len(done) > 1:
            repeated[future.task_run_id] = [
                next((d.what for d in disruptions if d.explains(e)), "unexplained")
                for e in done
                if e.token != token
            ]
    return Report(
        runs=len(futures),
        lost=lost,
        executions=len(executions),
        repeated=repeated,
        disruptions=tuple(disruptions),
        seconds=seconds,
        submit_seconds=submit_seconds,
        refusals=refusals,
    )


# --------------------------------------------------------------------------- the processes


def _ignore(line: bytes) -> None:
    pass


@attrs.define(eq=False)
class Child:
    """One server or worker slot: its process now (a replacement after a kill)."""

    kind: Kind
    index: int
    command: list[str]
    #: The pattern of the output line that says it is up.
    ready: bytes
    process: trio.Process | None = None
    #: Its process is up (listens, or subscribed) and was not killed since.
    up: bool = False

    @property
    def label(self) -> str:
        return f"{self.kind}-{self.index}"


async def _pump(
    stream: trio.abc.ReceiveStream,
    log_path: Path,
    ready: bytes,
    on_line: Callable[[bytes], None],
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Copy a process's output to ``log_path`` until it ends, handing each line to
    ``on_line``; started once a line held ``ready``."""
    started = False
    rest = b""
    with log_path.open("ab") as log_file:
        async with stream:
            while chunk := await stream.receive_some():
                log_file.write(chunk)
                log_file.flush()
                *lines, rest = (rest + chunk).split(b"\n")
                for line in lines:
                    on_line(line)
                    if not started and ready in line:
                        started = True
                        task_status.started()
    if not started:
        raise RuntimeError(f"the process ended before it printed {ready!r}; see {log_path}")


@attrs.define(eq=False)
class Deployment:
    """Servers and workers as processes on one database, in a nursery of the harness."""

    config: ChaosConfig
    nursery: trio.Nursery
    ports: list[int]
    record_path: Path
    children: list[Child] = attrs.field(factory=list)
    disruptions: list[Disruption] = attrs.field(factory=list)

    @classmethod
    @asynccontextmanager
    async def start(cls, config: ChaosConfig) -> AsyncIterator[Deployment]:
        """The servers (each listening), then the workers (each subscribed); every process
        is stopped (SIGTERM, then SIGKILL) when the block ends."""
        config.workdir.mkdir(parents=True, exist_ok=True)
        async with trio.open_nursery() as nursery:
            deployment = cls(
                config,
                nursery,
                [free_port() for _ in range(config.servers)],
                config.workdir / "executions.log",
            )
            try:
                for index in range(config.servers):
                    await deployment._start(deployment._server(index))
                for index in range(config.workers):
                    await deployment._start(deployment._worker(index))
                yield deployment
            finally:
                with trio.CancelScope(shield=True):
                    await deployment.stop()
                nursery.cancel_scope.cancel()

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def _server(self, index: int) -> Child:
        command = [sys.executable, "-m", "trioworker", "server", "--port", str(self.ports[index])]
        command += ["--db", self.config.database, "--replica-timeout", str(self.config.replica_timeout)]
        command += ["--max-deliveries", str(self.config.max_deliveries), "--retention", "0"]
        child = Child("server", index, command, b"listening on")
        self.children.append(child)
        return child

    def _worker(self, index: int) -> Child:
        urls = self.urls[index % len(self.urls) :] + self.urls[: index % len(self.urls)]
        command = [sys.executable, "-m", "trioworker", "worker", f"{TASKS_FILE}:record"]
        command += ["--api-url", ",".join(urls), "--limit", str(self.config.worker_limit), "--grace", "5"]
        child = Child("worker", index, command, b"subscribed to")
        self.children.append(child)
        return child

    def of_kind(self, kind: Kind) -> list[Child]:
        return [child for child in self.children if child.kind == kind]

    async def _start(self, child: Child) -> None:
        env = dict(os.environ)
        env[RECORD_VARIABLE] = str(self.record_path)
        env[SLEEP_VARIABLE] = str(self.config.task_sleep)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT), env.get("PYTHONPATH")) if p)
        run = partial(
            trio.run_process,
            child.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
            env=env,
            cwd=self.config.workdir,
        )
        process: trio.Process = await self.nursery.start(run)
        child.process = process
        assert process.stdout is not None
        log_path = self.config.workdir / f"{child.label}.log"
        on_line = partial(self._server_said, child) if child.kind == "server" else _ignore
        with trio.fail_after(START_SECONDS):
            await self.nursery.start(_pump, process.stdout, log_path, child.ready, on_line)
        child.up = True

    def _server_said(self, child: Child, line: bytes) -> None:
        if FENCED in line:
            self.nursery.start_soon(self._fenced, child)

    async def _fenced(self, child: Child) -> None:
        """A server the harness did not kill missed its heartbeats for ``--replica-timeout``
        (on a machine short of CPU) and closed its sockets: the others will find it dead and
        hand back what it held, as if it had been killed. Recorded as a disruption of its own."""
        at = time.time()
        try:
            held = await self.held(self.ports[child.index])
        except psycopg.OperationalError:
            held = set()  # the database is away: its outage accounts for what was held
        self.disruptions.append(Disruption("server fenced", at, time.time(), held=frozenset(held)))

    async def kill(self, child: Child) -> None:
        """SIGKILL ``child``'s process (recorded as a disruption), and start a replacement
        in the background (``child`` is up again once it listens or subscribed)."""
        assert child.process is not None and child.up
        held: set[uuid.UUID] = set()
        port = self.ports[child.index]
        if child.kind == "server":
            held |= await self.held(port)
        at = time.time()
        pid = child.process.pid
        child.up = False
        child.process.send_signal(signal.SIGKILL)
        await child.process.wait()
        if child.kind == "server":
            held |= await self.held(port)  # claimed in the meantime, and not yet taken elsewhere
        what = f"{child.kind} killed"
        worker_pid = pid if child.kind == "worker" else None
        self.disruptions.append(Disruption(what, at, time.time(), pid=worker_pid, held=frozenset(held)))
        self.nursery.start_soon(self._start, child)

    async def outage(self, what: str, action: Callable[[], Awaitable[None]]) -> None:
        """Take the database away with ``action`` (which returns once it answers again),
        recorded as a disruption holding the runs held before and after it."""
        held = await self.held()
        at = time.time()
        await action()
        held |= await self.held()
        self.disruptions.append(Disruption(what, at, time.time(), held=frozenset(held)))

    async def held(self, port: int | None = None) -> set[uuid.UUID]:
        """The runs held (PENDING or RUNNING) through the server on ``port``, or through any."""
        query = "SELECT id FROM trioworker_task_runs WHERE state_type IN ('PENDING', 'RUNNING')"
        params: tuple[str, ...] = ()
        if port is not None:
            query += " AND replica_id IN (SELECT id FROM trioworker_replicas WHERE address = %s)"
            params = (f"http://127.0.0.1:{port}",)

        def read() -> set[uuid.UUID]:
            with psycopg.connect(self.config.database, autocommit=True) as conn:
                return {row[0] for row in conn.execute(query, params)}

        return await trio.to_thread.run_sync(read)

    async def stop(self) -> None:
        """SIGTERM every process, then wait (SIGKILL after :data:`STOP_SECONDS`)."""
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                child.process.terminate()
        for child in self.children:
            if child.process is None:
                continue
            with trio.move_on_after(STOP_SECONDS):
                await child.process.wait()
            if child.process.returncode is None:
                child.process.kill()
                await child.process.wait()

    async def drive(self, runs: int, disrupt: Disrupt) -> Report:
        """Submit ``runs`` runs at the configured rate through every server's URL while
        ``disrupt(self, submitted)`` runs (``submitted`` is set once every run was
        submitted: it should return soon after), wait until every run ended (or the
        deadline), then tally.

        While no server can serve (each answers 503, as they do while the database is
        down, or none answers), a create is sent again every :data:`AGAIN_SECONDS`, with
        the same ids (a repeat gets the run made before), and so is the wait: as an
        application would."""
        futures: list[TaskRunFuture[str]] = []
        submitted = trio.Event()
        began = trio.current_time()
        refusals = 0

        async def again_while_unavailable(call: Callable[[], Awaitable[T]]) -> T:
            nonlocal refusals
            while True:
                try:
                    return await call()
                except (ApiError, ServerUnavailable) as exc:
                    if isinstance(exc, ApiError) and exc.status_code != 503:
                        raise
                    refusals += 1
                await trio.sleep(AGAIN_SECONDS)

        async with trioworker.connect(self.urls) as client:

            async def submit() -> None:
                for start in range(0, runs, BATCH):
                    await trio.sleep_until(began + start / self.config.rate)
                    creates = [build_create(record, [n], {}) for n in range(start, min(start + BATCH, runs))]
                    with trio.fail_after(self.config.deadline):
                        made = await again_while_unavailable(partial(client.create_task_runs, creates))
                    futures.extend(TaskRunFuture(run.id, record, run) for run in made)
                submitted.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(submit)
                nursery.start_soon(disrupt, self, submitted)
            submit_seconds = trio.current_time() - began
            with trio.move_on_after(self.config.deadline):
                await again_while_unavailable(partial(trioworker.wait_all, futures))
        seconds = trio.current_time() - began
        return tally(
            futures,
            read_executions(self.record_path),
            self.disruptions,
            seconds=seconds,
            submit_seconds=submit_seconds,
            refusals=refusals,
        )


def kill_every(seconds: float, rng: random.Random, *, alternate: bool = False) -> Disrupt:
    """A disruption: every ``seconds`` (drawn between half and one and a half times that),
    SIGKILL a server or a worker that is up, chosen by ``rng``, and start a replacement,
    until every run was submitted. One server at least is always left up. ``alternate``:
    a server, then a worker, and so on."""

    async def disrupt(deployment: Deployment, submitted: trio.Event) -> None:
        kills = 0
        while not submitted.is_set():
            with trio.move_on_after(seconds * rng.uniform(0.5, 1.5)):
                await submitted.wait()
            if submitted.is_set():
                return
            up = [child for child in deployment.children if child.up]
            if sum(child.kind == "server" for child in up) < 2:
                up = [child for child in up if child.kind != "server"]
            if alternate:
                kind = ("server", "worker")[kills % 2]
                up = [child for child in up if child.kind == kind] or up
            if up:
                await deployment.kill(rng.choice(up))
                kills += 1

    return disrupt
