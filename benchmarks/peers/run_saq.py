"""The peer workloads on SAQ (Simple Async Queue) with Redis (issue 5).

Run inside a virtualenv with ``saq[redis]`` (and hiredis) installed and Debian's
``redis-server`` on PATH (``nox -s bench_peers_saq`` installs both)::

    python benchmarks/peers/run_saq.py [--quick] [--output FILE] [--time-limit S]

Settings (the best reasonable ones we found; see README.md beside this file):

- Redis: ``redis-server --bind 127.0.0.1 --port <free> --save "" --appendonly no``, a fresh
  server per phase: in memory only, no snapshots, no AOF (so nothing is fsynced: SAQ's
  queue is not durable here, trioworker's SQLite queue is);
- one worker process: ``saq.Worker(queue, [noop, sleep50], concurrency=L)`` with
  ``worker.pool = ThreadPoolExecutor(max_workers=L)``: SAQ runs sync functions in its own
  pool, whose default size on this 2-core machine is min(32, cpus + 4) = 6 threads, which
  would cap 50 ms sleeps at 120/s whatever the concurrency; the SAQ and hiredis loggers at
  WARNING; job defaults otherwise (timeout 10 s, results kept, ttl 600 s);
- submitting: ``queue.enqueue`` gathered 1,000 at a time (what ``Queue.map`` does, without
  its 0.5 s polling), the queue's default 20 concurrent operations;
- waiting: one ``PSUBSCRIBE`` on SAQ's job channel pattern (``saq:job:<queue>:*``), the
  notifications SAQ's own ``Job.refresh(until_complete=...)`` listens to, subscribed before
  the first enqueue so none is missed (``Queue.apply``/``Queue.map`` poll every 0.5 s by
  default, which would measure the poll interval, not SAQ);
- drain/sleep/scale: jobs queued before the worker starts; timed from the worker's startup
  hook (or the first ``started``, if earlier) to the last ``completed`` (job timestamps, ms);
- steady: one ``enqueue`` started every 1/rate s; latency = ``completed - queued`` (job
  timestamps, 1 ms resolution, both this machine's clock);
- peak RSS: VmHWM of the worker process and of ``redis-server`` (the "server").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    FULL,
    QUICK,
    SLEEP_SECONDS,
    Child,
    Processes,
    Report,
    exit_on_sigterm,
    free_port,
    latency_summary,
    log,
    parse_args,
    rate,
    wait_port,
)
from saq import Job, Queue, Worker  # type: ignore[import-not-found,unused-ignore]  # noqa: E402

TERMINAL = {"complete", "failed", "aborted", "aborting"}  # aborting: swept, never completes
SETTINGS = [
    "redis: `redis-server --bind 127.0.0.1 --save '' --appendonly no`, a fresh one per phase "
    "(in memory only: nothing fsynced)",
    "worker: one process, `saq.Worker(queue, [noop, sleep50], concurrency=L)` with its sync-function "
    "pool widened to L threads (default 6 here); loggers at WARNING; job defaults (timeout 10 s)",
    "submit: `queue.enqueue` gathered 1,000 at a time (as Queue.map does), 20 concurrent operations",
    "await: PSUBSCRIBE on SAQ's job channels (what Job.refresh(until_complete) listens to), "
    "subscribed before the first enqueue; not Queue.apply/map (they poll every 0.5 s)",
    "drain/sleep/scale: queued before the worker starts; timed from the worker's startup hook "
    "(or first `started`) to the last `completed`",
    "steady: `queue.enqueue` every 1/rate s; latency = completed - queued (job timestamps, 1 ms)",
]
ENQUEUE_CHUNK = 1000
STARTUP_TIMEOUT = 20.0


# --------------------------------------------------------------------------- the worker process


async def noop(ctx: dict[str, Any], *, i: int) -> int:
    return i


def sleep50(ctx: dict[str, Any], *, i: int) -> int:
    time.sleep(SLEEP_SECONDS)
    return i


async def worker_main(url: str, concurrency: int, ready_file: Path) -> None:
    queue = Queue.from_url(url)
    await queue.connect()

    async def startup(ctx: dict[str, Any]) -> None:
        # a few bytes to a local file: not worth a thread
        ready_file.write_text(repr(time.time()))  # noqa: ASYNC240

    worker = Worker(queue, functions=[noop, sleep50], concurrency=concurrency, startup=startup)
    worker.pool = ThreadPoolExecutor(max_workers=concurrency)  # see the module docstring
    try:
        await worker.start()
    finally:
        await queue.disconnect()


def worker_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(worker_main(args.redis_url, args.concurrency, args.ready_file))
    return 0


# --------------------------------------------------------------------------- waiting for jobs


class Notifications:
    """Job status notifications from SAQ's channel pattern, subscribed once before any enqueue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.prefix = queue.job_id("")
        self.waiters: dict[str, asyncio.Future[str]] = {}
        self.pubsub: Any = None
        self.reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Notifications:
        self.pubsub = self.queue.redis.pubsub()
        await self.pubsub.psubscribe(f"{self.prefix}*")
        # the subscription is live once redis confirmed it
        while True:
            message = await self.pubsub.get_message(timeout=5.0)
            if message is None:
                raise TimeoutError("redis did not confirm PSUBSCRIBE")
            if message["type"] == "psubscribe":
                break
        self.reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with suppress(asyncio.CancelledError):
                await self.reader
        await self.pubsub.punsubscribe()
        await self.pubsub.aclose()

    async def _read(self) -> None:
        while True:
            message = await self.pubsub.get_message(timeout=None)
            if not message or message["type"] != "pmessage":
                continue
            status = message["data"].decode()
            if status not in TERMINAL:
                continue
            key = message["channel"].decode()[len(self.prefix) :]
            waiter = self.waiters.pop(key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(status)

    def expect(self, key: str) -> asyncio.Future[str]:
        """Call before enqueuing ``key``: the future gets its terminal status."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waiters[key] = future
        return future


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, workdir: Path, procs: Processes, redis_server: str, timeout: float) -> None:
        self.workdir = workdir
        self.procs = procs
        self.redis_server = redis_server
        self.timeout = timeout
        self.counter = 0

    @contextmanager
    def redis(self) -> Iterator[tuple[Child, str]]:
        port = free_port()
        self.counter += 1
        data = self.workdir / f"redis-{self.counter}"
        data.mkdir()
        cmd = [
            self.redis_server,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data),
            "--loglevel",
            "warning",
        ]
        with self.procs.running("redis-server", cmd) as child:
            wait_port(port, STARTUP_TIMEOUT, child.alive)
            yield child, f"redis://127.0.0.1:{port}/0"

    @contextmanager
    def worker(self, url: str, concurrency: int, settle: float = 0.0) -> Iterator[tuple[Child, float]]:
        """A started worker, and the wall-clock time its startup hook ran.

        ``settle``: seconds to wait after that, so that the sweep SAQ's worker runs right after
        its startup hooks is over before anything is submitted (see ``lost_note``).
        """
        self.counter += 1
        ready = self.workdir / f"ready-{self.counter}"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "worker",
            "--redis-url",
            url,
            "--concurrency",
            str(concurrency),
            "--ready-file",
            str(ready),
        ]
        with self.procs.running("saq-worker", cmd, stop_timeout=30.0) as child:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while not ready.exists() or not ready.read_text():
                if not child.alive():
                    raise RuntimeError(f"the SAQ worker exited while starting:\n{child.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError("the SAQ worker did not start")
                time.sleep(0.002)
            ready_time = float(ready.read_text())
            time.sleep(settle)
            yield child, ready_time

    # ------------------------------------------------------------------ phases

    def drain(
        self, function: str, n: int, concurrency: int, drained: int | None = None, head: int | None = None
    ) -> dict[str, Any]:
        k = n if drained is None else drained
        with self.redis() as (redis, url):
            queue = Queue.from_url(url)
            t0 = time.perf_counter()
            keys = asyncio.run(self._enqueue_all(queue, function, n))
            fill_seconds = time.perf_counter() - t0
            with self.worker(url, concurrency) as (worker, ready):
                jobs = asyncio.run(self._wait_drained(queue, keys[:k]))
                worker_rss = worker.sample_peak()
            redis_rss = redis.sample_peak()
        lost = check_results(jobs)
        done = [j for j in jobs if j.status == "complete"]
        started = [j.started / 1e3 for j in done]
        completed = [j.completed / 1e3 for j in done]
        begin = min(ready, min(started))
        seconds = max(completed) - begin
        extra: dict[str, Any] = {}
        if head is not None:
            first = [j.completed / 1e3 for j in jobs[:head] if j.status == "complete"]
            extra = {"head_runs": head, "head_rate": rate(len(first), max(first) - begin)}
        return {
            **extra,
            "runs": k,
            "completed": len(done),
            "lost_runs": len(lost),
            "lost_note": lost_note(lost),
            "queued": n,
            "limit": concurrency,
            "seconds": seconds,
            "rate": rate(len(done), seconds),
            "fill_rate": rate(n, fill_seconds),
            "worker_rss_mb": worker_rss,
            "server_rss_mb": redis_rss,
        }

    async def _enqueue_all(self, queue: Any, function: str, n: int) -> list[str]:
        await queue.connect()
        try:
            keys: list[str] = []
            for offset in range(0, n, ENQUEUE_CHUNK):
                jobs = [Job(function, kwargs={"i": i}) for i in range(offset, min(n, offset + ENQUEUE_CHUNK))]
                done = await asyncio.gather(*(queue.enqueue(job) for job in jobs))
                if any(j is None for j in done):
                    raise RuntimeError("an enqueue was refused (duplicate key?)")
                keys.extend(job.key for job in jobs)
            return keys
        finally:
            await queue.disconnect()

    async def _wait_drained(self, queue: Any, keys: list[str]) -> list[Any]:
        """Polls the last key every 20 ms (one GET), then reads every job; returns them."""
        await queue.connect()
        try:
            deadline = time.monotonic() + self.timeout
            pending = list(keys)
            while pending:
                last = await queue.job(pending[-1])
                if last is not None and last.status in TERMINAL:
                    jobs = await self._read_jobs(queue, pending)
                    pending = [
                        key for key, job in zip(pending, jobs, strict=True) if job.status not in TERMINAL
                    ]
                    if not pending:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{len(pending)} of {len(keys)} jobs not done after {self.timeout:g} s"
                    )
                await asyncio.sleep(0.02)
            return await self._read_jobs(queue, keys)
        finally:
            await queue.disconnect()

    async def _read_jobs(self, queue: Any, keys: list[str]) -> list[Any]:
        jobs: list[Any] = []
        for offset in range(0, len(keys), ENQUEUE_CHUNK):
            part = await queue.jobs(keys[offset : offset + ENQUEUE_CHUNK])
            if any(job is None for job in part):
                raise RuntimeError("a job vanished from redis")
            jobs.extend(part)
        return jobs

    def e2e(self, n: int, concurrency: int) -> dict[str, Any]:
        with self.redis() as (redis, url), self.worker(url, concurrency, settle=1.0) as (worker, _):

            async def main() -> tuple[float, float]:
                queue = Queue.from_url(url)
                await queue.connect()
                try:
                    async with Notifications(queue) as notes:
                        t0 = time.perf_counter()
                        waits: list[asyncio.Future[str]] = []
                        for offset in range(0, n, ENQUEUE_CHUNK):
                            jobs = [
                                Job("noop", kwargs={"i": i})
                                for i in range(offset, min(n, offset + ENQUEUE_CHUNK))
                            ]
                            waits.extend(notes.expect(job.key) for job in jobs)
                            await asyncio.gather(*(queue.enqueue(job) for job in jobs))
                        t1 = time.perf_counter()
                        statuses = await asyncio.wait_for(asyncio.gather(*waits), self.timeout)
                        t2 = time.perf_counter()
                    lost = sum(1 for s in statuses if s != "complete")
                    if lost:
                        raise RuntimeError(f"{lost} of {n} jobs did not complete: {sorted(set(statuses))}")
                    return t1 - t0, t2 - t0
                finally:
                    await queue.disconnect()

            submit_seconds, seconds = asyncio.run(main())
            worker_rss = worker.sample_peak()
            redis_rss = redis.sample_peak()
        return {
            "runs": n,
            "limit": concurrency,
            "seconds": seconds,
            "rate": rate(n, seconds),
            "submit_rate": rate(n, submit_seconds),
            "worker_rss_mb": worker_rss,
            "server_rss_mb": redis_rss,
        }

    def roundtrip(self, n: int, concurrency: int) -> dict[str, Any]:
        with self.redis() as (redis, url), self.worker(url, concurrency, settle=1.0) as (worker, _):

            async def main() -> list[float]:
                queue = Queue.from_url(url)
                await queue.connect()
                latencies: list[float] = []
                try:
                    async with Notifications(queue) as notes:
                        for i in range(n):
                            t0 = time.perf_counter()
                            job = Job("noop", kwargs={"i": i})
                            done = notes.expect(job.key)
                            await queue.enqueue(job)
                            status = await asyncio.wait_for(done, 30)
                            await job.refresh()  # read the result, as Queue.apply does
                            latencies.append(time.perf_counter() - t0)
                            if status != "complete" or job.result != i:
                                raise RuntimeError(f"job {i} ended {status} with {job.result!r}")
                finally:
                    await queue.disconnect()
                return latencies

            latencies = asyncio.run(main())
            worker_rss = worker.sample_peak()
            redis_rss = redis.sample_peak()
        return {
            "runs": n,
            "limit": concurrency,
            **latency_summary(latencies),
            "worker_rss_mb": worker_rss,
            "server_rss_mb": redis_rss,
        }

    def steady(self, per_second: int, seconds: int, concurrency: int) -> dict[str, Any]:
        n = per_second * seconds
        with self.redis() as (redis, url), self.worker(url, concurrency, settle=1.0) as (worker, _):

            async def main() -> tuple[list[Any], float, int]:
                queue = Queue.from_url(url)
                await queue.connect()
                try:
                    async with Notifications(queue) as notes:
                        jobs = [Job("noop", kwargs={"i": i}) for i in range(n)]
                        waits = [notes.expect(job.key) for job in jobs]
                        tasks = []
                        loop = asyncio.get_running_loop()
                        late = 0
                        start = loop.time() + 0.05
                        for i, job in enumerate(jobs):
                            due = start + i / per_second
                            delay = due - loop.time()
                            if delay < -0.005:
                                late += 1
                            if delay > 0:
                                await asyncio.sleep(delay)
                            tasks.append(asyncio.create_task(queue.enqueue(job)))
                        submitted = loop.time() - start
                        await asyncio.gather(*tasks)
                        await asyncio.wait_for(asyncio.gather(*waits), self.timeout)
                        done = await self._read_jobs(queue, [job.key for job in jobs])
                    if check_results(done):
                        raise RuntimeError("a job did not complete")
                    return done, submitted, late
                finally:
                    await queue.disconnect()

            done, submit_span, late = asyncio.run(main())
            worker_rss = worker.sample_peak()
            redis_rss = redis.sample_peak()
        latencies = [(job.completed - job.queued) / 1e3 for job in done]
        return {
            "runs": n,
            "limit": concurrency,
            "target_rate": per_second,
            "achieved_rate": rate(n, submit_span),
            "late_submissions": late,
            **latency_summary(latencies),
            "timestamp_resolution_ms": 1,
            "worker_rss_mb": worker_rss,
            "server_rss_mb": redis_rss,
        }


def check_results(jobs: list[Any]) -> list[Any]:
    """The jobs SAQ ended without running them to completion (its sweeper's ABORTED ones).

    A job that completed with another result than its own ``i``, or FAILED, is an error.
    """
    wrong = [job for job in jobs if job.status == "complete" and job.result != job.kwargs["i"]]
    failed = [job for job in jobs if job.status == "failed"]
    if wrong or failed:
        job = (wrong + failed)[0]
        raise RuntimeError(
            f"{len(wrong)} jobs completed with another result, {len(failed)} failed; the first: "
            f"status={job.status!s} result={job.result!r} attempts={job.attempts} error={job.error!r}"
        )
    return [job for job in jobs if job.status != "complete"]


def lost_note(lost: list[Any]) -> str | None:
    if not lost:
        return None
    errors = sorted({f"{job.status.value}/{job.error}" for job in lost})
    return (
        f"{len(lost)} job(s) not completed: {', '.join(errors)} (SAQ's sweeper aborts jobs that a worker "
        "moved to its active list but had not yet marked ACTIVE: saq issues #124, #277)"
    )


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        return worker_command(sys.argv[2:])
    exit_on_sigterm()
    args = parse_args("saq")
    sizes = QUICK if args.quick else FULL
    report = Report("saq", args.output, args.quick, sizes, args.time_limit)
    report.data["version"] = metadata.version("saq")
    redis_server = shutil.which("redis-server")
    report.data["settings"] = SETTINGS
    status = "failed"
    if redis_server is None:
        report.data["errors"]["(run)"] = "redis-server is not on PATH (apt-get install -y redis-server)"
        report.finish(status)
        return 1
    report.data["redis_version"] = subprocess.run(
        [redis_server, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    report.data["redis_py_version"] = metadata.version("redis")
    try:
        report.data["hiredis_version"] = metadata.version("hiredis")
    except metadata.PackageNotFoundError:
        report.data["hiredis_version"] = None
    with tempfile.TemporaryDirectory(prefix="peers-saq-") as tmp:
        procs = Processes(Path(tmp))
        report.procs = procs
        bench = Bench(Path(tmp), procs, redis_server, timeout=180.0)
        s = sizes
        plan: dict[str, Any] = {
            "drain10": lambda: bench.drain("noop", s["drain"], 10),
            "drain100": lambda: bench.drain("noop", s["drain"], 100),
            "e2e": lambda: bench.e2e(s["e2e"], 100),
            "roundtrip": lambda: bench.roundtrip(s["roundtrip"], 100),
            "steady": lambda: bench.steady(s["steady_rate"], s["steady_seconds"], 100),
            "sleep10": lambda: bench.drain("sleep50", s["sleep10"], 10),
            "sleep100": lambda: bench.drain("sleep50", s["sleep100"], 100),
            "scale_small": lambda: bench.drain("noop", s["scale_small"], 100),
            "scale_large": lambda: bench.drain(
                "noop", s["scale_large"], 100, drained=s["scale_drain"], head=s["scale_small"]
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
