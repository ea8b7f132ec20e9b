"""The peer workloads on trioworker (issue 5): one server process, one worker process.

Run inside a virtualenv with trioworker installed (``nox -s bench_peers_trioworker``, and
``nox -s bench_peers_trioworker_postgres`` for the PostgreSQL store)::

    python benchmarks/peers/run_trioworker.py [--quick] [--output FILE] [--time-limit S]
        [--phases P,...] [--postgres-url postgresql://USER@HOST:PORT/DB]

Settings: ``trioworker server`` (SQLite in WAL mode, a fresh file per phase, on a free
loopback port; with ``--postgres-url``, ``--db postgresql://...`` on a fresh database per
phase, made with ``CREATE DATABASE`` on that server and dropped after the phase, results in
``benchmarks/results/peers-trioworker-postgres.json``) and one worker process
``benchmarks/worker_tasks.py API_URL LIMIT``, that is
``serve(noop, sleep50, limit=LIMIT)``; ``noop`` is an async task returning its argument,
``sleep50`` a sync task sleeping 50 ms in a worker thread. A fresh server and worker per phase.

- drain10/drain100, sleep10/sleep100, scale_*: runs are queued with
  ``POST /api/task_runs/batch`` (500 per request) before the worker starts; the time runs
  from the worker's subscription (or the first delivery, if earlier) to the last COMPLETED
  state's timestamp (server clock);
- e2e: ``await noop.map(range(N))`` then ``await trioworker.wait_all(futures)`` inside
  ``trioworker.connect()``, timed by this process from before the map to the return of wait_all;
- roundtrip: ``f = await noop.delay(i); await f.result()`` one after the other, client timing;
- steady: ``noop.delay(i)`` started every 1/rate s (each in its own Trio task); latency of a
  run = its COMPLETED state's ``timestamp`` - its ``created`` (both server clock);
- scale: M runs queued, then the first K drained (the worker at limit 100).

Peak RSS is VmHWM of the server and the worker process, read just before each is stopped
(PostgreSQL's own processes are not in it). With PostgreSQL, each phase also records
``postgres_cpu_percent``: the CPU its whole cluster used (this benchmark's connections and
anyone else's), when the server runs on this machine and ``/proc`` shows it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

HERE = Path(__file__).resolve().parent
BENCHMARKS = HERE.parent
PROJECT = BENCHMARKS.parent
for _path in (str(HERE), str(BENCHMARKS), str(PROJECT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import httpx  # noqa: E402
import trio  # noqa: E402
from _common import (  # noqa: E402
    FULL,
    QUICK,
    Child,
    Processes,
    Report,
    exit_on_sigterm,
    free_port,
    head_rate,
    latency_summary,
    log,
    parse_args,
    rate,
    tree_cpu_seconds,
)
from bench_server import JSON_HEADERS, git_commit  # noqa: E402
from bench_worker import first_delivery_time, parse_time, submit, wait_ended  # noqa: E402
from worker_tasks import NOOP_KEY, SLEEP50_KEY, noop  # noqa: E402

import trioworker  # noqa: E402

WORKER_SCRIPT = BENCHMARKS / "worker_tasks.py"
STARTUP_TIMEOUT = 20.0
BATCH = 500
WAIT_CHUNK = 1000

SQLITE_SERVER = "server: `trioworker server` on 127.0.0.1, SQLite (WAL, group commit), a fresh file per phase"
POSTGRES_SERVER = (
    "server: `trioworker server --db postgresql://...` on 127.0.0.1, PostgreSQL {version} at {where}, "
    "a fresh database per phase (CREATE DATABASE, dropped after it); server RSS without PostgreSQL's"
)
SETTINGS = [
    "worker: one process, `serve(noop, sleep50, limit=L)` (benchmarks/worker_tasks.py); "
    "sync sleep50 runs in threads (as wide as the limit)",
    "drain/sleep/scale: queued with POST /api/task_runs/batch (500 per request) before the worker "
    "starts; timed from the subscription (or first delivery) to the last COMPLETED timestamp",
    "e2e: `await noop.map(range(N))` + `await trioworker.wait_all(futures)` in one `connect()`",
    "round trip: `await (await noop.delay(i)).result()` in one `connect()`",
    "steady: `noop.delay(i)` every 1/rate s; latency = COMPLETED timestamp - created (server clock)",
]


class Bench:
    def __init__(self, workdir: Path, procs: Processes, timeout: float, postgres_url: str | None) -> None:
        self.workdir = workdir
        self.procs = procs
        self.timeout = timeout
        self.postgres_url = postgres_url  # a server's URL: a fresh database on it per phase

    @contextmanager
    def database(self, label: str) -> Iterator[str]:
        """What ``--db`` gets for one phase: a fresh SQLite file, or a fresh PostgreSQL database."""
        if self.postgres_url is None:
            yield str(self.workdir / f"{label}.db")
            return
        name = f"trioworker_peers_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        with postgres_admin(self.postgres_url) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urllib.parse.urlsplit(self.postgres_url)._replace(path=f"/{name}").geturl()
        finally:
            with postgres_admin(self.postgres_url) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # ------------------------------------------------------------------ processes

    @contextmanager
    def server(self, label: str) -> Iterator[tuple[Child, str]]:
        with self.database(label) as db, self._server(db) as started:
            yield started

    @contextmanager
    def _server(self, db: str) -> Iterator[tuple[Child, str]]:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "trioworker",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--db",
            db,
        ]
        api = f"http://127.0.0.1:{port}/api"
        with self.procs.running("trioworker-server", cmd, self._env()) as child:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            with httpx.Client(timeout=2.0) as client:
                while True:
                    if not child.alive():
                        raise RuntimeError(f"the server exited while starting:\n{child.log_tail()}")
                    try:
                        if client.get(f"{api}/health").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError("the server did not answer /api/health")
                    time.sleep(0.05)
            yield child, api

    @contextmanager
    def worker(self, api: str, limit: int, client: httpx.Client) -> Iterator[tuple[Child, float]]:
        """A subscribed worker, and the wall-clock time its subscription showed in /api/health."""
        cmd = [sys.executable, str(WORKER_SCRIPT), api, str(limit)]
        with self.procs.running("trioworker-worker", cmd, self._env(), stop_timeout=45.0) as child:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while True:
                if client.get("/health").json()["subscriptions"] >= 1:
                    subscribed = time.time()
                    break
                if not child.alive():
                    raise RuntimeError(f"the worker exited before subscribing:\n{child.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError("the worker did not subscribe")
                time.sleep(0.002)
            yield child, subscribed

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT), env.get("PYTHONPATH")) if p)
        return env

    def client(self, api: str) -> httpx.Client:
        return httpx.Client(base_url=api, timeout=self.timeout + 30, headers=JSON_HEADERS)

    # ------------------------------------------------------------------ phases

    def drain(
        self, key: str, n: int, limit: int, drained: int | None = None, head: int | None = None
    ) -> dict[str, Any]:
        """Queue n runs, start a worker, time the first ``drained`` (default all) to completion.

        ``head``: also the rate of the first ``head`` runs (to compare with a smaller queue).
        """
        k = n if drained is None else drained
        with self.server(f"drain-{key}-{n}-{limit}") as (server, api), self.client(api) as client:
            t0 = time.perf_counter()
            _, _, ids = submit(client, key, n, BATCH)
            fill_seconds = time.perf_counter() - t0
            with self.worker(api, limit, client) as (worker, subscribed):
                runs = wait_ended(client, ids[:k], WAIT_CHUNK, self.timeout)
                first = first_delivery_time(client, ids[0])
                worker_rss = worker.sample_peak()
            server_rss = server.sample_peak()
        begin = min(subscribed, first) if not math.isnan(first) else subscribed
        by_id = {run["id"]: run for run in runs}
        completions, bad = completed_times([by_id[run_id] for run_id in ids[:k]])
        if bad:
            raise RuntimeError(f"{bad} of {len(runs)} runs did not complete with their own result")
        seconds = max(completions) - begin
        extra = {} if head is None else {"head_runs": head, "head_rate": head_rate(completions, begin, head)}
        return {
            **extra,
            "runs": k,
            "queued": n,
            "limit": limit,
            "seconds": seconds,
            "rate": rate(k, seconds),
            "fill_rate": rate(n, fill_seconds),
            "worker_rss_mb": worker_rss,
            "server_rss_mb": server_rss,
        }

    def e2e(self, n: int, limit: int) -> dict[str, Any]:
        with self.server("e2e") as (server, api), self.client(api) as client:
            with self.worker(api, limit, client) as (worker, _):

                async def main() -> tuple[float, float]:
                    async with trioworker.connect(api_url=api):
                        t0 = time.perf_counter()
                        futures = await noop.map(range(n))
                        t1 = time.perf_counter()
                        await trioworker.wait_all(futures, timeout=self.timeout)
                        t2 = time.perf_counter()
                        results = [await f.result() for f in futures]
                    if results != list(range(n)):
                        raise RuntimeError("the results are not range(n)")
                    return t1 - t0, t2 - t0

                submit_seconds, seconds = trio.run(main)
                worker_rss = worker.sample_peak()
            server_rss = server.sample_peak()
        return {
            "runs": n,
            "limit": limit,
            "seconds": seconds,
            "rate": rate(n, seconds),
            "submit_rate": rate(n, submit_seconds),
            "worker_rss_mb": worker_rss,
            "server_rss_mb": server_rss,
        }

    def roundtrip(self, n: int, limit: int) -> dict[str, Any]:
        with self.server("roundtrip") as (server, api), self.client(api) as client:
            with self.worker(api, limit, client) as (worker, _):

                async def main() -> list[float]:
                    latencies: list[float] = []
                    async with trioworker.connect(api_url=api):
                        for i in range(n):
                            t0 = time.perf_counter()
                            future = await noop.delay(i)
                            value = await future.result(timeout=30)
                            latencies.append(time.perf_counter() - t0)
                            if value != i:
                                raise RuntimeError(f"run {i} returned {value!r}")
                    return latencies

                latencies = trio.run(main)
                worker_rss = worker.sample_peak()
            server_rss = server.sample_peak()
        return {
            "runs": n,
            "limit": limit,
            **latency_summary(latencies),
            "worker_rss_mb": worker_rss,
            "server_rss_mb": server_rss,
        }

    def steady(self, per_second: int, seconds: int, limit: int) -> dict[str, Any]:
        n = per_second * seconds
        with self.server("steady") as (server, api), self.client(api) as client:
            with self.worker(api, limit, client) as (worker, _):

                async def main() -> tuple[list[str], float, int]:
                    ids: list[str] = [""] * n
                    late = 0
                    async with trioworker.connect(api_url=api), trio.open_nursery() as nursery:

                        async def one(i: int) -> None:
                            future = await noop.delay(i)
                            ids[i] = str(future.task_run_id)

                        start = trio.current_time() + 0.05
                        for i in range(n):
                            due = start + i / per_second
                            if trio.current_time() > due + 0.005:
                                late += 1
                            await trio.sleep_until(due)
                            nursery.start_soon(one, i)
                        submitted = trio.current_time() - start
                    return ids, submitted, late

                ids, submit_span, late = trio.run(main)
                runs = wait_ended(client, ids, WAIT_CHUNK, self.timeout)
                worker_rss = worker.sample_peak()
            server_rss = server.sample_peak()
        latencies = []
        for run in runs:
            state = run["state"]
            if state["type"] != "COMPLETED":
                raise RuntimeError(f"a run ended {state['type']}")
            latencies.append(parse_time(state["timestamp"]) - parse_time(run["created"]))
        return {
            "runs": n,
            "limit": limit,
            "target_rate": per_second,
            "achieved_rate": rate(n, submit_span),
            "late_submissions": late,
            **latency_summary(latencies),
            "worker_rss_mb": worker_rss,
            "server_rss_mb": server_rss,
        }


def completed_times(runs: list[dict[str, Any]]) -> tuple[list[float], int]:
    """The COMPLETED timestamps, and how many runs did not complete with their parameter i."""
    times: list[float] = []
    bad = 0
    for run in runs:
        state = run["state"]
        if state["type"] != "COMPLETED" or state.get("data") != run["parameters"]["i"]:
            bad += 1
            continue
        times.append(parse_time(state["timestamp"]))
    return times, bad


@contextmanager
def postgres_admin(server_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the PostgreSQL server (psycopg.Error when it cannot connect)."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True, connect_timeout=10) as connection:
        yield connection


def postgres_cluster(server_url: str) -> tuple[str, Callable[[], float] | None]:
    """The server's version, and a meter of its cluster's CPU seconds (None: not on this machine).

    The cluster is the parent of this connection's backend (the postmaster) with its children,
    reaped ones included; it is looked up in ``/proc`` and taken only if both are ``postgres``.
    """
    with postgres_admin(server_url) as admin:
        row = admin.execute("SELECT current_setting('server_version'), pg_backend_pid()").fetchone()
        if row is None:
            raise RuntimeError("PostgreSQL answered no row to SELECT")
        version, backend = row
        try:
            postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
            names = [Path(f"/proc/{pid}/comm").read_text().strip() for pid in (backend, postmaster)]
        except (OSError, ValueError, IndexError):
            return str(version), None
    if not all(name.startswith("postgres") for name in names):
        return str(version), None  # a server elsewhere, whose pid happens to be in use here
    return str(version), lambda: tree_cpu_seconds(postmaster)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--postgres-url",
        default=None,
        help="run every phase on PostgreSQL: a fresh database per phase on this server "
        "(postgresql://USER[:PASSWORD]@HOST:PORT/DB; the user may CREATE DATABASE), not SQLite",
    )


def main() -> int:
    exit_on_sigterm()
    args = parse_args(
        "trioworker",
        configure=add_options,
        system_of=lambda a: "trioworker" if a.postgres_url is None else "trioworker-postgres",
    )
    system = "trioworker" if args.postgres_url is None else "trioworker-postgres"
    sizes = QUICK if args.quick else FULL
    report = Report(system, args.output, args.quick, sizes, args.time_limit)
    report.data["version"] = metadata.version("trioworker")
    report.data["git_commit"] = git_commit()  # the work tree may hold changes beyond it
    report.data["store"] = "sqlite" if args.postgres_url is None else "postgresql"
    report.data["settings"] = [SQLITE_SERVER, *SETTINGS]
    status = "failed"
    if args.postgres_url is not None:
        parts = urllib.parse.urlsplit(args.postgres_url)
        where = f"{parts.hostname}:{parts.port or 5432}"
        try:
            version, meter = postgres_cluster(args.postgres_url)
        except Exception as exc:  # psycopg.Error, or a malformed URL
            report.data["errors"]["(run)"] = f"cannot use PostgreSQL at {where}: {type(exc).__name__}: {exc}"
            report.finish(status)
            log(f"[{system}] {report.data['errors']['(run)']}")
            return 1
        report.data["postgres_version"] = version
        report.data["settings"][0] = POSTGRES_SERVER.format(version=version, where=where)
        if meter is not None:
            report.cpu_meters["postgres"] = meter
        else:
            report.data["notes"].append(f"PostgreSQL at {where} is not on this machine: its CPU is not shown")
    with tempfile.TemporaryDirectory(prefix=f"peers-{system}-") as tmp:
        procs = Processes(Path(tmp))
        report.procs = procs
        bench = Bench(Path(tmp), procs, timeout=120.0, postgres_url=args.postgres_url)
        s = sizes
        plan: dict[str, Any] = {
            "drain10": lambda: bench.drain(NOOP_KEY, s["drain"], 10),
            "drain100": lambda: bench.drain(NOOP_KEY, s["drain"], 100),
            "e2e": lambda: bench.e2e(s["e2e"], 100),
            "roundtrip": lambda: bench.roundtrip(s["roundtrip"], 100),
            "steady": lambda: bench.steady(s["steady_rate"], s["steady_seconds"], 100),
            "sleep10": lambda: bench.drain(SLEEP50_KEY, s["sleep10"], 10),
            "sleep100": lambda: bench.drain(SLEEP50_KEY, s["sleep100"], 100),
            "scale_small": lambda: bench.drain(NOOP_KEY, s["scale_small"], 100),
            "scale_large": lambda: bench.drain(
                NOOP_KEY, s["scale_large"], 100, drained=s["scale_drain"], head=s["scale_small"]
            ),
        }
        try:
            for name, fn in plan.items():
                if name in args.phases:
                    report.phase(name, fn)
            status = "done"
        except BaseException as exc:  # SIGTERM (time limit), Ctrl-C
            report.data["errors"]["(run)"] = f"interrupted: {type(exc).__name__} {exc}"
            raise
        finally:
            procs.stop_all()
            report.data["log_issues"] = procs.issues
            report.finish(status)
    log(f"results written to {args.output}")
    return 0 if not report.data["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
