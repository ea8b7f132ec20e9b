"""Benchmark of several servers (replicas) on one PostgreSQL database.

Run it as a plain script (no pytest)::

    python benchmarks/bench_replicas.py [--runs 10000] [--latency-runs 300] [--repeat 3]
                                        [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]

Every server is a ``trioworker server`` process and every worker a
``benchmarks/worker_tasks.py`` process (``bench.noop`` at ``--limit``), each on a fresh
database of ``--postgres-url`` (dropped afterwards):

a) **Delivery latency**, sequential: the harness creates a run on server A (one
   ``POST /api/task_runs``) and times until a raw subscription receives it, either on A
   itself or on server B (A announces it with NOTIFY; B hears it, claims it and sends it).
   The two kinds alternate, ``--latency-runs`` of each; p50/p95/p99 in ms.
b) **Drain**: ``--runs`` no-op runs, all due at one instant, drained by one server with one
   worker, then by two servers on one database, each with one worker. The runs are created
   (through the first server) scheduled a few seconds ahead (``--lead``), with the workers
   already subscribed; the time runs from that instant to the server's timestamp of the last
   COMPLETED state. Also shown: CPU seconds of each process over the drain, and how busy
   the whole machine was (``/proc/stat``; 100% means both cores were taken: then two servers
   have nothing to gain).

The table shows medians of ``--repeat`` repetitions and the ratios (two servers / one). The
JSON goes to ``benchmarks/results/bench_replicas.json``. The exit code is 1 when a check
fails (a run not completed, or executed twice) or the benchmark aborts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # bench_server and bench_worker, run from anywhere
    sys.path.insert(0, str(HERE))

from bench_server import (  # noqa: E402
    DEFAULT_POSTGRES_URL,
    JSON_HEADERS,
    BenchError,
    ServerProcess,
    aligned_table,
    expect,
    log,
    percentile,
    postgres_database,
    print_sections,
    save_results,
)
from bench_worker import (  # noqa: E402
    NOOP_KEY,
    WorkerProcess,
    parse_time,
    process_cpu_seconds,
    running_worker,
    wait_ended,
    wait_subscribed,
)

DEFAULT_OUTPUT = HERE / "results" / "bench_replicas.json"
LATENCY_KEYS = ("lat.here", "lat.there")
CREATE_BATCH = 500


def busy_cpu_seconds() -> float:
    """Seconds the machine's CPUs were busy since boot (all cores: user, system, irq...)."""
    fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return " ".join(f"{n:.2f}" for n in os.getloadavg())


@contextlib.contextmanager
def servers(
    workdir: Path, label: str, database: str, count: int, issues: list[str]
) -> Iterator[list[ServerProcess]]:
    """``count`` servers on ``database``, started one after the other."""
    started: list[ServerProcess] = []
    try:
        for n in range(count):
            server = ServerProcess(workdir, f"{label}-{n}", database)
            server.start()
            started.append(server)
        yield started
    finally:
        for server in started:
            code, seconds = server.stop()
            if code not in (0, None) or seconds > 5:
                issues.append(f"[{server.label}] exit code {code} after SIGTERM, took {seconds:.1f} s")
            issues.extend(f"[{server.label}] {issue}" for issue in server.log_issues())


# --------------------------------------------------------------------------- a) delivery latency


async def _subscribe(ws: WebSocketConnection, key: str) -> None:
    await ws.send_message(orjson.dumps({"type": "auth", "token": None}).decode())
    await ws.get_message()
    subscribe = {"type": "subscribe", "keys": [key], "client_id": f"bench-{key}", "credit": 1}
    await ws.send_message(orjson.dumps(subscribe).decode())


async def _next(ws: WebSocketConnection, kind: str) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = orjson.loads(await ws.get_message())
        if message["type"] == kind:
            return message


async def _one_delivery(api: httpx.AsyncClient, ws: WebSocketConnection, key: str) -> float:
    """Seconds from sending the create to ``ws`` receiving the run; then the run is finished."""
    arrived: list[tuple[float, str]] = []

    async def receive() -> None:
        message = await _next(ws, "task_runs")
        arrived.append((time.perf_counter(), message["task_runs"][0]["id"]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        sent = time.perf_counter()
        created = expect(await api.post("/task_runs", json={"task_key": key}), 201, "POST /task_runs")
    [(at, run_id)] = arrived
    if run_id != created["id"]:
        raise BenchError(f"{key}: created {created['id']}, received {run_id}")
    states = [{"id": run_id, "state": {"type": t, "name": t.title()}} for t in ("RUNNING", "COMPLETED")]
    await ws.send_message(orjson.dumps({"type": "states", "states": states[:1]}).decode())
    await _next(ws, "state_results")
    await ws.send_message(orjson.dumps({"type": "states", "states": states[1:]}).decode())
    await _next(ws, "state_results")
    return at - sent


async def measure_latency(a: ServerProcess, b: ServerProcess, n: int) -> dict[str, list[float]]:
    """``n`` deliveries create-on-A -> subscription-on-A and as many to B, alternating."""
    samples: dict[str, list[float]] = {"A -> A": [], "A -> B": []}
    async with (
        open_websocket_url(a.ws_url) as here,
        open_websocket_url(b.ws_url) as there,
        httpx.AsyncClient(base_url=a.api, timeout=30, headers=JSON_HEADERS) as api,
    ):
        await _subscribe(here, LATENCY_KEYS[0])
        await _subscribe(there, LATENCY_KEYS[1])
        for i in range(n + 10):  # the first ten of each warm up
            for name, ws, key in (("A -> A", here, LATENCY_KEYS[0]), ("A -> B", there, LATENCY_KEYS[1])):
                seconds = await _one_delivery(api, ws, key)
                if i >= 10:
                    samples[name].append(seconds)
    return samples


# --------------------------------------------------------------------------- b) drain


@dataclass
class Drain:
    servers: int
    runs: int
    seconds: float
    first_delivery_ms: float
    server_cpu_s: list[float]
    worker_cpu_s: list[float]
    #: CPU seconds of the database's server processes serving the servers' connections.
    postgres_cpu_s: float
    #: Transactions committed in the database.
    commits: int
    machine_busy: float
    load: str

    @property
    def cpu_ms_per_run(self) -> float:
        """Every process of the deployment, database included: CPU milliseconds per run."""
        return (sum(self.server_cpu_s) + sum(self.worker_cpu_s) + self.postgres_cpu_s) / self.runs * 1e3

    @property
    def rate(self) -> float:
        return self.runs / self.seconds


def create_scheduled(client: httpx.Client, n: int, at: datetime) -> list[str]:
    ids: list[str] = []
    for offset in range(0, n, CREATE_BATCH):
        size = min(CREATE_BATCH, n - offset)
        body = [
            {"task_key": NOOP_KEY, "parameters": {"i": offset + j}, "scheduled_time": at.isoformat()}
            for j in range(size)
        ]
        runs = expect(
            client.post("/task_runs/batch", content=orjson.dumps(body)), 201, "POST /task_runs/batch"
        )
        ids += [run["id"] for run in runs]
    return ids


def drain(
    args: argparse.Namespace, workdir: Path, label: str, count: int, checks: list[str], issues: list[str]
) -> Drain:
    """``args.runs`` runs due at once, drained by ``count`` servers each with one worker."""
    with (
        postgres_database(args.postgres_url, label) as database,
        servers(workdir, label, database, count, issues) as started,
        contextlib.ExitStack() as stack,
    ):
        clients = [
            stack.enter_context(httpx.Client(base_url=s.api, timeout=300, headers=JSON_HEADERS))
            for s in started
        ]
        workers = [
            stack.enter_context(running_worker(workdir, f"{label}-{n}", s.api, args.limit, issues))[0]
            for n, s in enumerate(started)
        ]
        for client, worker in zip(clients, workers, strict=True):
            wait_subscribed(client, worker)
        due = time.time() + args.lead
        ids = create_scheduled(clients[0], args.runs, datetime.fromtimestamp(due, UTC))
        if time.time() > due - 0.5:
            raise BenchError(f"creating {args.runs} runs took more than --lead {args.lead:g} s minus 0.5")
        time.sleep(max(0.0, due - time.time() - 0.2))
        if args.py_spy is not None:
            pids = {s.label: s.pid for s in started} | {
                f"worker-{label}-{n}": w.pid for n, w in enumerate(workers)
            }
            stack.enter_context(profiled(args.py_spy, pids))
        before = Counters.read(database, started, workers)
        wait_ended(clients[0], ids[-1:], 1, 300.0)  # runs end about in order: the drain is over
        after = Counters.read(database, started, workers, before.postgres_pids)
        ended = wait_ended(clients[0], ids, 2000, 300.0)  # (not counted: the harness reads them all)
        wall = after.at - before.at
        busy = (after.busy - before.busy) / (wall * (os.cpu_count() or 1))
        completed = [r for r in ended if r["state"]["type"] == "COMPLETED"]
        if len(completed) != len(ids):
            checks.append(f"[{label}] {len(ids) - len(completed)} runs did not complete")
        if any(r.get("run_count", 1) != 1 for r in completed):
            checks.append(f"[{label}] runs executed more than once")
        last = max(parse_time(r["state"]["timestamp"]) for r in completed)
        history = expect(clients[0].get(f"/task_runs/{ids[0]}/history"), 200, "GET history")
        first = min(parse_time(h["timestamp"]) for h in history if h["type"] == "PENDING")
    return Drain(
        count,
        len(ids),
        last - due,
        (first - due) * 1e3,
        [b - a for a, b in zip(before.servers, after.servers, strict=True)],
        [b - a for a, b in zip(before.workers, after.workers, strict=True)],
        after.postgres - before.postgres,
        after.commits - before.commits,
        busy,
        load(),
    )


@dataclass
class Counters:
    """CPU seconds so far of each process of a drain, and of the machine; commits so far."""

    at: float
    servers: list[float]
    workers: list[float]
    postgres_pids: list[int]
    postgres: float
    commits: int
    busy: float

    @classmethod
    def read(
        cls,
        database: str,
        servers: Sequence[ServerProcess],
        workers: Sequence[WorkerProcess],
        postgres_pids: Sequence[int] | None = None,
    ) -> Counters:
        """Now; ``postgres_pids``: the database's server processes to count (default: those
        serving trioworker's connections now)."""
        with psycopg.connect(database, autocommit=True) as conn:
            if postgres_pids is None:
                rows = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name LIKE 'trioworker%'"
                )
                postgres_pids = [int(pid) for (pid,) in rows]
            [(commits,)] = conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            ).fetchall()
        return cls(
            time.monotonic(),
            [s.cpu_seconds() for s in servers],
            [process_cpu_seconds(w.pid) for w in workers],
            list(postgres_pids),
            sum(process_cpu_seconds(pid) for pid in postgres_pids),
            int(commits),
            busy_cpu_seconds(),
        )


@contextlib.contextmanager
def profiled(folder: Path, pids: dict[str, int]) -> Iterator[None]:
    """``py-spy record`` of each process (label -> pid) for the block: collapsed stacks in
    ``folder/LABEL.txt`` (``py-spy`` must be installed: ``pip install py-spy``)."""
    folder.mkdir(parents=True, exist_ok=True)
    command = ["py-spy", "record", "--rate", "250", "--nonblocking", "--format", "raw"]
    spies = [
        subprocess.Popen(
            [*command, "--pid", str(pid), "--output", str(folder / f"{label}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for label, pid in pids.items()
    ]
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(timeout=30)


# --------------------------------------------------------------------------- the table


@dataclass
class Results:
    latency: dict[str, list[float]] = field(default_factory=dict)
    drains: dict[int, list[Drain]] = field(default_factory=dict)


def median_drain(drains: Sequence[Drain]) -> Drain:
    return sorted(drains, key=lambda d: d.rate)[len(drains) // 2]


def render(results: Results) -> str:
    lines = []
    if results.latency:
        rows = []
        for name, values in results.latency.items():
            ms = [v * 1e3 for v in values]
            rows.append([name, f"{len(ms)}", *(f"{percentile(ms, q):.1f}" for q in (50, 95, 99))])
        here, there = (statistics.median(results.latency[k]) for k in ("A -> A", "A -> B"))
        lines += aligned_table(
            ["delivery (create on A)", "runs", "p50 ms", "p95 ms", "p99 ms"], rows, {1, 2, 3, 4}
        )
        lines.append(f"A -> B / A -> A at p50: {there / here:.2f}x")
        lines.append("")
    if results.drains:
        rows = []
        for count, drains in sorted(results.drains.items()):
            d = median_drain(drains)
            rows.append(
                [
                    f"{count} server{'s' if count > 1 else ''} + {count} worker{'s' if count > 1 else ''}",
                    f"{d.rate:,.0f}",
                    " ".join(f"{x.rate:,.0f}" for x in drains),
                    f"{d.first_delivery_ms:.0f}",
                    " / ".join(f"{c:.1f}" for c in d.server_cpu_s),
                    " / ".join(f"{c:.1f}" for c in d.worker_cpu_s),
                    f"{d.postgres_cpu_s:.1f}",
                    f"{d.cpu_ms_per_run:.2f}",
                    f"{d.commits / d.runs:.2f}",
                    f"{d.machine_busy:.0%}",
                    d.load,
                ]
            )
        header = ["drain", "runs/s", "each", "first ms", "server CPU s", "worker CPU s", "PG CPU s"]
        header += ["CPU ms/run", "commits/run", "machine busy", "load"]
        lines += aligned_table(header, rows, {1, 3, 6, 7, 8, 9})
        if 1 in results.drains and 2 in results.drains:
            one, two = (median_drain(results.drains[n]).rate for n in (1, 2))
            lines.append(f"two servers / one: {two / one:.2f}x")
            one_cpu, two_cpu = (median_drain(results.drains[n]).cpu_ms_per_run for n in (1, 2))
            lines.append(f"CPU per run, two servers / one: {two_cpu / one_cpu:.2f}x")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000, help="runs per drain (default 10,000)")
    parser.add_argument("--latency-runs", type=int, default=300, help="deliveries of each kind (default 300)")
    parser.add_argument("--repeat", type=int, default=3, help="drains of each kind (default 3)")
    parser.add_argument("--limit", type=int, default=100, help="each worker's --limit (default 100)")
    parser.add_argument("--lead", type=float, default=10.0, help="seconds from creating to due (default 10)")
    parser.add_argument("--phases", default="ab", help="a: latency, b: drain (default ab)")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--workdir", type=Path, default=None, help="logs (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--py-spy", type=Path, default=None, help="profile each drain's processes into this folder (py-spy)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="trioworker-bench-replicas-"))
    results = Results()
    checks: list[str] = []
    issues: list[str] = []
    began = time.monotonic()
    print(f"bench_replicas: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load {load()}")
    error = None
    try:
        if "a" in args.phases:
            log(f"[a] delivery latency, {args.latency_runs} runs of each kind")
            with (
                postgres_database(args.postgres_url, "latency") as database,
                servers(workdir, "latency", database, 2, issues) as (a, b),
            ):
                results.latency = trio.run(partial(measure_latency, a, b, args.latency_runs))
            log(f"    load {load()}")
        if "b" in args.phases:
            for rep in range(args.repeat):
                for count in (1, 2):
                    log(f"[b] drain {args.runs:,} runs, {count} server(s), rep {rep}")
                    result = drain(args, workdir, f"drain{count}-{rep}", count, checks, issues)
                    results.drains.setdefault(count, []).append(result)
                    busy = f"machine busy {result.machine_busy:.0%}, load {result.load}"
                    log(f"    {result.rate:,.0f} runs/s, {busy}")
    except BenchError as exc:
        error = str(exc)
    print(render(results))
    print_sections([("failed checks", checks), ("log issues", issues)], error)
    save_results(
        "bench_replicas",
        args,
        time.monotonic() - began,
        {
            "latency_ms": {k: [v * 1e3 for v in vs] for k, vs in results.latency.items()},
            "drains": {
                str(k): [asdict(d) | {"rate": d.rate} for d in ds] for k, ds in results.drains.items()
            },
        },
    )
    return 1 if checks or error else 0


if __name__ == "__main__":
    sys.exit(main())
