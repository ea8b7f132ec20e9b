"""Benchmark of backpressure: ``Task.map`` into a server started with ``--max-queued``.

Run it as a plain script (no pytest)::

    python benchmarks/bench_backpressure.py [--runs 100,1000] [--max-queued 5,50]
        [--modes channel,http,sync] [--tasks noop,sleep50] [--limit 10] [--repeat 1]
        [--baseline PATH]

Every case (runs N, bound M, mode) starts a fresh server (``trioworker server --max-queued
M``, its own SQLite file) and a fresh worker (``benchmarks/worker_tasks.py``, limit
``--limit``), each in its own process, and waits until the worker is subscribed. Then a
submitter process maps ``bench.noop`` (``--tasks``: or ``bench.sleep50``, a sync task that
sleeps 50 ms) over ``range(N)`` and waits for every result:

- ``channel``: ``await noop.map(range(N))`` inside ``trioworker.connect()`` (the client
  channel), then ``await trioworker.wait_all(futures)``;
- ``http``: the same inside ``trioworker.connect(channel=False)`` (every create over HTTP);
- ``sync``: ``noop.sync.map(range(N))`` inside ``trioworker.sync.connect()``, then
  ``trioworker.sync.wait_all(futures)``.

It reports, per case: seconds from the map's call to its return (every run created) and to
the last result, HTTP requests and channel create messages the submitter sent, creates sent
per run (1.00: no create sent twice; a refusal that makes the client send a create again
counts it again), and the server's CPU seconds over the case. The checks: every result is
``range(N)`` in order, the server holds exactly N runs of the key, all COMPLETED.

``--baseline PATH`` runs every case on another checkout too (its trioworker for the server,
the worker and the submitter, first on ``PYTHONPATH``; e.g. ``git archive main | tar -x -C
/tmp/base``), alternating the two in each repetition, and adds the ratio baseline / this
(how many times faster this checkout is). JSON goes to ``benchmarks/results/bench_backpressure.json``.
The exit code is 1 when a check fails or the benchmark aborts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
# worker_tasks, bench_* and trioworker, run from anywhere; a submitter process takes the
# trioworker of the checkout under test, first on its PYTHONPATH.
for _path in (str(HERE),) if sys.argv[1:2] == ["--submitter"] else (str(HERE), str(PROJECT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_server import (  # noqa: E402
    BenchError,
    ServerProcess,
    aligned_table,
    log,
    print_sections,
    save_results,
    stop_process,
)
from bench_worker import WorkerProcess, api_client, wait_subscribed  # noqa: E402
from worker_tasks import NOOP_KEY, SLEEP50_KEY  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "bench_backpressure.json"
MODES = ("channel", "http", "sync")
#: The tasks it can map: name in worker_tasks -> task key.
TASKS = {"noop": NOOP_KEY, "sleep50": SLEEP50_KEY}
#: Seconds one submitter may take before the case is given up.
SUBMITTER_TIMEOUT = 900.0


# --------------------------------------------------------------------------- the submitter process


def submitter(api_url: str, runs: int, mode: str, task_name: str) -> dict[str, Any]:
    """Map the task ``task_name`` of ``worker_tasks`` (``noop`` or ``sleep50``) over
    ``range(runs)`` in ``mode`` and wait for every result: what it cost.

    It runs in its own process, with the trioworker of the checkout under test first on
    ``sys.path``, and counts what it sends by wrapping the client it uses.
    """
    import trio
    import worker_tasks

    import trioworker

    mapped_task = getattr(worker_tasks, task_name)

    sent = {"requests": 0, "channel_creates": 0, "creates": 0}

    def count_request(request: httpx.Request) -> None:
        sent["requests"] += 1
        if request.url.path.endswith("/task_runs/batch"):
            sent["creates"] += len(json.loads(request.content))
        elif request.method == "POST" and request.url.path.endswith("/task_runs"):
            sent["creates"] += 1

    async def count_request_async(request: httpx.Request) -> None:
        count_request(request)

    def count_channel() -> None:
        """Count the creates sent over the client channel (this process's class, patched)."""
        from trioworker.client.channel import ClientChannel

        create = ClientChannel.create

        async def counted(self: ClientChannel, creates: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
            sent["channel_creates"] += 1
            sent["creates"] += len(creates)
            return await create(self, creates, *args, **kwargs)

        ClientChannel.create = counted  # type: ignore[method-assign]

    count_channel()
    results: list[int] = []
    began = time.perf_counter()
    mapped = math.nan
    if mode == "sync":
        with trioworker.sync.connect(api_url) as sync_client:
            sync_client._http.event_hooks["request"].append(count_request)
            futures = mapped_task.sync.map(range(runs))
            mapped = time.perf_counter() - began
            trioworker.sync.wait_all(futures, timeout=SUBMITTER_TIMEOUT)
            results = [int(f.result()) for f in futures]
    else:

        async def main() -> list[int]:
            nonlocal mapped
            async with trioworker.connect(api_url, channel=mode == "channel") as client:
                client._http.event_hooks["request"].append(count_request_async)
                futures = await mapped_task.map(range(runs))
                mapped = time.perf_counter() - began
                await trioworker.wait_all(futures, timeout=SUBMITTER_TIMEOUT)
                return [int(await f.result()) for f in futures]

        results = trio.run(main)
    done = time.perf_counter() - began
    return {"map_seconds": mapped, "done_seconds": done, "results_ok": results == list(range(runs)), **sent}


# --------------------------------------------------------------------------- one case


@dataclass(frozen=True)
class Case:
    task: str
    runs: int
    max_queued: int
    mode: str

    @property
    def title(self) -> str:
        return f"{self.task} x {self.runs:,} at --max-queued {self.max_queued}, {self.mode}"


@dataclass
class Sample:
    map_seconds: float
    done_seconds: float
    requests: int
    channel_creates: int
    creates: int
    server_cpu_seconds: float


@dataclass
class Row:
    case: Case
    version: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, name: str) -> float:
        values = [float(getattr(s, name)) for s in self.samples]
        return statistics.median(values) if values else math.nan


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    rows: dict[tuple[Case, str], Row] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    issues: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.checks.append(what)
            log(f"  ! check failed: {what}")

    def versions(self) -> list[tuple[str, Path]]:
        mine = [("this", PROJECT)]
        baseline = self.args.baseline
        return mine if baseline is None else [("baseline", Path(baseline).resolve()), *mine]

    def run_case(self, case: Case, version: str, project: Path, rep: int) -> None:
        label = f"{case.task}-{case.runs}-{case.max_queued}-{case.mode}-{version}-{rep}"
        log(f"[{case.title}] {version} rep {rep}")
        server = ServerProcess(
            self.workdir, label, extra_args=["--max-queued", str(case.max_queued)], project=project
        )
        server.start()
        with contextlib.ExitStack() as stack:
            stack.callback(self._stop, server, label)
            worker = WorkerProcess(self.workdir, label, server.api, self.args.limit, project=project)
            worker.start()
            stack.callback(self._stop_worker, worker, label)
            api = stack.enter_context(api_client(server, 30.0))
            wait_subscribed(api, worker)
            cpu_before = server.cpu_seconds()
            outcome = self._submit(server.api, case, project)
            cpu = server.cpu_seconds() - cpu_before
            self.check(bool(outcome["results_ok"]), f"[{label}] the results are not range({case.runs})")
            self._check_runs(api, case, label)
        sample = Sample(
            map_seconds=outcome["map_seconds"],
            done_seconds=outcome["done_seconds"],
            requests=outcome["requests"],
            channel_creates=outcome["channel_creates"],
            creates=outcome["creates"],
            server_cpu_seconds=cpu,
        )
        self.rows.setdefault((case, version), Row(case, version)).samples.append(sample)
        log(
            f"    map {sample.map_seconds:.2f} s, all done {sample.done_seconds:.2f} s, "
            f"{sample.requests} requests, {sample.channel_creates} channel creates, "
            f"{sample.creates / case.runs:.2f} creates sent per run, server CPU {cpu:.2f} s"
        )

    def _submit(self, api_url: str, case: Case, project: Path) -> dict[str, Any]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(project), str(HERE), env.get("PYTHONPATH")) if p)
        env.pop("TRIOWORKER_API_KEY", None)
        script = str(Path(__file__).resolve())
        command = [sys.executable, script, "--submitter", api_url, str(case.runs), case.mode, case.task]
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=SUBMITTER_TIMEOUT + 60, check=False
        )
        if done.returncode != 0:
            raise BenchError(f"the submitter exited with {done.returncode}:\n{done.stderr[-3000:]}")
        outcome: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return outcome

    def _check_runs(self, api: httpx.Client, case: Case, label: str) -> None:
        states: dict[str, str] = {}
        offset = 0
        while True:
            params: dict[str, str | int] = {"task_key": TASKS[case.task], "limit": 1000, "offset": offset}
            page = api.get("/task_runs", params=params).json()
            states.update((run["id"], run["state"]["type"]) for run in page)
            if len(page) < 1000:
                break
            offset += 1000
        held = len(states)
        self.check(held == case.runs, f"[{label}] the server holds {held} runs, not {case.runs}")
        late = sum(1 for state in states.values() if state != "COMPLETED")
        self.check(late == 0, f"[{label}] {late} runs are not COMPLETED")

    def _stop(self, server: ServerProcess, label: str) -> None:
        code, _ = server.stop()
        if code not in (0, None):
            self.issues.append(f"[{label}] server exit code {code}")
        self.issues.extend(f"[{label}] {issue}" for issue in server.log_issues())

    def _stop_worker(self, worker: WorkerProcess, label: str) -> None:
        code, _ = stop_process(worker.proc, f"worker {label}", 15.0)
        if code not in (0, None):
            self.issues.append(f"[{label}] worker exit code {code}")
        self.issues.extend(f"[{label}] worker: {issue}" for issue in worker.log_issues())

    def table(self) -> list[str]:
        header = [
            "case",
            "version",
            "map s",
            "all done s",
            "requests",
            "channel creates",
            "creates sent/run",
            "server CPU s",
            "baseline/this",
        ]
        lines: list[list[str]] = []
        for (case, version), row in self.rows.items():
            base = self.rows.get((case, "baseline"))
            ratio = ""
            if version == "this" and base is not None:
                ratio = f"{base.median('done_seconds') / row.median('done_seconds'):.1f}x"
            lines.append(
                [
                    case.title,
                    version,
                    f"{row.median('map_seconds'):.2f}",
                    f"{row.median('done_seconds'):.2f}",
                    f"{row.median('requests'):.0f}",
                    f"{row.median('channel_creates'):.0f}",
                    f"{row.median('creates') / case.runs:.2f}",
                    f"{row.median('server_cpu_seconds'):.2f}",
                    ratio,
                ]
            )
        return aligned_table(header, lines, numeric={2, 3, 4, 5, 6, 7, 8})


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=_numbers, default=[100, 1000], help="runs per map (comma-separated)")
    parser.add_argument(
        "--max-queued", type=_numbers, default=[5, 50], help="the server's bounds (comma-separated)"
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"some of {', '.join(MODES)}")
    parser.add_argument("--tasks", default="noop", help=f"the tasks to map: some of {', '.join(TASKS)}")
    parser.add_argument("--limit", type=int, default=10, help="the worker's --limit")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions (the table shows medians)")
    parser.add_argument("--baseline", help="another checkout to run every case on too")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    args.modes = [mode for mode in args.modes.split(",") if mode]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    args.tasks = [name for name in args.tasks.split(",") if name]
    if set(args.tasks) - set(TASKS):
        parser.error(f"unknown tasks: {', '.join(sorted(set(args.tasks) - set(TASKS)))}")
    return args


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-backpressure-") as path:
        yield Path(path)


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["--submitter"]:
        api_url, runs, mode, task_name = argv[1], int(argv[2]), argv[3], argv[4]
        print(json.dumps(submitter(api_url, runs, mode, task_name)))
        return 0
    args = parse_args(argv)
    started = time.perf_counter()
    error: str | None = None
    with workdir() as path:
        bench = Bench(args, path)
        try:
            cases = [
                Case(task_name, runs, max_queued, mode)
                for task_name in args.tasks
                for runs in args.runs
                for max_queued in args.max_queued
                for mode in args.modes
            ]
            for rep in range(1, args.repeat + 1):
                for case in cases:
                    versions = bench.versions()
                    for version, project in versions if rep % 2 else reversed(versions):
                        bench.run_case(case, version, project, rep)
        except (BenchError, subprocess.TimeoutExpired, httpx.HTTPError) as exc:
            error = str(exc)
    print()
    print(f"map into --max-queued, worker limit {args.limit}, medians of {args.repeat}:")
    print("\n".join(bench.table()))
    print_sections([("failed checks", bench.checks), ("log issues", bench.issues)], error)
    save_results(
        "bench_backpressure",
        args,
        time.perf_counter() - started,
        {
            "rows": [
                {"case": asdict(case), "version": version, "samples": [asdict(s) for s in row.samples]}
                for (case, version), row in bench.rows.items()
            ]
        },
    )
    return 1 if bench.checks or error else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
