"""End-to-end benchmark: one worker process against one server process.

Run it as a plain script (no pytest)::

    python benchmarks/bench_worker.py [--runs N] [--repeat K] [--phases abcde]

Every phase starts a fresh server (``python -m trioworker server``, its own SQLite file)
and a fresh worker (``python benchmarks/worker_tasks.py API_URL LIMIT``, i.e.
``trioworker.worker.serve(noop, sleep50, limit=LIMIT)``), each in its own process:

a) N ``bench.noop`` runs at limit 10: the worker is subscribed first, then the runs are
   submitted in batches (``POST /api/task_runs/batch``) as fast as possible and waited for
   (``POST /api/task_runs/wait``); submit -> run -> complete, end to end;
b) the same at limit 100;
c) drain: N noop runs are queued first, then the worker (limit 100) starts; timed from the
   moment it is subscribed to the last completion;
d) 200 ``bench.sleep50`` runs (a sync task sleeping 50 ms in a thread) at limit 10: ideal
   1.0 s, target <= 1.2 s;
e) 1,000 sleep50 runs at limit 100: ideal 0.5 s, target <= 0.6 s.

Seconds run from the first submit (the harness's wall clock just before the first POST; for
c, the worker subscribed) to the last completion (the server's timestamp of the last
COMPLETED state); both clocks are this machine's UTC clock. A run's latency is its COMPLETED
timestamp minus its ``created`` time (both set by the server). CPU seconds are utime + stime
of each process over the timed part (/proc/PID/stat); peak RSS is VmHWM, read just before
the process is stopped. The worker must exit 0 on SIGTERM.

Waiting: the harness long-polls the newest run alone first, then collects every run with
``POST /api/task_runs/wait`` in chunks of ``--wait-chunk`` (by then they have ended). A
server-side waiter on K ids costs the server O(K) per run that ends, so waiting on all ids
from the start would slow the very thing measured (``--wait-mode chunks`` shows by how much).

The table shows the median of ``--repeat`` repetitions; the JSON results go to
``benchmarks/results/bench_worker.json``. The exit code is 1 when a phase misses its target,
a check fails (a run not COMPLETED, a wrong result, a run executed twice, the worker not
exiting 0, ...), or the benchmark aborts.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from bench_server import (  # benchmarks/ is on sys.path when this file runs as a script
    JSON_HEADERS,
    BenchError,
    ServerProcess,
    aligned_table,
    expect,
    fmt_number,
    log,
    percentile,
    print_sections,
    read_log,
    read_proc_status,
    running_server,
    save_results,
    stop_process,
)

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
DEFAULT_OUTPUT = HERE / "results" / "bench_worker.json"
WORKER_SCRIPT = HERE / "worker_tasks.py"

NOOP_KEY = "bench.noop"  # the keys of benchmarks/worker_tasks.py
SLEEP50_KEY = "bench.sleep50"
SLEEP_SECONDS = 0.05
SLEEP_TARGET_FACTOR = 1.2  # a sleep phase passes within 1.2 x its ideal time
SUBSCRIBE_TIMEOUT = 20.0
WORKER_STOP_TIMEOUT = 40.0  # more than the worker's 30 s shutdown grace
HEALTH_POLL_SECONDS = 0.002


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (all its threads); NaN when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_time(value: str) -> float:
    """An ISO 8601 time from the server -> POSIX seconds."""
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


# --------------------------------------------------------------------------- the worker process


@dataclass
class WorkerProcess:
    """One ``benchmarks/worker_tasks.py`` subprocess serving both benchmark tasks."""

    workdir: Path
    label: str
    api_url: str
    limit: int
    prefetch: int = 0
    proc: subprocess.Popen[bytes] | None = None
    #: The checkout whose trioworker runs (first on ``PYTHONPATH``): this one by default.
    project: Path = PROJECT
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / f"worker-{self.label}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        cmd = [sys.executable, str(WORKER_SCRIPT), self.api_url, str(self.limit), str(self.prefetch)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.project), env.get("PYTHONPATH")) if p)
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def peak_rss_mb(self) -> float:
        return read_proc_status(self.pid).get("VmHWM", 0) / 1024

    def stop(self) -> tuple[int | None, float]:
        """SIGTERM, then wait; returns (exit code, seconds). Kills it after WORKER_STOP_TIMEOUT."""
        return stop_process(self.proc, f"worker {self.label}", WORKER_STOP_TIMEOUT)

    def log_text(self) -> str:
        return read_log(self.log_path)

    def log_issues(self) -> list[str]:
        lines = self.log_text().splitlines()
        issues: list[str] = []
        for index, line in enumerate(lines):
            if any(marker in line for marker in ("Traceback", " ERROR ", " WARNING ", " CRITICAL ")):
                issues.append("\n".join(lines[index : index + 30]) if "Traceback" in line else line)
        return issues


@dataclass
class WorkerStop:
    code: int | None = None
    seconds: float = math.nan


@contextlib.contextmanager
def running_worker(
    workdir: Path, label: str, api_url: str, limit: int, issues: list[str], prefetch: int = 0
) -> Iterator[tuple[WorkerProcess, WorkerStop]]:
    """A started worker; on exit it is stopped with SIGTERM and the exit code recorded."""
    worker = WorkerProcess(workdir, label, api_url, limit, prefetch)
    stopped = WorkerStop()
    worker.start()
    try:
        yield worker, stopped
    finally:
        stopped.code, stopped.seconds = worker.stop()
        issues.extend(f"[{label}] worker: {issue}" for issue in worker.log_issues())


# --------------------------------------------------------------------------- REST helpers


def api_client(server: ServerProcess, timeout: float) -> httpx.Client:
    return httpx.Client(base_url=server.api, timeout=timeout + 30.0, headers=JSON_HEADERS)


def health(client: httpx.Client) -> dict[str, Any]:
    result: dict[str, Any] = expect(client.get("/health"), 200, "GET /health")
    return result


def wait_subscribed(client: httpx.Client, worker: WorkerProcess) -> float:
    """Poll /api/health until the worker's subscription shows; returns that wall-clock time."""
    deadline = time.perf_counter() + SUBSCRIBE_TIMEOUT
    while True:
        if health(client)["subscriptions"] >= 1:
            return time.time()
        if worker.exited():
            raise BenchError(
                f"the worker exited with code {worker.proc.returncode if worker.proc else None} "
                f"before subscribing:\n" + "\n".join(worker.log_text().splitlines()[-30:])
            )
        if time.perf_counter() > deadline:
            raise BenchError(f"the worker did not subscribe within {SUBSCRIBE_TIMEOUT:g} s")
        time.sleep(HEALTH_POLL_SECONDS)


def submit(client: httpx.Client, task_key: str, n: int, batch: int) -> tuple[float, float, list[str]]:
    """Create n runs in batches; returns (wall time before the first POST, after the last, ids)."""
    ids: list[str] = []
    first = time.time()
    for offset in range(0, n, batch):
        size = min(batch, n - offset)
        body = orjson.dumps([{"task_key": task_key, "parameters": {"i": offset + j}} for j in range(size)])
        runs = expect(client.post("/task_runs/batch", content=body), 201, "POST /task_runs/batch")
        if len(runs) != size:
            raise BenchError(f"a batch of {size} was answered with {len(runs)} runs")
        ids.extend(run["id"] for run in runs)
    return first, time.time(), ids


def wait_ended(
    client: httpx.Client, ids: Sequence[str], chunk: int, timeout: float, *, last_first: bool = True
) -> list[dict[str, Any]]:
    """Every run of ``ids`` once all ended (``POST /task_runs/wait`` with all=true, chunk by chunk).

    With ``last_first``, the newest run is waited for alone first: runs end roughly in
    creation order, so once it ended the chunks answer at once. That keeps the benchmark's
    own waiting off the server's CPU: the server re-scans a waiter's whole id set every
    time one of its runs ends, so a waiter on K ids costs O(K) per ending run (see
    ``--wait-mode``). Chunks are waited for one after the other, one waiter at a time.
    """
    deadline = time.perf_counter() + timeout

    def wait(part: list[str]) -> list[dict[str, Any]]:
        left = max(0.0, deadline - time.perf_counter())
        body = orjson.dumps({"ids": part, "timeout": min(left, 300.0), "all": True})
        result = expect(client.post("/task_runs/wait", content=body), 200, "POST /task_runs/wait")
        if result["missing"] or result["pending"]:
            raise BenchError(
                f"after {timeout:g} s, {len(result['pending'])} runs of a wait on {len(part)} were not "
                f"ended and {len(result['missing'])} missing"
            )
        ended: list[dict[str, Any]] = result["ended"]
        return ended

    if last_first and ids:
        wait([ids[-1]])
    ended: list[dict[str, Any]] = []
    for offset in range(0, len(ids), chunk):
        ended.extend(wait(list(ids[offset : offset + chunk])))
    return ended


def first_delivery_time(client: httpx.Client, run_id: str) -> float:
    """The server's timestamp of the first PENDING state of ``run_id`` (NaN if none)."""
    history = expect(client.get(f"/task_runs/{run_id}/history"), 200, "GET /task_runs/{id}/history")
    for change in history:
        if change["type"] == "PENDING":
            return parse_time(change["timestamp"])
    return math.nan


# --------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class PhaseSpec:
    key: str
    title: str
    task_key: str
    limit: int
    drain: bool  # queue every run before the worker starts
    target_seconds: float | None = None
    ideal_seconds: float | None = None


@dataclass
class Sample:
    runs: int
    seconds: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    worker_peak_rss_mb: float
    server_peak_rss_mb: float
    worker_cpu_s: float
    server_cpu_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PhaseResult:
    spec: PhaseSpec
    runs: int
    samples: list[Sample] = field(default_factory=list)

    def median(self, name: str) -> float:
        values = [getattr(s, name) for s in self.samples]
        return statistics.median(values) if values else math.nan

    @property
    def seconds(self) -> float:
        return self.median("seconds")

    @property
    def rate(self) -> float:
        seconds = self.seconds
        return self.runs / seconds if seconds > 0 else math.nan

    def peak(self, name: str) -> float:
        return max((getattr(s, name) for s in self.samples), default=math.nan)

    @property
    def target(self) -> str:
        t = self.spec.target_seconds
        return "-" if t is None else f"<= {t:.2f} s (>= {self.runs / t:,.0f}/s)"

    @property
    def verdict(self) -> str:
        if self.spec.target_seconds is None or not self.samples:
            return "-"
        return "PASS" if self.seconds <= self.spec.target_seconds else "FAIL"

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.spec.key,
            "title": self.spec.title,
            "task_key": self.spec.task_key,
            "limit": self.spec.limit,
            "runs": self.runs,
            "seconds_median": self.seconds,
            "runs_per_second": self.rate,
            "latency_ms_p50": self.median("latency_ms_p50"),
            "latency_ms_p95": self.median("latency_ms_p95"),
            "latency_ms_p99": self.median("latency_ms_p99"),
            "worker_peak_rss_mb": self.peak("worker_peak_rss_mb"),
            "server_peak_rss_mb": self.peak("server_peak_rss_mb"),
            "worker_cpu_s_median": self.median("worker_cpu_s"),
            "server_cpu_s_median": self.median("server_cpu_s"),
            "ideal_seconds": self.spec.ideal_seconds,
            "target_seconds": self.spec.target_seconds,
            "verdict": self.verdict,
            "samples": [asdict(s) for s in self.samples],
        }


def phase_specs(args: argparse.Namespace) -> list[PhaseSpec]:
    n, s, m = args.runs, args.sleep_runs, args.many_sleep_runs
    d_ideal = math.ceil(s / 10) * SLEEP_SECONDS
    e_ideal = math.ceil(m / 100) * SLEEP_SECONDS
    specs = [
        PhaseSpec("a", "a) noop, limit 10", NOOP_KEY, 10, drain=False),
        PhaseSpec("b", "b) noop, limit 100", NOOP_KEY, 100, drain=False),
        PhaseSpec("c", "c) drain noop, limit 100", NOOP_KEY, 100, drain=True),
        PhaseSpec(
            "d",
            "d) sleep50, limit 10",
            SLEEP50_KEY,
            10,
            drain=False,
            target_seconds=d_ideal * SLEEP_TARGET_FACTOR,
            ideal_seconds=d_ideal,
        ),
        PhaseSpec(
            "e",
            "e) sleep50, limit 100",
            SLEEP50_KEY,
            100,
            drain=False,
            target_seconds=e_ideal * SLEEP_TARGET_FACTOR,
            ideal_seconds=e_ideal,
        ),
    ]
    counts = {"a": n, "b": n, "c": n, "d": s, "e": m}
    return [spec for spec in specs if spec.key in args.phases and counts[spec.key] > 0]


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    phases: dict[str, PhaseResult] = field(default_factory=dict)
    issues: list[str] = field(default_factory=list)  # log lines that look like trouble
    checks: list[str] = field(default_factory=list)  # failed verifications

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.checks.append(what)
            log(f"  ! check failed: {what}")

    def count(self, spec: PhaseSpec) -> int:
        if spec.task_key == NOOP_KEY:
            return int(self.args.runs)
        return int(self.args.sleep_runs if spec.key == "d" else self.args.many_sleep_runs)

    def run_phase(self, spec: PhaseSpec, rep: int) -> None:
        n = self.count(spec)
        result = self.phases.setdefault(spec.key, PhaseResult(spec, n))
        label = f"{spec.key}{rep}"
        args = self.args
        log(f"[{spec.key}] rep {rep}: {n:,} {spec.task_key} runs, limit {spec.limit}")
        with (
            running_server(self.workdir, label, self.issues) as server,
            api_client(server, args.timeout) as client,
        ):
            extra: dict[str, Any] = {}
            ids: list[str] = []
            if spec.drain:
                _, _, ids = submit(client, spec.task_key, n, args.batch)
                ready = health(client)["ready"]
                self.check(
                    ready == n, f"[{label}] {ready} runs ready before the worker started, expected {n}"
                )
            worker_began = time.perf_counter()
            with running_worker(self.workdir, label, server.api, spec.limit, self.issues, args.prefetch) as (
                worker,
                stop,
            ):
                subscribed = wait_subscribed(client, worker)
                extra["worker_subscribe_seconds"] = time.perf_counter() - worker_began
                server_cpu0, worker_cpu0 = server.cpu_seconds(), worker.cpu_seconds()
                harness_cpu0 = time.process_time()
                if spec.drain:
                    begin = subscribed
                else:
                    begin, submitted, ids = submit(client, spec.task_key, n, args.batch)
                    extra["submit_seconds"] = submitted - begin
                runs = wait_ended(
                    client, ids, args.wait_chunk, args.timeout, last_first=args.wait_mode == "last-first"
                )
                harness_end = time.time()
                server_cpu = server.cpu_seconds() - server_cpu0
                worker_cpu = worker.cpu_seconds() - worker_cpu0
                extra["harness_cpu_s"] = time.process_time() - harness_cpu0
                worker_peak = worker.peak_rss_mb()
                server_peak, _ = server.memory_mb()
                if spec.drain:
                    first = first_delivery_time(client, ids[0])
                    extra["first_delivery_minus_subscribed_ms"] = (first - subscribed) * 1e3
                    begin = min(begin, first)
            self.check(stop.code == 0, f"[{label}] worker exit code {stop.code} after SIGTERM")
            extra["worker_stop_seconds"] = stop.seconds
            info = health(client)
            self.check(
                info["ready"] == 0 and info["delayed"] == 0,
                f"[{label}] after the phase health says ready={info['ready']} delayed={info['delayed']}",
            )
        latencies, last = self.verify(label, spec, ids, runs)
        seconds = last - begin
        extra["harness_seconds_to_wait_return"] = harness_end - begin
        if spec.ideal_seconds is not None:
            per_slot = n / spec.limit
            extra["overhead_ms_per_run_per_slot"] = (seconds - spec.ideal_seconds) / per_slot * 1e3
        sample = Sample(
            runs=n,
            seconds=seconds,
            latency_ms_p50=percentile(latencies, 50) * 1e3,
            latency_ms_p95=percentile(latencies, 95) * 1e3,
            latency_ms_p99=percentile(latencies, 99) * 1e3,
            worker_peak_rss_mb=worker_peak,
            server_peak_rss_mb=server_peak,
            worker_cpu_s=worker_cpu,
            server_cpu_s=server_cpu,
            extra=extra,
        )
        result.samples.append(sample)
        log(
            f"    {seconds:.3f} s, {n / seconds:,.0f} runs/s, p50 {sample.latency_ms_p50:.1f} ms, "
            f"CPU s: worker {worker_cpu:.2f} server {server_cpu:.2f}"
        )

    def verify(
        self, label: str, spec: PhaseSpec, ids: Sequence[str], runs: Sequence[dict[str, Any]]
    ) -> tuple[list[float], float]:
        """Checks every run; returns (latencies in seconds, time of the last completion)."""
        self.check(
            len(runs) == len(ids) and {r["id"] for r in runs} == set(ids),
            f"[{label}] the wait returned {len(runs)} runs for {len(ids)} ids",
        )
        latencies: list[float] = []
        last = -math.inf
        not_completed = wrong = repeated = 0
        for run in runs:
            state = run["state"]
            if state["type"] != "COMPLETED":
                not_completed += 1
                continue
            done = parse_time(state["timestamp"])
            last = max(last, done)
            latencies.append(done - parse_time(run["created"]))
            if state.get("data") != run["parameters"]["i"]:
                wrong += 1
            if run.get("run_count", 1) != 1:
                repeated += 1
        self.check(not_completed == 0, f"[{label}] {not_completed} runs ended but not COMPLETED")
        self.check(wrong == 0, f"[{label}] {wrong} runs completed with a result other than their i")
        self.check(repeated == 0, f"[{label}] {repeated} runs were executed more than once")
        if not latencies:
            raise BenchError(f"[{label}] no run completed")
        return latencies, last


# --------------------------------------------------------------------------- output


def render_table(phases: Sequence[PhaseResult], repeat: int) -> str:
    header = [
        "phase",
        "runs",
        "seconds",
        "runs/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "worker RSS MB",
        "server RSS MB",
        "worker CPU s",
        "server CPU s",
        "target",
        "result",
    ]
    rows = [
        [
            p.spec.title,
            f"{p.runs:,}",
            fmt_number(p.seconds, 3),
            fmt_number(p.rate),
            fmt_number(p.median("latency_ms_p50"), 1),
            fmt_number(p.median("latency_ms_p95"), 1),
            fmt_number(p.median("latency_ms_p99"), 1),
            fmt_number(p.peak("worker_peak_rss_mb"), 1),
            fmt_number(p.peak("server_peak_rss_mb"), 1),
            fmt_number(p.median("worker_cpu_s"), 2),
            fmt_number(p.median("server_cpu_s"), 2),
            p.target,
            p.verdict,
        ]
        for p in phases
    ]
    out = aligned_table(header, rows, numeric=set(range(1, 11)))
    if repeat > 1:
        out.append(f"(median of {repeat} repetitions; peak RSS is the largest seen)")
    return "\n".join(out)


def add_prefetch_option(parser: argparse.ArgumentParser) -> None:
    """``--prefetch``, passed to the worker process (shared with bench_submit.py)."""
    parser.add_argument(
        "--prefetch", type=int, default=0, help="the worker's prefetch: runs sent ahead into its buffer (0)"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10_000, help="N: noop runs of phases a-c (10,000)")
    parser.add_argument("--sleep-runs", type=int, default=200, help="sleep50 runs of phase d (200)")
    parser.add_argument("--many-sleep-runs", type=int, default=1000, help="sleep50 runs of phase e (1,000)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="K: repetitions of each phase; the median is shown"
    )
    parser.add_argument("--phases", default="abcde", help="which phases to run (letters of a b c d e)")
    parser.add_argument("--batch", type=int, default=500, help="runs per POST /api/task_runs/batch")
    add_prefetch_option(parser)
    parser.add_argument(
        "--wait-chunk", type=int, default=1000, help="ids per POST /api/task_runs/wait (one at a time)"
    )
    parser.add_argument(
        "--wait-mode",
        choices=("last-first", "chunks"),
        default="last-first",
        help="last-first (default): wait for the newest run alone, then collect all in chunks; "
        "chunks: wait on the chunks from the start (the server's waiter then costs it CPU)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a phase may take to end")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args(argv)
    for name in ("runs", "repeat", "batch", "wait_chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.sleep_runs < 0 or args.many_sleep_runs < 0:
        parser.error("--sleep-runs and --many-sleep-runs must be >= 0")
    if set(args.phases) - set("abcde"):
        parser.error("--phases takes letters of a b c d e")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    specs = phase_specs(args)
    started = time.perf_counter()
    error: str | None = None
    with tempfile.TemporaryDirectory(prefix="trioworker-bench-worker-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            for rep in range(1, args.repeat + 1):
                for spec in specs:
                    bench.run_phase(spec, rep)
        except (BenchError, httpx.HTTPError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            log(f"\nbenchmark aborted: {error}")
    elapsed = time.perf_counter() - started
    phases = list(bench.phases.values())

    print()
    print(
        f"trioworker worker benchmark: N={args.runs:,} batch={args.batch} wait={args.wait_mode} "
        f"prefetch={args.prefetch} "
        f"repeat={args.repeat} "
        f"cpus={os.cpu_count()} ({elapsed:.0f} s in all)"
    )
    print(render_table(phases, args.repeat))
    print_sections([("failed checks", bench.checks), ("log issues", bench.issues)], error)
    save_results(
        "bench_worker",
        args,
        elapsed,
        {
            "phases": [p.to_json() for p in phases],
            "failed_checks": bench.checks,
            "log_issues": bench.issues,
            "error": error,
        },
    )
    failed = error is not None or bench.checks or any(p.verdict == "FAIL" for p in phases)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
