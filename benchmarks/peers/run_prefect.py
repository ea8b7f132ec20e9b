"""The peer workloads on Prefect 3 background tasks (issue 5).

Run inside a virtualenv with ``prefect>=3,<4`` installed (``nox -s bench_peers_prefect``)::

    python benchmarks/peers/run_prefect.py [--quick] [--output FILE] [--time-limit S]

Settings (the best reasonable ones we found; see README.md beside this file):

- server: ``prefect server start --host 127.0.0.1 --port <free>`` (one process, uvicorn,
  SQLite through aiosqlite) with its own ``PREFECT_HOME`` in a temporary directory, started
  once for the whole run; the UI, analytics and the flow-run services that task runs do not
  use (scheduler, late runs, foreman, pause expirations, cancellation cleanup) are off;
  the server logs at WARNING;
- task worker: one process, ``prefect.task_worker.serve(noop, sleep50, limit=L)``, a fresh
  one per phase; sync tasks run in its ThreadPoolExecutor of L threads;
- client and worker: ``PREFECT_LOGGING_LEVEL=WARNING``, ``PREFECT_LOGGING_TO_API_ENABLED=false``,
  ``PREFECT_RESULTS_PERSIST_BY_DEFAULT=true`` (results on the local file system of
  ``PREFECT_HOME``, needed for ``.result()``; parameters of background runs travel the same way);
- submitting: ``noop.delay(i)``, and ``noop.map(range(N), deferred=True)`` for a batch (one
  request per run: Prefect has no batch creation of background task runs); awaiting:
  ``prefect.futures.wait(futures)`` (the events websocket) and ``future.result()``;
- drain/sleep/scale: runs queued with ``.delay()`` before the worker starts; timed from the
  worker's registration (``POST /api/task_workers/filter`` lists it) or the first run's
  ``start_time``, if earlier, to the last ``end_time``;
- steady: ``.delay(i)`` started every 1/rate s from a thread pool; latency of a run =
  ``end_time - created`` (the task run's fields);
- smaller counts than the other systems (Prefect runs ~5 submissions/s and ~10 runs/s
  here): see ``PREFECT_FULL`` / ``PREFECT_QUICK``; the 100,000-run scale phase is skipped.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    Child,
    PhaseSkipped,
    Processes,
    Report,
    exit_on_sigterm,
    free_port,
    latency_summary,
    log,
    parse_args,
    rate,
)

# Prefect is ~1,000 times slower than the others at these workloads, so it gets fewer runs.
PREFECT_FULL: dict[str, int] = {
    "drain": 100,
    "e2e": 100,
    "roundtrip": 50,
    "steady_rate": 2,
    "steady_seconds": 15,
    "sleep10": 100,
    "sleep100": 200,
    "scale_small": 1_000,
    "scale_drain_small": 200,
}
PREFECT_QUICK: dict[str, int] = {
    "drain": 20,
    "e2e": 20,
    "roundtrip": 10,
    "steady_rate": 2,
    "steady_seconds": 5,
    "sleep10": 20,
    "sleep100": 40,
    "scale_small": 100,
    "scale_drain_small": 50,
}
SCALE_LARGE_SKIPPED = (
    "not run: queueing 100,000 runs through .delay() (one HTTP request and one parameters file "
    "per run, ~5 runs/s here) would take ~5 hours, and the server keeps scheduled background "
    "runs in an in-memory queue per task key (prefect.server.task_queue.TaskQueue)"
)
STARTUP_TIMEOUT = 90.0
WORKER_TIMEOUT = 60.0

SETTINGS = [
    "server: `prefect server start --host 127.0.0.1` (uvicorn, SQLite/aiosqlite), own PREFECT_HOME in a "
    "temp dir, one server for the whole run; UI, analytics and the flow-run services (scheduler, late "
    "runs, foreman, pause expirations, cancellation cleanup) off; server log level WARNING",
    "worker: one process, `prefect.task_worker.serve(noop, sleep50, limit=L)`, fresh per phase; "
    "sync tasks in its thread pool of L threads",
    "client+worker: PREFECT_LOGGING_LEVEL=WARNING, PREFECT_LOGGING_TO_API_ENABLED=false, "
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT=true (results/parameters on the local file system)",
    "submit: `noop.delay(i)`; batch: `noop.map(range(N), deferred=True)` (one request per run); "
    "await: `prefect.futures.wait(futures)` then `.result()`",
    "drain/sleep/scale: queued with .delay() before the worker starts; timed from the worker's "
    "registration (or first start_time) to the last end_time",
    "steady: `.delay(i)` every 1/rate s from a thread pool; latency = end_time - created",
]


def prefect_env(home: Path, port: int) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p),
    }


class Bench:
    def __init__(self, workdir: Path, procs: Processes, api: str, server: Child) -> None:
        import httpx  # Prefect's own dependency
        import prefect_tasks
        from prefect.client.orchestration import get_client  # type: ignore[import-not-found,unused-ignore]

        self.workdir = workdir
        self.procs = procs
        self.api = api
        self.server = server
        self.http = httpx.Client(base_url=api, timeout=30.0)
        self.get_client = get_client
        self.tasks = prefect_tasks
        self.hostname = socket.gethostname()

    @contextmanager
    def worker(self, limit: int) -> Iterator[tuple[Child, float]]:
        """A subscribed task worker, and the wall-clock time the server first listed it."""
        cmd = [
            sys.executable,
            "-c",
            "import sys, prefect_tasks; sys.exit(prefect_tasks.main(sys.argv[1:]))",
            str(limit),
        ]
        with self.procs.running("prefect-worker", cmd, os.environ, stop_timeout=30.0) as child:
            identifier = f"{self.hostname}-{child.pid}"
            deadline = time.monotonic() + WORKER_TIMEOUT
            while True:
                response = self.http.post("/task_workers/filter", json={})
                response.raise_for_status()
                if any(w["identifier"] == identifier for w in response.json()):
                    ready = time.time()
                    break
                if not child.alive():
                    raise RuntimeError(f"the task worker exited before subscribing:\n{child.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the task worker did not subscribe in {WORKER_TIMEOUT:g} s")
                time.sleep(0.01)
            yield child, ready

    def read_runs(self, futures: list[Any]) -> list[Any]:
        """The task runs of these futures, read from the server."""
        runs = []
        with self.get_client(sync_client=True) as client:
            for future in futures:
                runs.append(client.read_task_run(future.task_run_id))
        return runs

    def wait(self, futures: list[Any], timeout: float) -> None:
        from prefect.futures import wait  # type: ignore[import-not-found,unused-ignore]

        _done, not_done = wait(futures, timeout=timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} of {len(futures)} runs not done after {timeout:g} s")

    def check(self, futures: list[Any], expected: list[int]) -> None:
        results = [f.result(timeout=30) for f in futures]
        if results != expected:
            raise RuntimeError("the results are not the submitted arguments")

    # ------------------------------------------------------------------ phases

    def drain(self, task: Any, n: int, limit: int, drained: int | None = None) -> dict[str, Any]:
        k = n if drained is None else drained
        t0 = time.perf_counter()
        futures = [task.delay(i) for i in range(n)]
        fill_seconds = time.perf_counter() - t0
        with self.worker(limit) as (worker, ready):
            self.wait(futures[:k], timeout=max(120.0, k * 2.0))
            worker_rss = worker.sample_peak()
            # Read the results while the worker runs: Prefect sets COMPLETED before it writes
            # the result file (at its transaction's commit), so a worker stopped with runs in
            # flight can leave an empty result file behind a COMPLETED run.
            self.check(futures[:k], list(range(k)))
        runs = self.read_runs(futures[:k])
        starts = [r.start_time.timestamp() for r in runs if r.start_time is not None]
        ends = [r.end_time.timestamp() for r in runs if r.end_time is not None]
        if len(ends) != k:
            raise RuntimeError(f"{k - len(ends)} runs have no end_time")
        begin = min(ready, min(starts))
        seconds = max(ends) - begin
        return {
            "runs": k,
            "queued": n,
            "limit": limit,
            "seconds": seconds,
            "rate": rate(k, seconds),
            "fill_rate": rate(n, fill_seconds),
            "worker_rss_mb": worker_rss,
            "server_rss_mb": self.server.sample_peak(),
        }

    def e2e(self, n: int, limit: int) -> dict[str, Any]:
        with self.worker(limit) as (worker, _):
            t0 = time.perf_counter()
            futures = list(self.tasks.noop.map(range(n), deferred=True))
            t1 = time.perf_counter()
            self.wait(futures, timeout=max(120.0, n * 2.0))
            t2 = time.perf_counter()
            worker_rss = worker.sample_peak()
            self.check(futures, list(range(n)))
        return {
            "runs": n,
            "limit": limit,
            "seconds": t2 - t0,
            "rate": rate(n, t2 - t0),
            "submit_rate": rate(n, t1 - t0),
            "worker_rss_mb": worker_rss,
            "server_rss_mb": self.server.sample_peak(),
        }

    def roundtrip(self, n: int, limit: int) -> dict[str, Any]:
        latencies = []
        with self.worker(limit) as (worker, _):
            for i in range(n):
                t0 = time.perf_counter()
                value = self.tasks.noop.delay(i).result(timeout=60)
                latencies.append(time.perf_counter() - t0)
                if value != i:
                    raise RuntimeError(f"run {i} returned {value!r}")
            worker_rss = worker.sample_peak()
        return {
            "runs": n,
            "limit": limit,
            **latency_summary(latencies),
            "worker_rss_mb": worker_rss,
            "server_rss_mb": self.server.sample_peak(),
        }

    def steady(self, per_second: int, seconds: int, limit: int) -> dict[str, Any]:
        n = per_second * seconds
        late = 0
        with self.worker(limit) as (worker, _), ThreadPoolExecutor(max_workers=8) as pool:
            pending = []
            start = time.monotonic() + 0.05
            for i in range(n):
                due = start + i / per_second
                delay = due - time.monotonic()
                if delay < -0.005:
                    late += 1
                if delay > 0:
                    time.sleep(delay)
                pending.append(pool.submit(self.tasks.noop.delay, i))
            submitted = time.monotonic() - start
            futures = [p.result() for p in pending]
            self.wait(futures, timeout=120.0)
            worker_rss = worker.sample_peak()
        runs = self.read_runs(futures)
        latencies = [r.end_time.timestamp() - r.created.timestamp() for r in runs]
        return {
            "runs": n,
            "limit": limit,
            "target_rate": per_second,
            "achieved_rate": rate(n, submitted),
            "late_submissions": late,
            **latency_summary(latencies),
            "worker_rss_mb": worker_rss,
            "server_rss_mb": self.server.sample_peak(),
        }


@contextmanager
def prefect_server(procs: Processes, home: Path) -> Iterator[tuple[Child, str, float]]:
    import httpx

    port = free_port()
    os.environ.update(prefect_env(home, port))
    api = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    t0 = time.perf_counter()
    with procs.running("prefect-server", cmd, os.environ, stop_timeout=30.0) as child:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with httpx.Client(timeout=2.0) as client:
            while True:
                try:
                    if client.get(f"{api}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if not child.alive():
                    raise RuntimeError(f"the Prefect server exited while starting:\n{child.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the Prefect server did not answer in {STARTUP_TIMEOUT:g} s")
                time.sleep(0.1)
        yield child, api, time.perf_counter() - t0


def main() -> int:
    exit_on_sigterm()
    args = parse_args("prefect")
    sizes = PREFECT_QUICK if args.quick else PREFECT_FULL
    report = Report("prefect", args.output, args.quick, sizes, args.time_limit)
    report.data["version"] = metadata.version("prefect")
    report.data["settings"] = SETTINGS
    report.data["notes"].append(
        "fewer runs than the other systems (Prefect runs ~5 submissions/s and ~10 runs/s here); "
        "steady load at 2 runs/s, not 100/s (beyond what Prefect's .delay() sustains here)"
    )
    status = "failed"
    with tempfile.TemporaryDirectory(prefix="peers-prefect-") as tmp:
        workdir = Path(tmp)
        home = workdir / "home"
        home.mkdir()
        procs = Processes(workdir)
        report.procs = procs
        try:
            with prefect_server(procs, home) as (server, api, startup):
                report.data["server_startup_seconds"] = startup
                log(f"[prefect] server up in {startup:.1f} s at {api}")
                bench = Bench(workdir, procs, api, server)
                noop, sleep50 = bench.tasks.noop, bench.tasks.sleep50
                s = sizes

                def skip_large() -> dict[str, Any]:
                    raise PhaseSkipped(SCALE_LARGE_SKIPPED)

                plan: dict[str, Callable[[], dict[str, Any]]] = {
                    "drain10": lambda: bench.drain(noop, s["drain"], 10),
                    "drain100": lambda: bench.drain(noop, s["drain"], 100),
                    "e2e": lambda: bench.e2e(s["e2e"], 100),
                    "roundtrip": lambda: bench.roundtrip(s["roundtrip"], 100),
                    "steady": lambda: bench.steady(s["steady_rate"], s["steady_seconds"], 100),
                    "sleep10": lambda: bench.drain(sleep50, s["sleep10"], 10),
                    "sleep100": lambda: bench.drain(sleep50, s["sleep100"], 100),
                    "scale_small": lambda: bench.drain(
                        noop, s["scale_small"], 100, drained=s["scale_drain_small"]
                    ),
                    "scale_large": skip_large,
                }
                # the time each phase needs at least, at ~5 submissions/s and ~10 runs/s
                needs = {"scale_small": s["scale_small"] / 5 + s["scale_drain_small"] / 8 + 20}
                for name, fn in plan.items():
                    if name in args.phases:
                        report.phase(name, fn, needs=needs.get(name, 30.0))
                report.data["server_peak_rss_mb"] = server.sample_peak()
                bench.http.close()
            status = "done"
        except BaseException as exc:  # server start failure, SIGTERM (time limit), Ctrl-C
            report.data["errors"]["(run)"] = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, Exception):
                raise
        finally:
            procs.stop_all()
            report.data["log_issues"] = procs.issues
            report.finish(status)
    log(f"results written to {args.output}")
    return 0 if not report.data["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
