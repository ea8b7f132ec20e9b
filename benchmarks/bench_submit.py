"""Benchmark of the submitting side: ``Task.map`` / ``delay``, futures and their waits.

Run it as a plain script (no pytest)::

    python benchmarks/bench_submit.py [--runs N] [--repeat K] [--phases abcd]

This process is the submitter: it imports ``bench.noop`` from ``benchmarks/worker_tasks.py``
(so it and the worker share the task key) and submits through the public API. Every phase
starts a fresh server (``python -m trioworker server``, its own SQLite file) and a fresh
worker (``python benchmarks/worker_tasks.py API_URL LIMIT``, limit ``--limit``, default 100),
each in its own process; the worker is subscribed before the phase begins (with
``--submit-alone`` it starts only after the submission was timed, so that submitting does
not share the CPUs with it).

a) ``futures = await noop.map(range(N))`` inside ``async with trioworker.connect()``: runs/s
   (target >= 5,000/s); then ``await trioworker.wait_all(futures)``: seconds from the start
   of the map to the return of wait_all, and how many ``POST /api/task_runs/wait`` requests
   that took (target: at most ``--wait-target`` per 1,000 runs); then
   ``[await f.result() for f in futures]``, which must equal ``range(N)`` and cost no request;
b) the same, but awaiting with N concurrent ``await f.result()`` calls (one Trio task per
   future), which share one long-poll through the futures' watcher;
c) ``--delays`` sequential ``await noop.delay(i)`` in one ``connect()`` (runs/s; target
   >= 2,000/s), then, once those completed, ``--round-trips`` sequential
   ``f = await noop.delay(i); await f.result()`` (p50/p95/p99 ms, and the median time of
   each stage: from the runs' histories, read afterwards and not counted);
d) the blocking twins from plain code (no Trio): ``noop.sync.map(range(N))`` (same target
   as a) and ``trioworker.sync.wait_all(futures)``, inside ``trioworker.sync.connect()``.

Requests are counted by an httpx request event hook on the client that ``connect()`` yields
(``client._http.event_hooks["request"]``), by method and path (run ids shown as ``{id}``).
CPU seconds are utime + stime over the timed part: this process (``time.process_time``),
the server and the worker (/proc/PID/stat); peak RSS is VmHWM (this process: ru_maxrss).

The table shows the median of ``--repeat`` repetitions; the JSON results go to
``benchmarks/results/bench_submit.json``. The exit code is 1 when a row misses its target, a
check fails (a wrong result, a run not COMPLETED or executed twice, a read after the wait
that cost a request, the worker not exiting 0, ...), or the benchmark aborts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
for _path in (str(HERE), str(PROJECT)):  # worker_tasks, bench_* and trioworker, run from anywhere
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_server import (  # noqa: E402
    BenchError,
    ServerProcess,
    aligned_table,
    expect,
    fmt_number,
    log,
    percentile,
    print_sections,
    running_server,
    save_results,
)
from bench_worker import (  # noqa: E402
    WorkerProcess,
    WorkerStop,
    add_prefetch_option,
    api_client,
    health,
    parse_time,
    running_worker,
    wait_subscribed,
)
from worker_tasks import NOOP_KEY, noop  # noqa: E402

import trioworker  # noqa: E402
from trioworker.client.futures import SyncTaskRunFuture, TaskRunFuture  # noqa: E402
from trioworker.client.rest import SyncTaskRunClient, TaskRunClient  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "bench_submit.json"

MAP_TARGET = 5_000.0  # runs/s of Task.map (and of its sync twin)
DELAY_TARGET = 2_000.0  # runs/s of sequential Task.delay (the goal in the project issues)
WAIT_TARGET_PER_1K = 5.0  # "no more than a few" /task_runs/wait requests per 1,000 runs
WAIT_PATH = "/api/task_runs/wait"

ROUNDTRIP_STAGES = (
    "delay() call -> run created",
    "run created -> delay() returned",
    "run created -> delivered (PENDING)",
    "PENDING -> RUNNING",
    "RUNNING -> COMPLETED",
    "COMPLETED -> result() returned",
)

_RUN_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


# --------------------------------------------------------------------------- counting requests


@dataclass
class RequestCounter:
    """Requests a trioworker client sent, by ``METHOD /path`` (run ids as ``{id}``)."""

    by_path: Counter[str] = field(default_factory=Counter)

    def record(self, request: httpx.Request) -> None:
        self.by_path[f"{request.method} {_RUN_ID.sub('{id}', request.url.path)}"] += 1

    async def record_async(self, request: httpx.Request) -> None:
        self.record(request)

    def attach(self, client: TaskRunClient) -> None:
        client._http.event_hooks["request"].append(self.record_async)

    def attach_sync(self, client: SyncTaskRunClient) -> None:
        client._http.event_hooks["request"].append(self.record)

    def snapshot(self) -> Counter[str]:
        return Counter(self.by_path)

    def since(self, before: Counter[str]) -> Counter[str]:
        return self.by_path - before

    @property
    def total(self) -> int:
        return sum(self.by_path.values())


def waits(requests: Counter[str]) -> int:
    return sum(n for key, n in requests.items() if key.split(" ", 1)[1] == WAIT_PATH)


# --------------------------------------------------------------------------- rows and samples


@dataclass(frozen=True)
class Trip:
    """One round trip of phase c: its run and this process's wall-clock times."""

    run_id: str
    called: float
    delay_returned: float
    result_returned: float


@dataclass(frozen=True)
class RowSpec:
    key: str
    title: str
    phase: str
    min_rate: float | None = None  # runs/s
    max_per_1k: float | None = None  # counted requests per 1,000 runs
    max_requests: float | None = None  # counted requests

    def target(self, runs: int) -> str:
        if self.min_rate is not None:
            return f">= {self.min_rate:,.0f}/s"
        if self.max_per_1k is not None:
            return f"<= {self.max_per_1k:g} waits/1k"
        if self.max_requests is not None:
            return f"<= {self.max_requests:g} requests"
        return "-"


def row_specs(args: argparse.Namespace) -> list[RowSpec]:
    w = float(args.wait_target)
    specs = [
        RowSpec("a_map", "a) await noop.map(range(N))", "a", min_rate=MAP_TARGET),
        RowSpec("a_wait", "a) map start -> wait_all returned", "a", max_per_1k=w),
        RowSpec("a_read", "a) await f.result() x N after wait_all", "a", max_requests=0),
        RowSpec("b_map", "b) await noop.map(range(N))", "b", min_rate=MAP_TARGET),
        RowSpec("b_wait", "b) map start -> N concurrent result() done", "b", max_per_1k=w),
        RowSpec("c_delay", "c) await noop.delay(i) x D, sequential", "c", min_rate=DELAY_TARGET),
        RowSpec("c_roundtrip", "c) delay + result() x R, sequential", "c"),
        RowSpec("d_map", "d) noop.sync.map(range(N))", "d", min_rate=MAP_TARGET),
        RowSpec("d_wait", "d) sync map start -> sync.wait_all returned", "d", max_per_1k=w),
        RowSpec("d_read", "d) f.result() x N after sync.wait_all", "d", max_requests=0),
    ]
    return [s for s in specs if s.phase in args.phases]


@dataclass
class Sample:
    runs: int
    seconds: float
    requests: int  # the requests this row counts (waits for the wait rows, all otherwise)
    requests_by_path: dict[str, int]
    latency_ms_p50: float = math.nan
    latency_ms_p95: float = math.nan
    latency_ms_p99: float = math.nan
    client_cpu_s: float = math.nan
    server_cpu_s: float = math.nan
    worker_cpu_s: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RowResult:
    spec: RowSpec
    samples: list[Sample] = field(default_factory=list)

    def median(self, name: str) -> float:
        values = [float(getattr(s, name)) for s in self.samples]
        return statistics.median(values) if values else math.nan

    @property
    def runs(self) -> int:
        return self.samples[0].runs if self.samples else 0

    @property
    def seconds(self) -> float:
        return self.median("seconds")

    @property
    def rate(self) -> float:
        seconds = self.seconds
        return self.runs / seconds if seconds > 0 else math.nan

    @property
    def requests(self) -> float:
        return self.median("requests")

    @property
    def per_1k(self) -> float:
        return self.requests / self.runs * 1000 if self.runs else math.nan

    @property
    def verdict(self) -> str:
        spec = self.spec
        if not self.samples:
            return "-"
        if spec.min_rate is not None:
            return "PASS" if self.rate >= spec.min_rate else "FAIL"
        if spec.max_per_1k is not None:
            return "PASS" if self.per_1k <= spec.max_per_1k else "FAIL"
        if spec.max_requests is not None:
            # every repetition, not the median: one read that asks the server is a failure
            worst = max(s.requests for s in self.samples)
            return "PASS" if worst <= spec.max_requests else "FAIL"
        return "-"

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.spec.key,
            "title": self.spec.title,
            "runs": self.runs,
            "seconds_median": self.seconds,
            "runs_per_second": self.rate,
            "requests_median": self.requests,
            "requests_per_1k_runs": self.per_1k,
            "latency_ms_p50": self.median("latency_ms_p50"),
            "latency_ms_p95": self.median("latency_ms_p95"),
            "latency_ms_p99": self.median("latency_ms_p99"),
            "client_cpu_s_median": self.median("client_cpu_s"),
            "server_cpu_s_median": self.median("server_cpu_s"),
            "worker_cpu_s_median": self.median("worker_cpu_s"),
            "target": self.spec.target(self.runs),
            "min_rate": self.spec.min_rate,
            "max_requests_per_1k": self.spec.max_per_1k,
            "max_requests": self.spec.max_requests,
            "verdict": self.verdict,
            "samples": [asdict(s) for s in self.samples],
        }


# --------------------------------------------------------------------------- one phase's processes


@dataclass(frozen=True)
class Mark:
    """Clocks at the start of a measured part."""

    wall: float
    client_cpu: float
    server_cpu: float
    worker_cpu: float


@dataclass
class Harness:
    """A phase's server and worker, and the clocks to measure them with."""

    bench: Bench
    label: str
    server: ServerProcess
    api: httpx.Client
    stack: contextlib.ExitStack
    worker: WorkerProcess | None = None
    worker_stop: WorkerStop | None = None

    def start_worker(self, *, wait: bool) -> None:
        """Start the worker (once); with ``wait``, return once it is subscribed."""
        if self.worker is None:
            self.worker, self.worker_stop = self.stack.enter_context(
                running_worker(
                    self.bench.workdir,
                    self.label,
                    self.server.api,
                    self.bench.args.limit,
                    self.bench.issues,
                    self.bench.args.prefetch,
                )
            )
        if wait:
            wait_subscribed(self.api, self.worker)

    def worker_cpu(self) -> float:
        return 0.0 if self.worker is None else self.worker.cpu_seconds()

    def mark(self) -> Mark:
        return Mark(time.perf_counter(), time.process_time(), self.server.cpu_seconds(), self.worker_cpu())

    def sample(
        self,
        since: Mark,
        *,
        runs: int,
        requests: Counter[str],
        counted: int | None = None,
        latencies: Sequence[float] = (),
        extra: dict[str, Any] | None = None,
    ) -> Sample:
        """What happened since ``since``; ``counted`` defaults to every request."""
        now = self.mark()
        return Sample(
            runs=runs,
            seconds=now.wall - since.wall,
            requests=sum(requests.values()) if counted is None else counted,
            requests_by_path=dict(sorted(requests.items())),
            latency_ms_p50=percentile(latencies, 50) * 1e3,
            latency_ms_p95=percentile(latencies, 95) * 1e3,
            latency_ms_p99=percentile(latencies, 99) * 1e3,
            client_cpu_s=now.client_cpu - since.client_cpu,
            server_cpu_s=now.server_cpu - since.server_cpu,
            worker_cpu_s=now.worker_cpu - since.worker_cpu,
            extra=extra or {},
        )


# --------------------------------------------------------------------------- the benchmark


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    rows: dict[str, RowResult] = field(default_factory=dict)
    phase_info: list[dict[str, Any]] = field(default_factory=list)
    issues: list[str] = field(default_factory=list)  # log lines that look like trouble
    checks: list[str] = field(default_factory=list)  # failed verifications

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.checks.append(what)
            log(f"  ! check failed: {what}")

    def add(self, key: str, sample: Sample) -> None:
        row = self.rows.get(key)
        if row is None:
            spec = next(s for s in row_specs(self.args) if s.key == key)
            row = self.rows[key] = RowResult(spec)
        row.samples.append(sample)
        per_1k = sample.requests / sample.runs * 1000 if sample.runs else math.nan
        latency = "" if math.isnan(sample.latency_ms_p50) else f", p50 {sample.latency_ms_p50:.2f} ms"
        log(
            f"    {row.spec.title}: {sample.seconds:.3f} s, {sample.runs / sample.seconds:,.0f} runs/s, "
            f"{sample.requests} requests ({per_1k:.2f}/1k){latency}; CPU s client {sample.client_cpu_s:.2f} "
            f"server {sample.server_cpu_s:.2f} worker {sample.worker_cpu_s:.2f}"
        )

    def run_phase(self, phase: str, rep: int) -> None:
        label = f"{phase}{rep}"
        args = self.args
        log(f"[{phase}] rep {rep}")
        with (
            running_server(self.workdir, label, self.issues) as server,
            api_client(server, args.timeout) as api,
            contextlib.ExitStack() as stack,
        ):
            h = Harness(self, label, server, api, stack)
            if not args.submit_alone:
                h.start_worker(wait=True)
            os.environ["TRIOWORKER_API_URL"] = server.api  # connect() is given api_url too
            if phase == "a":
                trio.run(self.phase_async_map, h, "wait_all")
            elif phase == "b":
                trio.run(self.phase_async_map, h, "results")
            elif phase == "c":
                trips = trio.run(self.phase_delay, h)
                if trips:
                    self.roundtrip_breakdown(h, trips)
            else:
                self.phase_sync_map(h)
            info = health(api)
            self.check(
                info["ready"] == 0 and info["delayed"] == 0,
                f"[{label}] after the phase health says ready={info['ready']} delayed={info['delayed']}",
            )
            server_peak, _ = server.memory_mb()
            worker_peak = h.worker.peak_rss_mb() if h.worker is not None else math.nan
            stack.close()  # stops the worker (SIGTERM) and records its exit code
            stop = h.worker_stop
            self.check(
                stop is not None and stop.code == 0,
                f"[{label}] worker exit code {None if stop is None else stop.code} after SIGTERM",
            )
        self.phase_info.append(
            {
                "phase": phase,
                "rep": rep,
                "server_peak_rss_mb": server_peak,
                "worker_peak_rss_mb": worker_peak,
                "client_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "worker_stop_seconds": None if stop is None else stop.seconds,
            }
        )

    # -- verification

    def verify_runs(
        self, label: str, futures: Sequence[SyncTaskRunFuture[int] | TaskRunFuture[int]]
    ) -> float:
        """Checks every future's final run; returns the POSIX time of the last completion."""
        not_done = not_completed = repeated = 0
        last = -math.inf
        for future in futures:
            run = future.task_run
            if run is None or not future.done:
                not_done += 1
                continue
            if run.state.type is not trioworker.StateType.COMPLETED:
                not_completed += 1
                continue
            if run.run_count != 1:
                repeated += 1
            last = max(last, run.state.timestamp.timestamp())
        self.check(not_done == 0, f"[{label}] {not_done} futures not done after the wait")
        self.check(not_completed == 0, f"[{label}] {not_completed} runs ended but not COMPLETED")
        self.check(repeated == 0, f"[{label}] {repeated} runs were executed more than once (run_count != 1)")
        return last

    def verify_results(self, label: str, results: Sequence[object], expected: Sequence[int]) -> None:
        wrong = sum(1 for got, want in zip(results, expected, strict=True) if got != want)
        self.check(
            len(results) == len(expected) and wrong == 0,
            f"[{label}] {wrong} of {len(expected)} results differ from the expected values",
        )

    # -- a) and b): map, then wait_all or N concurrent result()

    async def phase_async_map(self, h: Harness, how: str) -> None:
        args = self.args
        n: int = args.runs
        prefix = "a" if how == "wait_all" else "b"
        label = h.label
        expected = list(range(n))
        with trio.fail_after(args.timeout):
            async with trioworker.connect(api_url=h.server.api) as client:
                counter = RequestCounter()
                counter.attach(client)
                start = h.mark()
                futures = await noop.map(range(n))
                map_sample = h.sample(start, runs=n, requests=counter.since(Counter()))
                self.check(len(futures) == n, f"[{label}] map returned {len(futures)} futures for {n} items")
                if args.submit_alone:
                    h.start_worker(wait=False)
                before_wait = counter.snapshot()
                wait_mark = h.mark()
                if how == "wait_all":
                    await trioworker.wait_all(futures)
                    got: list[object] = []
                else:
                    got = [None] * n

                    async def one(i: int, future: TaskRunFuture[int]) -> None:
                        got[i] = await future.result()

                    async with trio.open_nursery() as nursery:
                        for i, future in enumerate(futures):
                            nursery.start_soon(one, i, future)
                returned = time.time()
                wait_seconds = time.perf_counter() - wait_mark.wall
                during_wait = counter.since(before_wait)
                last = self.verify_runs(label, futures)
                extra = {
                    "map_seconds": map_sample.seconds,
                    "wait_call_seconds": wait_seconds,
                    "ms_from_last_completion_to_return": (returned - last) * 1e3,
                    "worker_started_after_map": bool(args.submit_alone),
                    "map_requests_by_path": map_sample.requests_by_path,
                }
                wait_sample = h.sample(
                    start, runs=n, requests=during_wait, counted=waits(during_wait), extra=extra
                )
                self.add(f"{prefix}_map", map_sample)
                self.add(f"{prefix}_wait", wait_sample)
                if how == "results":
                    self.verify_results(label, got, expected)
                # reading the results once the wait filled them in must cost no request
                before_read = counter.snapshot()
                read_mark = h.mark()
                results = [await future.result() for future in futures]
                if how == "wait_all":
                    self.add("a_read", h.sample(read_mark, runs=n, requests=counter.since(before_read)))
                else:
                    extra_reads = counter.since(before_read)
                    self.check(
                        not extra_reads, f"[{label}] re-reading results cost requests: {dict(extra_reads)}"
                    )
                self.verify_results(label, results, expected)

    # -- c): sequential delay, then round trips

    async def phase_delay(self, h: Harness) -> list[Trip]:
        """Returns the round trips, for :meth:`roundtrip_breakdown`."""
        args = self.args
        d: int = args.delays
        r: int = args.round_trips
        label = h.label
        with trio.fail_after(args.timeout):
            async with trioworker.connect(api_url=h.server.api) as client:
                counter = RequestCounter()
                counter.attach(client)
                if d:
                    futures: list[TaskRunFuture[int]] = []
                    latencies: list[float] = []
                    start = h.mark()
                    for i in range(d):
                        t0 = time.perf_counter()
                        futures.append(await noop.delay(i))
                        latencies.append(time.perf_counter() - t0)
                    self.add(
                        "c_delay",
                        h.sample(start, runs=d, requests=counter.since(Counter()), latencies=latencies),
                    )
                    if args.submit_alone:
                        h.start_worker(wait=False)
                    # let the worker finish them before the round trips (and check them)
                    await trioworker.wait_all(futures)
                    self.verify_runs(label, futures)
                    self.verify_results(label, [await f.result() for f in futures], list(range(d)))
                if r:
                    if args.submit_alone:  # started and subscribed before the first round trip
                        await trio.to_thread.run_sync(functools.partial(h.start_worker, wait=True))
                    before = counter.snapshot()
                    seconds: list[float] = []
                    trips: list[Trip] = []
                    results: list[int] = []
                    trip_futures: list[TaskRunFuture[int]] = []
                    start = h.mark()
                    for i in range(r):
                        t0, w0 = time.perf_counter(), time.time()
                        future = await noop.delay(i)
                        w1 = time.time()
                        results.append(await future.result())
                        seconds.append(time.perf_counter() - t0)
                        trips.append(Trip(str(future.task_run_id), w0, w1, time.time()))
                        trip_futures.append(future)
                    self.add(
                        "c_roundtrip",
                        h.sample(start, runs=r, requests=counter.since(before), latencies=seconds),
                    )
                    self.verify_runs(label, trip_futures)
                    self.verify_results(label, results, list(range(r)))
                    return trips
        return []

    def roundtrip_breakdown(self, h: Harness, trips: Sequence[Trip]) -> None:
        """Where a round trip's time goes (median ms per stage), from the runs' histories.

        Read after the timed part with the harness's own client (not counted). Server
        timestamps and this process's wall clock are the same machine's UTC clock.
        """
        stages: dict[str, list[float]] = {name: [] for name in ROUNDTRIP_STAGES}
        for trip in trips:
            response = h.api.get(f"/task_runs/{trip.run_id}/history")
            history = expect(response, 200, "GET /task_runs/{id}/history")
            at: dict[str, float] = {}
            for change in history:
                at.setdefault(change["type"], parse_time(change["timestamp"]))
            if not {"SCHEDULED", "PENDING", "RUNNING", "COMPLETED"} <= at.keys():
                self.check(False, f"[{h.label}] run {trip.run_id} has an incomplete history: {sorted(at)}")
                continue
            points = [
                trip.called,
                at["SCHEDULED"],
                trip.delay_returned,
                at["PENDING"],
                at["RUNNING"],
                at["COMPLETED"],
                trip.result_returned,
            ]
            # stages in time order: call -> created -> delay() returned / delivered -> ...
            stages["delay() call -> run created"].append(points[1] - points[0])
            stages["run created -> delay() returned"].append(points[2] - points[1])
            stages["run created -> delivered (PENDING)"].append(points[3] - points[1])
            stages["PENDING -> RUNNING"].append(points[4] - points[3])
            stages["RUNNING -> COMPLETED"].append(points[5] - points[4])
            stages["COMPLETED -> result() returned"].append(points[6] - points[5])
        breakdown = {name: percentile(values, 50) * 1e3 for name, values in stages.items()}
        self.rows["c_roundtrip"].samples[-1].extra["stage_ms_p50"] = breakdown
        log("    round trip, median ms per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in breakdown.items()))

    # -- d): the blocking twins, no Trio

    def phase_sync_map(self, h: Harness) -> None:
        args = self.args
        n: int = args.runs
        label = h.label
        expected = list(range(n))
        with trioworker.sync.connect(api_url=h.server.api) as client:
            counter = RequestCounter()
            counter.attach_sync(client)
            start = h.mark()
            futures = noop.sync.map(range(n))
            map_sample = h.sample(start, runs=n, requests=counter.since(Counter()))
            self.check(len(futures) == n, f"[{label}] sync map returned {len(futures)} futures for {n} items")
            if args.submit_alone:
                h.start_worker(wait=False)
            before_wait = counter.snapshot()
            wait_mark = h.mark()
            trioworker.sync.wait_all(futures, timeout=args.timeout)
            returned = time.time()
            wait_seconds = time.perf_counter() - wait_mark.wall
            during_wait = counter.since(before_wait)
            last = self.verify_runs(label, futures)
            extra = {
                "map_seconds": map_sample.seconds,
                "wait_call_seconds": wait_seconds,
                "ms_from_last_completion_to_return": (returned - last) * 1e3,
                "worker_started_after_map": bool(args.submit_alone),
                "map_requests_by_path": map_sample.requests_by_path,
            }
            wait_sample = h.sample(
                start, runs=n, requests=during_wait, counted=waits(during_wait), extra=extra
            )
            self.add("d_map", map_sample)
            self.add("d_wait", wait_sample)
            before_read = counter.snapshot()
            read_mark = h.mark()
            results = [future.result() for future in futures]
            self.add("d_read", h.sample(read_mark, runs=n, requests=counter.since(before_read)))
            self.verify_results(label, results, expected)


# --------------------------------------------------------------------------- output


def render_table(rows: Sequence[RowResult], repeat: int) -> str:
    header = [
        "phase",
        "runs",
        "seconds",
        "runs/s",
        "requests",
        "req/1k runs",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "client CPU s",
        "server CPU s",
        "worker CPU s",
        "target",
        "result",
    ]
    table = [
        [
            r.spec.title,
            f"{r.runs:,}",
            fmt_number(r.seconds, 3),
            fmt_number(r.rate),
            fmt_number(r.requests),
            fmt_number(r.per_1k, 2),
            fmt_number(r.median("latency_ms_p50"), 2),
            fmt_number(r.median("latency_ms_p95"), 2),
            fmt_number(r.median("latency_ms_p99"), 2),
            fmt_number(r.median("client_cpu_s"), 2),
            fmt_number(r.median("server_cpu_s"), 2),
            fmt_number(r.median("worker_cpu_s"), 2),
            r.spec.target(r.runs),
            r.verdict,
        ]
        for r in rows
    ]
    out = aligned_table(header, table, numeric=set(range(1, 12)))
    notes = [
        "requests: every request of the row, but the wait rows count only POST /api/task_runs/wait",
        "wait rows: seconds from the start of the map to the wait's return (submit + run + wait)",
    ]
    if repeat > 1:
        notes.append(f"median of {repeat} repetitions; the read rows must cost 0 requests in every one")
    out += [f"({note})" for note in notes]
    return "\n".join(out)


def roundtrip_stages(row: RowResult | None) -> dict[str, float]:
    """The median over repetitions of each round-trip stage's median."""
    if row is None:
        return {}
    per_sample = [s.extra["stage_ms_p50"] for s in row.samples if "stage_ms_p50" in s.extra]
    if not per_sample:
        return {}
    return {name: statistics.median(float(b[name]) for b in per_sample) for name in ROUNDTRIP_STAGES}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10_000, help="N: runs mapped in phases a, b, d (10,000)")
    parser.add_argument("--delays", type=int, default=1000, help="D: sequential delay() calls of phase c")
    parser.add_argument("--round-trips", type=int, default=200, help="R: delay + result() of phase c")
    parser.add_argument(
        "--repeat", type=int, default=1, help="K: repetitions of each phase; the median is shown"
    )
    parser.add_argument("--phases", default="abcd", help="which phases to run (letters of a b c d)")
    parser.add_argument("--limit", type=int, default=100, help="the worker's concurrency limit (100)")
    add_prefetch_option(parser)
    parser.add_argument(
        "--wait-target",
        type=float,
        default=WAIT_TARGET_PER_1K,
        help=f"most /task_runs/wait requests per 1,000 runs a wait row may cost ({WAIT_TARGET_PER_1K:g})",
    )
    parser.add_argument(
        "--submit-alone",
        action="store_true",
        help="start the worker only after the submission was timed (default: subscribed before)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a phase may take")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args(argv)
    for name in ("runs", "repeat", "limit"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.delays < 0 or args.round_trips < 0:
        parser.error("--delays and --round-trips must be >= 0")
    if set(args.phases) - set("abcd") or not args.phases:
        parser.error("--phases takes letters of a b c d")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    phases = [p for p in "abcd" if p in args.phases]
    started = time.perf_counter()
    error: str | None = None
    with tempfile.TemporaryDirectory(prefix="trioworker-bench-submit-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            for rep in range(1, args.repeat + 1):
                for phase in phases:
                    bench.run_phase(phase, rep)
        except (
            BenchError,
            httpx.HTTPError,
            trioworker.TrioworkerError,
            trio.TooSlowError,
            OSError,
            ExceptionGroup,
        ) as exc:
            error = f"{type(exc).__name__}: {exc}"
            log(f"\nbenchmark aborted: {error}")
    elapsed = time.perf_counter() - started
    order = {s.key: i for i, s in enumerate(row_specs(args))}
    rows = sorted(bench.rows.values(), key=lambda r: order[r.spec.key])

    print()
    print(
        f"trioworker submit benchmark: N={args.runs:,} D={args.delays:,} R={args.round_trips:,} "
        f"limit={args.limit} prefetch={args.prefetch} "
        f"worker={'after the submission' if args.submit_alone else 'subscribed first'} "
        f"repeat={args.repeat} cpus={os.cpu_count()} ({elapsed:.0f} s in all)"
    )
    print(render_table(rows, args.repeat))
    if bench.phase_info:

        def peak(name: str) -> str:
            return fmt_number(max(float(p[name]) for p in bench.phase_info), 1)

        print(
            f"peak RSS MB: submitter {peak('client_peak_rss_mb')}, server {peak('server_peak_rss_mb')}, "
            f"worker {peak('worker_peak_rss_mb')}"
        )
    stages = roundtrip_stages(bench.rows.get("c_roundtrip"))
    if stages:
        print("c) round trip, median ms per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    print_sections([("failed checks", bench.checks), ("log issues", bench.issues)], error)
    save_results(
        "bench_submit",
        args,
        elapsed,
        {
            "task_key": NOOP_KEY,
            "rows": [r.to_json() for r in rows],
            "phases": bench.phase_info,
            "failed_checks": bench.checks,
            "log_issues": bench.issues,
            "error": error,
        },
    )
    failed = error is not None or bench.checks or any(r.verdict == "FAIL" for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
