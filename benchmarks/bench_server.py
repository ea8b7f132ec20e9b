"""Benchmark of the task-run server: creating runs over REST and draining them over the websocket.

Run it as a plain script (no pytest)::

    python benchmarks/bench_server.py [--runs N] [--queued M] [--repeat K] [--stores sqlite,postgres]

Every phase starts its own server in a separate process (``python -m trioworker server``)
with a fresh database, so client and server never share a CPU-bound event loop. The
database is a SQLite file; with ``--stores sqlite,postgres`` every phase runs once per store
(PostgreSQL: a fresh database on ``--postgres-url``, dropped afterwards), and a last table
compares the rates (PostgreSQL / SQLite; the drains must reach :data:`POSTGRES_RATIO_TARGET`):

a) create runs one by one over a single keep-alive ``httpx.Client`` (capped, see ``--single-max``);
b) create N runs in batches (``POST /api/task_runs/batch``);
c) drain those N runs with one raw subscription (RUNNING + COMPLETED reported per delivery);
d) queue M runs (not timed as a target), create N more in batches while M are queued,
   then drain the first N of them: nothing should get slower with the size of the queue;
e) (PostgreSQL, with ``--ended E``) store E ended runs with SQL, then b) and c) again: the
   claims go through a small table of ready runs, so nothing should get slower either.

The table shows the median of ``--repeat`` repetitions and the server's peak RSS (VmHWM);
the JSON results go to ``benchmarks/results/bench_server.json``. The exit code is 1 when a
phase misses its target, a check of the server's answers fails, or the benchmark aborts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
DEFAULT_OUTPUT = HERE / "results" / "bench_server.json"

TASK_KEY = "noop"
SUBSCRIPTION_PATH = "/api/task_runs/subscriptions/scheduled"
BATCH_TARGET = 10_000.0  # runs/s
DRAIN_TARGET = 5_000.0  # runs/s
#: A drain on PostgreSQL must reach this share of the rate on SQLite (same machine, same run).
POSTGRES_RATIO_TARGET = 0.5
STORES = ("sqlite", "postgres")
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
MAX_WS_MESSAGE = 256 * 1024 * 1024
JSON_HEADERS = {"content-type": "application/json"}

RUNNING = {"type": "RUNNING", "name": "Running"}
COMPLETED = {"type": "COMPLETED", "name": "Completed", "data": None}


class BenchError(Exception):
    """The benchmark cannot go on (the server failed, stalled or answered something unexpected)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the server process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def read_proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of ``pid`` in kB (empty when /proc is not there)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            out[name] = int(value.split()[0])
    return out


@dataclass
class ServerProcess:
    """One ``trioworker server`` subprocess with its own database and log file."""

    workdir: Path
    label: str
    #: What ``--db`` gets (default: a SQLite file of its own in ``workdir``).
    db: str | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    startup_seconds: float = 0.0
    #: More options of ``trioworker server`` (``["--max-queued", "5"]``).
    extra_args: Sequence[str] = ()
    #: The checkout whose trioworker runs (first on ``PYTHONPATH``): this one by default.
    project: Path = PROJECT
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / f"server-{self.label}.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.base}/api"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{SUBSCRIPTION_PATH}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.port = free_port()
        db = self.db or str(self.workdir / f"bench-{self.label}.db")
        cmd = [sys.executable, "-m", "trioworker", "server", "--port", str(self.port), "--db", db]
        cmd += self.extra_args
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.project), env.get("PYTHONPATH")) if p)
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )
        started = time.perf_counter()
        deadline = started + STARTUP_TIMEOUT
        with httpx.Client(timeout=1.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(
                        f"the server exited with code {self.proc.returncode} while starting:\n"
                        f"{self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.api}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() > deadline:
                    self.stop()
                    raise BenchError(f"the server did not answer /api/health within {STARTUP_TIMEOUT:g} s")
                time.sleep(0.05)
        self.startup_seconds = time.perf_counter() - started

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far (all its threads)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_mb(self) -> tuple[float, float]:
        """(peak RSS, current RSS) in MB."""
        status = read_proc_status(self.pid)
        return status.get("VmHWM", 0) / 1024, status.get("VmRSS", 0) / 1024

    def stop(self) -> tuple[int | None, float]:
        """SIGTERM, then wait; returns (exit code, seconds it took). Kills it after STOP_TIMEOUT."""
        return stop_process(self.proc, f"server {self.label}", STOP_TIMEOUT)

    def log_text(self) -> str:
        return read_log(self.log_path)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_issues(self) -> list[str]:
        """Log lines that look like trouble (tracebacks, errors, warnings)."""
        text = self.log_text().splitlines()
        issues: list[str] = []
        for index, line in enumerate(text):
            if any(marker in line for marker in ("Traceback", " ERROR ", " WARNING", " CRITICAL ")):
                issues.append("\n".join(text[index : index + 30]) if "Traceback" in line else line)
        return issues


@contextlib.contextmanager
def postgres_database(server_url: str, label: str) -> Iterator[str]:
    """A fresh database on the PostgreSQL server ``server_url`` for the block: its URL."""
    import psycopg

    name = f"trioworker_bench_{label}_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urllib.parse.urlsplit(server_url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def running_server(
    workdir: Path, label: str, issues: list[str], *, postgres_url: str | None = None
) -> Iterator[ServerProcess]:
    """A server on a fresh SQLite file, or on a fresh database of the PostgreSQL server
    ``postgres_url``."""
    with contextlib.ExitStack() as stack:
        db = None if postgres_url is None else stack.enter_context(postgres_database(postgres_url, label))
        yield stack.enter_context(_running_server(workdir, label, issues, db))


@contextlib.contextmanager
def _running_server(workdir: Path, label: str, issues: list[str], db: str | None) -> Iterator[ServerProcess]:
    server = ServerProcess(workdir, label, db)
    server.start()
    try:
        yield server
    finally:
        code, seconds = server.stop()
        if code not in (0, None) or seconds > 5:
            issues.append(f"[{label}] server exit code {code} after SIGTERM, took {seconds:.1f} s")
        issues.extend(f"[{label}] {issue}" for issue in server.log_issues())


# --------------------------------------------------------------------------- REST helpers


def new_client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.api, timeout=60.0, headers=JSON_HEADERS)


def expect(response: httpx.Response, status: int, what: str) -> Any:
    if response.status_code != status:
        raise BenchError(f"{what}: expected HTTP {status}, got {response.status_code}: {response.text[:500]}")
    return orjson.loads(response.content)


def create_one_by_one(client: httpx.Client, n: int, start: int = 0) -> tuple[float, list[float]]:
    """Returns (seconds, per-request latencies in seconds)."""
    latencies: list[float] = []
    began = time.perf_counter()
    for i in range(start, start + n):
        t0 = time.perf_counter()
        body = orjson.dumps({"task_key": TASK_KEY, "parameters": {"i": i}})
        run = expect(client.post("/task_runs", content=body), 201, "POST /task_runs")
        latencies.append(time.perf_counter() - t0)
        if run["state"]["type"] != "SCHEDULED":
            raise BenchError(f"a new run is {run['state']['type']}, expected SCHEDULED")
    return time.perf_counter() - began, latencies


def create_batches(
    client: httpx.Client, n: int, batch: int, start: int = 0
) -> tuple[float, list[str], list[float]]:
    """Returns (seconds, the new ids in order, per-request latencies)."""
    ids: list[str] = []
    latencies: list[float] = []
    began = time.perf_counter()
    for offset in range(start, start + n, batch):
        size = min(batch, start + n - offset)
        t0 = time.perf_counter()
        body = orjson.dumps([{"task_key": TASK_KEY, "parameters": {"i": offset + j}} for j in range(size)])
        runs = expect(client.post("/task_runs/batch", content=body), 201, "POST /task_runs/batch")
        latencies.append(time.perf_counter() - t0)
        if len(runs) != size:
            raise BenchError(f"batch of {size} answered with {len(runs)} runs")
        ids.extend(run["id"] for run in runs)
    return time.perf_counter() - began, ids, latencies


#: The task key of the ended runs that phase e stores (never read: the checks read TASK_KEY's).
ENDED_TASK_KEY = "ended"


def fill_ended_runs(db: str, m: int) -> float:
    """Store ``m`` COMPLETED runs (four states each in the history) in the PostgreSQL
    database ``db`` with SQL, as a long-lived deployment has them; returns the seconds."""
    import psycopg

    began = time.perf_counter()
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO trioworker_task_runs (id, task_key, state_type, rev, parameters, body)"
            " SELECT gen_random_uuid(), %s, 'COMPLETED', 0, '{}', '{}' FROM generate_series(1, %s)",
            (ENDED_TASK_KEY, m),
        )
        conn.execute(
            "INSERT INTO trioworker_task_run_states (run_seq, type, timestamp, body)"
            " SELECT r.seq, t.type, now(), '{}' FROM trioworker_task_runs AS r"
            " CROSS JOIN unnest(ARRAY['SCHEDULED', 'PENDING', 'RUNNING', 'COMPLETED']) AS t(type)"
            " WHERE r.task_key = %s",
            (ENDED_TASK_KEY,),
        )
        conn.execute("VACUUM ANALYZE")
        with contextlib.suppress(psycopg.Error):  # superusers only: the bulk writes reach disk now
            conn.execute("CHECKPOINT")
    return time.perf_counter() - began


def health(client: httpx.Client) -> dict[str, Any]:
    result: dict[str, Any] = expect(client.get("/health"), 200, "GET /health")
    return result


def count_in_state(client: httpx.Client, state: str, *, page: int = 1000) -> int:
    """How many runs of :data:`TASK_KEY` are in ``state``."""
    total = 0
    while True:
        params: dict[str, str | int] = {"state": state, "task_key": TASK_KEY, "limit": page, "offset": total}
        runs = expect(
            client.get("/task_runs", params=params),
            200,
            f"GET /task_runs?state={state}",
        )
        total += len(runs)
        if len(runs) < page:
            return total


def any_in_state(client: httpx.Client, state: str) -> bool:
    params: dict[str, str | int] = {"state": state, "task_key": TASK_KEY, "limit": 1}
    runs = expect(client.get("/task_runs", params=params), 200, "GET /task_runs")
    return bool(runs)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


# --------------------------------------------------------------------------- the subscription


@dataclass
class DrainResult:
    target: int
    completed: int = 0
    seconds: float = 0.0
    first_delivery_seconds: float = math.nan
    deliveries: int = 0  # task_runs messages
    runs_received: int = 0
    states_messages: int = 0
    non_accepted: int = 0
    first_problem: str | None = None
    released: int = 0
    cancels: int = 0
    unknown_messages: list[str] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    drained_ids: list[str] = field(default_factory=list)

    @property
    def runs_per_delivery(self) -> float:
        return self.runs_received / self.deliveries if self.deliveries else math.nan


class _Drainer:
    """A raw subscription client that reports RUNNING+COMPLETED for each delivery, pipelined.

    The receiving task never blocks on sending: outgoing frames go through an unbounded
    channel to a sender task, so a full TCP buffer cannot deadlock the two directions.
    """

    def __init__(self, ws: WebSocketConnection, target: int, out: trio.MemorySendChannel[str]) -> None:
        self.ws = ws
        self.out = out
        self.result = DrainResult(target=target)
        self.inflight: deque[int] = deque()  # runs completed by each unanswered states message
        self.held: set[str] = set()  # received and neither completed nor released
        self.completed_sent = 0
        self.quitting = False
        self.began = 0.0

    def send(self, payload: dict[str, Any]) -> None:
        self.out.send_nowait(orjson.dumps(payload).decode())

    def on_task_runs(self, message: dict[str, Any]) -> None:
        result = self.result
        ids = [run["id"] for run in message["task_runs"]]
        if result.deliveries == 0:
            result.first_delivery_seconds = time.perf_counter() - self.began
        result.deliveries += 1
        result.runs_received += len(ids)
        take = [] if self.quitting else ids[: max(0, result.target - self.completed_sent)]
        rest = ids[len(take) :]
        if take:
            states: list[dict[str, Any]] = []
            for run_id in take:
                states.append({"id": run_id, "state": RUNNING})
                states.append({"id": run_id, "state": COMPLETED})
            self.send({"type": "states", "states": states})
            self.inflight.append(len(take))
            self.completed_sent += len(take)
            result.states_messages += 1
            result.drained_ids.extend(take)
        if rest:
            if self.quitting:
                self.send({"type": "release", "ids": rest})
                result.released += len(rest)
            else:
                self.held.update(rest)

    def on_state_results(self, message: dict[str, Any]) -> None:
        result = self.result
        results = message["results"]
        # One answer covers every states message the server applied together.
        answered, n = len(results), 0
        while answered > 0:
            if not self.inflight:
                raise BenchError(f"state_results has {len(results)} results, more than the states sent")
            runs = self.inflight.popleft()
            answered -= 2 * runs
            n += runs
        if answered != 0:
            raise BenchError(f"state_results has {len(results)} results, not whole states messages")
        for item in results:
            if item["status"] != "ACCEPT":
                result.non_accepted += 1
                if result.first_problem is None:
                    result.first_problem = orjson.dumps(item).decode()
        result.completed += n
        if result.completed >= result.target and not self.quitting:
            result.seconds = time.perf_counter() - self.began
            self.quit()

    def quit(self) -> None:
        self.quitting = True
        self.send({"type": "quit"})
        if self.held:
            self.send({"type": "release", "ids": sorted(self.held)})
            self.result.released += len(self.held)
            self.held.clear()

    async def receive_all(self) -> None:
        handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "task_runs": self.on_task_runs,
            "state_results": self.on_state_results,
        }
        while True:
            try:
                raw = await self.ws.get_message()
            except ConnectionClosed as exc:
                reason = exc.reason
                self.result.close_code = None if reason is None else reason.code
                self.result.close_reason = None if reason is None else reason.reason
                if not self.quitting or self.inflight:
                    raise BenchError(
                        f"the server closed the subscription early "
                        f"({self.result.close_code} {self.result.close_reason!r}) "
                        f"after {self.result.completed} of {self.result.target} runs"
                    ) from None
                return
            message = orjson.loads(raw)
            kind = message.get("type")
            handler = handlers.get(kind)
            if handler is not None:
                handler(message)
            elif kind == "cancel":
                self.result.cancels += len(message.get("ids", ()))
            else:
                self.result.unknown_messages.append(str(raw)[:200])


async def _send_all(ws: WebSocketConnection, outgoing: trio.MemoryReceiveChannel[str]) -> None:
    async for frame in outgoing:
        try:
            await ws.send_message(frame)
        except ConnectionClosed:
            return


async def drain(
    ws_url: str, *, target: int, credit: int, client_id: str, stall_seconds: float
) -> DrainResult:
    """Subscribe with ``credit`` and complete ``target`` runs; time from subscribe to the last result."""
    async with open_websocket_url(
        ws_url, max_message_size=MAX_WS_MESSAGE, message_queue_size=64, receive_buffer_size=256 * 1024
    ) as ws:
        await ws.send_message(orjson.dumps({"type": "auth", "token": None}).decode())
        reply = orjson.loads(await ws.get_message())
        if reply.get("type") != "auth_success":
            raise BenchError(f"auth answered {reply!r}")
        send, receive = trio.open_memory_channel[str](math.inf)
        drainer = _Drainer(ws, target, send)
        try:
            with trio.fail_after(stall_seconds):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_send_all, ws, receive)
                    drainer.began = time.perf_counter()
                    drainer.send(
                        {"type": "subscribe", "keys": [TASK_KEY], "client_id": client_id, "credit": credit}
                    )
                    await drainer.receive_all()
                    nursery.cancel_scope.cancel()
        except trio.TooSlowError:
            r = drainer.result
            raise BenchError(
                f"drain stalled: no end after {stall_seconds:g} s; completed {r.completed}/{target}, "
                f"received {r.runs_received} runs in {r.deliveries} messages, "
                f"{len(drainer.inflight)} states messages unanswered, quitting={drainer.quitting}"
            ) from None
        return drainer.result


def run_drain(server: ServerProcess, target: int, credit: int, label: str, timeout: float) -> DrainResult:
    return trio.run(
        lambda: drain(
            server.ws_url, target=target, credit=credit, client_id=f"bench-{label}", stall_seconds=timeout
        )
    )


# --------------------------------------------------------------------------- phases


@dataclass
class Sample:
    runs: int
    seconds: float
    peak_rss_mb: float
    rss_mb: float
    extra: dict[str, Any] = field(default_factory=dict)
    #: CPU seconds the server spent in the timed part.
    server_cpu_s: float = math.nan


@dataclass
class PhaseResult:
    key: str
    title: str
    target: float | None  # runs/s
    notes: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    @property
    def runs(self) -> int:
        return self.samples[0].runs if self.samples else 0

    @property
    def seconds(self) -> float:
        return statistics.median(s.seconds for s in self.samples) if self.samples else math.nan

    @property
    def rate(self) -> float:
        return self.runs / self.seconds if self.samples and self.seconds > 0 else math.nan

    @property
    def server_cpu_percent(self) -> float:
        """Server CPU time over wall time of the timed part (100 = one core busy), median."""
        shares = [s.server_cpu_s / s.seconds * 100 for s in self.samples if s.seconds > 0]
        return statistics.median(shares) if shares else math.nan

    @property
    def peak_rss_mb(self) -> float:
        return max((s.peak_rss_mb for s in self.samples), default=math.nan)

    @property
    def verdict(self) -> str:
        if self.target is None or not self.samples:
            return "-"
        return "PASS" if self.rate >= self.target else "FAIL"

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "runs": self.runs,
            "seconds_median": self.seconds,
            "runs_per_second": self.rate,
            "server_peak_rss_mb": self.peak_rss_mb,
            "server_cpu_percent": self.server_cpu_percent,
            "target_runs_per_second": self.target,
            "verdict": self.verdict,
            "notes": self.notes,
            "samples": [asdict(s) for s in self.samples],
        }


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    #: One of :data:`STORES`: where the servers of this bench keep their runs.
    store: str = "sqlite"
    phases: dict[str, PhaseResult] = field(default_factory=dict)
    issues: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # failed verifications
    observations: list[str] = field(default_factory=list)  # odd but not wrong

    def phase(self, key: str, title: str, target: float | None) -> PhaseResult:
        """The phase ``key``; its absolute ``target`` holds on SQLite (PostgreSQL's drains are
        judged against SQLite's: :data:`POSTGRES_RATIO_TARGET`)."""
        if key not in self.phases:
            self.phases[key] = PhaseResult(key, title, target if self.store == "sqlite" else None)
        return self.phases[key]

    def server(self, label: str) -> contextlib.AbstractContextManager[ServerProcess]:
        postgres_url = self.args.postgres_url if self.store == "postgres" else None
        return running_server(
            self.workdir, f"{self.store[:2]}{label}", self.issues, postgres_url=postgres_url
        )

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.checks.append(what)
            log(f"  ! check failed: {what}")

    # a) one by one
    def bench_single(self, rep: int) -> None:
        n = min(self.args.runs, self.args.single_max)
        phase = self.phase("a_create_single", "a) create one by one", None)
        if n < self.args.runs and not phase.notes:
            phase.notes.append(f"capped at {n} of {self.args.runs} runs (--single-max)")
        log(f"[a] rep {rep}: creating {n} runs one by one")
        with self.server(f"a{rep}") as server, new_client(server) as client:
            cpu0 = server.cpu_seconds()
            seconds, latencies = create_one_by_one(client, n)
            cpu = server.cpu_seconds() - cpu0
            peak, rss = server.memory_mb()
            ready = health(client)["ready"]
            self.check(ready == n, f"[a{rep}] health ready={ready}, expected {n}")
        phase.add(
            Sample(
                n,
                seconds,
                peak,
                rss,
                {
                    "latency_ms_p50": percentile(latencies, 50) * 1e3,
                    "latency_ms_p99": percentile(latencies, 99) * 1e3,
                },
                server_cpu_s=cpu,
            )
        )
        log(f"    {n / seconds:,.0f} runs/s")

    # b) batches, then c) drain them; e) the same on PostgreSQL with M ended runs in the database
    def bench_batch_and_drain(self, rep: int, *, ended: int = 0) -> None:
        n, batch = self.args.runs, self.args.batch
        if ended:
            create = self.phase("e1_create_ended", f"e) create in batches, {ended:,} ended", BATCH_TARGET)
            drain_phase = self.phase("e2_drain_ended", f"e) drain, {ended:,} ended runs stored", DRAIN_TARGET)
        else:
            create = self.phase("b_create_batch", f"b) create in batches of {batch}", BATCH_TARGET)
            drain_phase = self.phase("c_drain", f"c) drain (credit {self.args.credit})", DRAIN_TARGET)
        with self.server(f"e{rep}" if ended else f"bc{rep}") as server, new_client(server) as client:
            if ended:
                assert server.db is not None
                log(f"[e] rep {rep}: storing {ended:,} ended runs (SQL; not a target)")
                fill = self.phase("e0_fill_ended", f"e) store {ended:,} ended runs (SQL)", None)
                fill.add(Sample(ended, fill_ended_runs(server.db, ended), *server.memory_mb()))
            log(f"[b] rep {rep}: creating {n} runs in batches of {batch}")
            cpu0 = server.cpu_seconds()
            seconds, ids, latencies = create_batches(client, n, batch)
            cpu = server.cpu_seconds() - cpu0
            peak, rss = server.memory_mb()
            create.add(
                Sample(
                    n,
                    seconds,
                    peak,
                    rss,
                    {
                        "batch_latency_ms_p50": percentile(latencies, 50) * 1e3,
                        "batch_latency_ms_max": max(latencies) * 1e3,
                    },
                    server_cpu_s=cpu,
                )
            )
            log(f"    {n / seconds:,.0f} runs/s")
            info = health(client)
            self.check(info["ready"] == n, f"[b{rep}] health ready={info['ready']}, expected {n}")

            log(f"[c] rep {rep}: draining {n} runs with credit {self.args.credit}")
            cpu0 = server.cpu_seconds()
            result = run_drain(server, n, self.args.credit, f"c{rep}", self.args.timeout)
            cpu = server.cpu_seconds() - cpu0
            peak, rss = server.memory_mb()
            drain_phase.add(Sample(n, result.seconds, peak, rss, drain_extra(result), server_cpu_s=cpu))
            log(f"    {n / result.seconds:,.0f} runs/s")
            self.verify_drain(f"c{rep}", result, client, expected_completed=n, expected_ready=0)
            self.check(
                sorted(result.drained_ids) == sorted(ids),
                f"[c{rep}] the drained ids are not the created ids",
            )
            self.check(
                not any_in_state(client, "SCHEDULED")
                and not any_in_state(client, "PENDING")
                and not any_in_state(client, "RUNNING"),
                f"[c{rep}] runs left SCHEDULED/PENDING/RUNNING after the drain",
            )

    # d) the same with M queued
    def bench_queued(self, rep: int) -> None:
        n, m, batch = self.args.runs, self.args.queued, self.args.batch
        fill = self.phase("d0_fill", f"d) fill queue 0 -> {m:,} (batches)", None)
        create = self.phase("d1_create_batch_queued", f"d) create in batches, {m:,} queued", BATCH_TARGET)
        drain_phase = self.phase("d2_drain_queued", f"d) drain first {n:,} of {m + n:,} queued", DRAIN_TARGET)
        with self.server(f"d{rep}") as server, new_client(server) as client:
            log(f"[d] rep {rep}: filling the queue with {m} runs (not a target)")
            cpu0 = server.cpu_seconds()
            seconds, ids, latencies = create_batches(client, m, batch)
            cpu = server.cpu_seconds() - cpu0
            peak, rss = server.memory_mb()
            fill.add(
                Sample(
                    m,
                    seconds,
                    peak,
                    rss,
                    {
                        "batch_latency_ms_first_10": statistics.mean(latencies[:10]) * 1e3,
                        "batch_latency_ms_last_10": statistics.mean(latencies[-10:]) * 1e3,
                    },
                    server_cpu_s=cpu,
                )
            )
            log(f"    {m / seconds:,.0f} runs/s")
            log(f"[d] rep {rep}: creating {n} more runs in batches with {m} queued")
            cpu0 = server.cpu_seconds()
            seconds, more, latencies = create_batches(client, n, batch, start=m)
            cpu = server.cpu_seconds() - cpu0
            ids.extend(more)
            peak, rss = server.memory_mb()
            create.add(
                Sample(n, seconds, peak, rss, {"batch_latency_ms_p50": percentile(latencies, 50) * 1e3}, cpu)
            )
            log(f"    {n / seconds:,.0f} runs/s")
            t0 = time.perf_counter()
            info = health(client)
            health_ms = (time.perf_counter() - t0) * 1e3
            self.check(info["ready"] == m + n, f"[d{rep}] health ready={info['ready']}, expected {m + n}")

            log(f"[d] rep {rep}: draining the first {n} of {m + n} queued runs")
            cpu0 = server.cpu_seconds()
            result = run_drain(server, n, self.args.credit, f"d{rep}", self.args.timeout)
            cpu = server.cpu_seconds() - cpu0
            peak, rss = server.memory_mb()
            extra = drain_extra(result)
            extra["health_ms_with_queue"] = health_ms
            drain_phase.add(Sample(n, result.seconds, peak, rss, extra, cpu))
            log(f"    {n / result.seconds:,.0f} runs/s")
            self.verify_drain(f"d{rep}", result, client, expected_completed=n, expected_ready=m)
            self.check(
                result.drained_ids == ids[:n], f"[d{rep}] the drained runs are not the oldest {n}, in order"
            )

    def verify_drain(
        self,
        label: str,
        result: DrainResult,
        client: httpx.Client,
        *,
        expected_completed: int,
        expected_ready: int,
    ) -> None:
        self.check(result.completed == expected_completed, f"[{label}] completed {result.completed}")
        self.check(
            result.non_accepted == 0,
            f"[{label}] {result.non_accepted} reports not accepted: {result.first_problem}",
        )
        self.check(
            result.close_code == 1000, f"[{label}] closed with {result.close_code} {result.close_reason!r}"
        )
        self.check(
            not result.unknown_messages, f"[{label}] unexpected messages: {result.unknown_messages[:3]}"
        )
        self.check(result.cancels == 0, f"[{label}] {result.cancels} runs cancelled by the server")
        # The server closes the socket as soon as nothing is held; the runs handed back at
        # quit are requeued (and the subscription dropped) a moment later. Wait for that.
        began = time.perf_counter()
        polls = 0
        while True:
            info = health(client)
            polls += 1
            settled = info["subscriptions"] == 0 and info["ready"] == expected_ready
            if settled or time.perf_counter() - began > 5.0:
                break
            time.sleep(0.002)
        if polls > 1:
            self.observations.append(
                f"[{label}] after close 1000, /api/health needed {polls} polls / "
                f"{(time.perf_counter() - began) * 1e3:.1f} ms to show ready={expected_ready} "
                "and no subscription (first poll saw the subscription still listed and/or "
                "released runs not yet requeued)"
            )
        self.check(
            info["ready"] == expected_ready and info["delayed"] == 0,
            f"[{label}] after the drain health says ready={info['ready']} delayed={info['delayed']}, "
            f"expected ready={expected_ready} delayed=0",
        )
        self.check(info["subscriptions"] == 0, f"[{label}] {info['subscriptions']} subscriptions left")
        completed = count_in_state(client, "COMPLETED")
        self.check(
            completed == expected_completed,
            f"[{label}] {completed} runs COMPLETED, expected {expected_completed}",
        )


def drain_extra(result: DrainResult) -> dict[str, Any]:
    return {
        "first_delivery_ms": result.first_delivery_seconds * 1e3,
        "deliveries": result.deliveries,
        "runs_per_delivery": result.runs_per_delivery,
        "states_messages": result.states_messages,
        "released_at_quit": result.released,
        "non_accepted": result.non_accepted,
        "close_code": result.close_code,
    }


# --------------------------------------------------------------------------- output


def fmt_number(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def render_table(phases: Sequence[PhaseResult], repeat: int) -> str:
    header = ["phase", "runs", "seconds", "runs/s", "server CPU %", "server peak RSS MB", "target", "result"]
    rows = [
        [
            p.title,
            f"{p.runs:,}",
            fmt_number(p.seconds, 3),
            fmt_number(p.rate),
            fmt_number(p.server_cpu_percent),
            fmt_number(p.peak_rss_mb, 1),
            "-" if p.target is None else f">= {p.target:,.0f}/s",
            p.verdict,
        ]
        for p in phases
    ]
    out = aligned_table(header, rows, numeric={1, 2, 3, 4, 5})
    if repeat > 1:
        out.append(f"(median of {repeat} repetitions; peak RSS is the largest seen)")
    for p in phases:
        out.extend(f"note: {p.title.split(')')[0]}) {note}" for note in p.notes)
    return "\n".join(out)


def aligned_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> list[str]:
    """Lines of a plain-text table: columns padded, the ``numeric`` ones right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def stop_process(proc: subprocess.Popen[bytes] | None, what: str, timeout: float) -> tuple[int | None, float]:
    """SIGTERM, then wait; returns (exit code, seconds it took). Kills it after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return (None if proc is None else proc.returncode), 0.0
    started = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"  ! {what} ignored SIGTERM for {timeout:g} s; killing it")
        proc.kill()
        proc.wait()
        return None, time.perf_counter() - started
    return code, time.perf_counter() - started


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True, check=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def print_sections(sections: Sequence[tuple[str, Sequence[str]]], error: str | None) -> None:
    """The lists printed under a benchmark's table (failed checks, log issues...)."""
    for title, items in sections:
        if items:
            print(f"\n{title}:")
            print("\n".join(f"  - {item}" for item in items))
    if error:
        print(f"\naborted: {error}")


def save_results(benchmark: str, args: argparse.Namespace, elapsed: float, payload: dict[str, Any]) -> None:
    """Write a benchmark's JSON (what ran where, then ``payload``) to ``args.output``."""
    results = {
        "benchmark": benchmark,
        "timestamp": datetime.now(UTC).isoformat(),
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "elapsed_seconds": elapsed,
        **payload,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    print(f"\nresults written to {args.output}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10_000, help="N: runs per phase (default 10,000)")
    parser.add_argument("--queued", type=int, default=100_000, help="M: runs queued for phase d (0 skips it)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="K: repetitions of each phase; the median is shown"
    )
    parser.add_argument("--credit", type=int, default=1000, help="credit of the draining subscription")
    parser.add_argument("--batch", type=int, default=500, help="runs per POST /api/task_runs/batch")
    parser.add_argument(
        "--single-max", type=int, default=2000, help="cap of runs created one by one (phase a)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds a drain may take before it stalls"
    )
    parser.add_argument(
        "--phases", default="abcde", help="which phases to run (letters of a b c d e; c needs b)"
    )
    parser.add_argument(
        "--ended",
        type=int,
        default=0,
        help="E: phase e (PostgreSQL only) stores this many ended runs, then creates and drains N "
        "(0, the default, skips it; try 1000000)",
    )
    parser.add_argument(
        "--stores",
        default="sqlite",
        help=f"comma-separated stores to run every phase on, of {', '.join(STORES)} (default sqlite)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("TRIOWORKER_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="a PostgreSQL server where each phase creates (and drops) a database of its own "
        f"(default $TRIOWORKER_BENCH_POSTGRES_URL or {DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args(argv)
    args.stores = [store.strip() for store in args.stores.split(",") if store.strip()]
    if not args.stores or any(store not in STORES for store in args.stores):
        parser.error(f"--stores must name some of {', '.join(STORES)}")
    for name in ("runs", "repeat", "credit", "batch", "single_max"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.queued < 0 or args.ended < 0:
        parser.error("--queued and --ended must be >= 0")
    return args


def render_comparison(benches: Sequence[Bench]) -> tuple[str, list[dict[str, Any]]]:
    """The rates of every store side by side, with each one's ratio to the first (SQLite):
    the lines of the table, and the rows as JSON. A drain misses its target below
    :data:`POSTGRES_RATIO_TARGET`."""
    first = benches[0]
    header = [
        "phase",
        *(f"{b.store} runs/s" for b in benches),
        *(f"{b.store}/{first.store}" for b in benches[1:]),
    ]
    header += ["target", "result"]
    rows, results = [], []
    for key, phase in first.phases.items():
        others = [b.phases.get(key) for b in benches[1:]]
        ratios = [math.nan if p is None or not phase.rate else p.rate / phase.rate for p in others]
        drain = "drain" in key
        verdict = (
            "-" if not drain else ("PASS" if all(r >= POSTGRES_RATIO_TARGET for r in ratios) else "FAIL")
        )
        rows.append(
            [
                phase.title,
                fmt_number(phase.rate),
                *(fmt_number(math.nan if p is None else p.rate) for p in others),
                *(fmt_number(r, 2) for r in ratios),
                f">= {POSTGRES_RATIO_TARGET:.2f}" if drain else "-",
                verdict,
            ]
        )
        results.append({"key": key, "title": phase.title, "ratios": ratios, "verdict": verdict})
    numeric = set(range(1, len(header) - 2))
    return "\n".join(aligned_table(header, rows, numeric)), results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    error: str | None = None
    with tempfile.TemporaryDirectory(prefix="trioworker-bench-") as tmp:
        benches = [Bench(args, Path(tmp), store) for store in args.stores]
        try:
            # Each repetition runs every store in turn, so that a noisy spell hits both.
            for rep in range(1, args.repeat + 1):
                for bench in benches:
                    if "a" in args.phases:
                        bench.bench_single(rep)
                    if "b" in args.phases or "c" in args.phases:
                        bench.bench_batch_and_drain(rep)
                    if "d" in args.phases and args.queued > 0:
                        bench.bench_queued(rep)
                    if "e" in args.phases and args.ended > 0 and bench.store == "postgres":
                        bench.bench_batch_and_drain(rep, ended=args.ended)
        except (BenchError, httpx.HTTPError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            log(f"\nbenchmark aborted: {error}")
    elapsed = time.perf_counter() - started

    print()
    print(
        f"trioworker server benchmark: N={args.runs:,} M={args.queued:,} credit={args.credit} "
        f"batch={args.batch} repeat={args.repeat} ({elapsed:.0f} s in all)"
    )
    for bench in benches:
        if len(benches) > 1:
            print(f"\nstore: {bench.store}")
        print(render_table(list(bench.phases.values()), args.repeat))
    for bench in benches:
        empty, full = bench.phases.get("c_drain"), bench.phases.get("e2_drain_ended")
        if empty is not None and full is not None and empty.rate:
            print(
                f"\n{bench.store}: the drain with {args.ended:,} ended runs stored goes at "
                f"{full.rate / empty.rate:.2f} x the drain on an empty database"
            )
    comparison: list[dict[str, Any]] = []
    if len(benches) > 1:
        table, comparison = render_comparison(benches)
        print(f"\nrates by store (ratios to {benches[0].store}):")
        print(table)
    checks = [f"[{b.store}] {c}" for b in benches for c in b.checks]
    sections = [
        ("failed checks", checks),
        ("observations", [f"[{b.store}] {o}" for b in benches for o in b.observations]),
        ("server log issues", [f"[{b.store}] {i}" for b in benches for i in b.issues]),
    ]
    print_sections(sections, error)
    save_results(
        "bench_server",
        args,
        elapsed,
        {
            "stores": {
                b.store: {
                    "phases": [p.to_json() for p in b.phases.values()],
                    "failed_checks": b.checks,
                    "observations": b.observations,
                    "server_log_issues": b.issues,
                }
                for b in benches
            },
            "comparison": comparison,
            "error": error,
        },
    )
    missed = any(p.verdict == "FAIL" for b in benches for p in b.phases.values())
    missed = missed or any(row["verdict"] == "FAIL" for row in comparison)
    return 1 if error is not None or checks or missed else 0


if __name__ == "__main__":
    sys.exit(main())
