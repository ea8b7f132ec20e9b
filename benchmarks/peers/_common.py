"""Helpers shared by the peer benchmark scripts (standard library only).

Each ``run_*.py`` runs in its own virtualenv with only its own system installed, so this
module imports nothing but the standard library. It gives: the workload sizes (full and
``--quick``), child processes in their own process groups that die with their parent,
peak-RSS readings, percentiles, and a results file rewritten after every phase, so a run
cut short by its time limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"

SLEEP_SECONDS = 0.05
MAX_ISSUES_PER_CHILD = 5
# Log lines that say nothing about the benchmark: redis-server's advice on vm.overcommit_memory
# (it does not fork here: no snapshots), and SAQ's worker cancelling its idle dequeue tasks on
# SIGTERM (its default shutdown grace period is 0).
BENIGN_LOG_LINES = (
    "Memory overcommit must be enabled",
    "Some tasks did not finish within the shutdown grace period",
)

# The workloads (see README.md beside this file). Every system runs every phase it can;
# a system may shrink a count (Prefect does), and says so in its results.
FULL: dict[str, int] = {
    "drain": 10_000,  # (a) runs queued before the worker starts, at limit 10 and at limit 100
    "e2e": 10_000,  # (b) runs submitted (batched) and awaited, worker at limit 100
    "roundtrip": 200,  # (c) sequential submit-one-await-its-result
    "steady_rate": 100,  # (d) runs/s ...
    "steady_seconds": 10,  # ... for this long
    "sleep10": 1_000,  # (e) 50 ms sync sleeps at limit 10 (ideal 200/s)
    "sleep100": 4_000,  # (e) the same at limit 100 (ideal 2,000/s)
    "scale_small": 1_000,  # (g) runs queued; all drained
    "scale_large": 100_000,  # (g) runs queued; the first scale_drain drained
    "scale_drain": 10_000,
}
QUICK: dict[str, int] = {
    "drain": 1_000,
    "e2e": 1_000,
    "roundtrip": 50,
    "steady_rate": 100,
    "steady_seconds": 3,
    "sleep10": 200,
    "sleep100": 800,
    "scale_small": 1_000,
    "scale_large": 20_000,
    "scale_drain": 2_000,
}

# The phases, in the order they run and the table shows them.
PHASES: tuple[str, ...] = (
    "drain10",
    "drain100",
    "e2e",
    "roundtrip",
    "steady",
    "sleep10",
    "sleep100",
    "scale_small",
    "scale_large",
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float, alive: Callable[[], bool] | None = None) -> None:
    """Until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if alive is not None and not alive():
            raise RuntimeError(f"the process meant to listen on port {port} exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")
        time.sleep(0.05)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(seconds, 50) * 1e3,
        "p95_ms": percentile(seconds, 95) * 1e3,
        "p99_ms": percentile(seconds, 99) * 1e3,
        "max_ms": (max(seconds) * 1e3) if seconds else math.nan,
    }


# --------------------------------------------------------------------------- processes


def _proc_status(pid: int) -> dict[str, int]:
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


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids.extend(int(c) for c in (task / "children").read_text().split())
    return kids


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(_children(current))
    return out


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid``, of its reaped children and of its live descendants (NaN: unreadable).

    For a server that forks a process per connection (PostgreSQL): a child that exited and was
    reaped still counts, in its parent's cutime and cstime.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    own = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
    live = (cpu_seconds(p) for p in tree_pids(pid)[1:])
    return own + sum(c for c in live if not math.isnan(c))  # NaN: exited meanwhile


_PR_SET_PDEATHSIG = 1
try:
    _LIBC: Any = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not glibc Linux: no parent-death signal, the process groups still work
    _LIBC = None


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGKILL when its parent dies, even if killed -9."""
    # Runs in the child between fork and exec.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    """A started process, the leader of its own process group."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    peak_kb: int = 0  # the largest VmHWM sum over the tree seen by sample_peak()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sample_peak(self) -> float:
        """Peak RSS in MB: the sum of VmHWM over the process and its descendants (kept as a maximum)."""
        total = sum(_proc_status(p).get("VmHWM", 0) for p in tree_pids(self.pid))
        self.peak_kb = max(self.peak_kb, total)
        return self.peak_kb / 1024

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in tree_pids(self.pid))

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Processes:
    """Starts children in their own process groups; ``stop_all()`` ends every one still running."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []
        #: log lines of stopped children that look like trouble, and exit codes other than 0
        self.issues: list[str] = []

    def start(
        self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> Child:
        log_path = self.workdir / f"{name}-{len(self.children)}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd or self.workdir,
                start_new_session=True,
                preexec_fn=die_with_parent,  # no threads run in this process when it forks
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def stop(self, child: Child, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
        """Signals the child's whole process group, then kills it after ``timeout``; its exit code."""
        if child.proc.poll() is None:
            child.sample_peak()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)
        try:
            code = child.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"  ! {child.name} (pid {child.pid}) did not stop within {timeout:g} s; killing it")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            child.proc.wait()
            code = None
        # what the leader left behind in its group (a server's own children)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        if child in self.children:
            self.children.remove(child)
        self._collect_issues(child, code, sig)
        return code

    def _collect_issues(self, child: Child, code: int | None, sig: int) -> None:
        if code not in (0, -sig, 128 + sig):
            self.issues.append(f"{child.name} (pid {child.pid}) exited with {code} after signal {sig}")
        try:
            lines = child.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return
        found = [
            line.strip()
            for line in lines
            if any(mark in line for mark in ("Traceback", "ERROR", "CRITICAL", "WARNING", "Error:"))
            and not any(benign in line for benign in BENIGN_LOG_LINES)
        ]
        for line in found[:MAX_ISSUES_PER_CHILD]:
            self.issues.append(f"{child.name} (pid {child.pid}): {line[:300]}")
        if len(found) > MAX_ISSUES_PER_CHILD:
            self.issues.append(
                f"{child.name} (pid {child.pid}): ... {len(found) - MAX_ISSUES_PER_CHILD} more"
            )

    def stop_all(self) -> None:
        for child in list(reversed(self.children)):
            self.stop(child, timeout=10.0)

    @contextlib.contextmanager
    def running(
        self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None, stop_timeout: float = 20.0
    ) -> Iterator[Child]:
        child = self.start(name, cmd, env)
        try:
            yield child
        finally:
            if child in self.children:
                self.stop(child, stop_timeout)


# --------------------------------------------------------------------------- results


class PhaseSkipped(Exception):
    """A phase that this system does not run (the reason is the message)."""


@dataclass
class Report:
    """The JSON results of one system, rewritten after every phase."""

    system: str
    output: Path
    quick: bool
    sizes: dict[str, int]
    time_limit: float
    started: float = field(default_factory=time.monotonic)
    data: dict[str, Any] = field(default_factory=dict)
    procs: Processes | None = None  # to tell this benchmark's CPU time from the machine's
    #: more CPU to report per phase, as ``<name>_cpu_percent`` of the machine: name -> CPU seconds
    #: so far of processes this benchmark uses but did not start (run_trioworker.py: PostgreSQL's)
    cpu_meters: dict[str, Callable[[], float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = {
            "system": self.system,
            "version": None,
            "quick": self.quick,
            "sizes": self.sizes,
            "settings": [],
            "timestamp": datetime.now(UTC).isoformat(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "status": "running",
            "elapsed_seconds": 0.0,
            "phases": {},
            "errors": {},
            "skipped": {},
            "notes": [],
        }
        self.write()

    def left(self) -> float:
        return self.time_limit - (time.monotonic() - self.started)

    def write(self) -> None:
        self.data["elapsed_seconds"] = time.monotonic() - self.started
        self.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.output.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, allow_nan=True) + "\n")
        tmp.replace(self.output)

    def phase(self, name: str, fn: Callable[[], dict[str, Any]], *, needs: float = 10.0) -> None:
        """Runs one phase; its result, skip or error goes into the file at once."""
        if self.left() < needs:
            self.data["skipped"][name] = f"not started: {self.left():.0f} s of the time limit left"
            log(f"[{self.system}] {name}: skipped (time limit)")
            self.write()
            return
        log(f"[{self.system}] {name} ...")
        cpu_before = cpu_snapshot(self.procs)
        meters_before = {meter_name: meter() for meter_name, meter in self.cpu_meters.items()}
        began = time.monotonic()
        try:
            result = fn()
        except PhaseSkipped as exc:
            self.data["skipped"][name] = str(exc)
            log(f"[{self.system}] {name}: skipped: {exc}")
        except Exception as exc:  # one failing phase must not hide the others
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(f"[{self.system}] {name}: FAILED: {type(exc).__name__}: {exc}")
            log(traceback.format_exc())
        else:
            wall = time.monotonic() - began
            result["phase_seconds"] = wall
            # other work on this machine skews everything: how much of it was not this benchmark
            total, mine = (b - a for a, b in zip(cpu_before, cpu_snapshot(self.procs), strict=True))
            result["other_cpu_percent"] = max(0.0, (total - mine) / (wall * (os.cpu_count() or 1)) * 100)
            for meter_name, meter in self.cpu_meters.items():
                used = meter() - meters_before[meter_name]
                result[f"{meter_name}_cpu_percent"] = used / (wall * (os.cpu_count() or 1)) * 100
            self.data["phases"][name] = result
            log(f"[{self.system}] {name}: {_brief(result)}")
        self.write()

    def finish(self, status: str) -> None:
        self.data["status"] = status
        self.write()


def _brief(result: Mapping[str, Any]) -> str:
    parts = []
    for key in ("runs", "limit", "rate", "p50_ms", "p99_ms", "worker_rss_mb", "server_rss_mb"):
        if key in result and result[key] is not None:
            value = result[key]
            parts.append(f"{key}={value:,.1f}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def parse_args(
    system: str,
    argv: Sequence[str] | None = None,
    *,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
    system_of: Callable[[argparse.Namespace], str] | None = None,
) -> argparse.Namespace:
    """The options every ``run_*.py`` takes, plus those ``configure`` adds.

    ``--output`` defaults to ``benchmarks/results/peers-<system>.json``, where ``system_of``
    (given) names the system from the other options (run_trioworker.py: ``trioworker-postgres``
    with ``--postgres-url``).
    """
    parser = argparse.ArgumentParser(description=f"Peer benchmark workloads on {system}.")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument(
        "--output", type=Path, default=None, help=f"the JSON results file (default {results_file(system)})"
    )
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds; later phases are skipped")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases to run")
    if configure is not None:
        configure(parser)
    args, _unknown = parser.parse_known_args(argv)  # nox passes all posargs to every script
    args.phases = [p for p in args.phases.split(",") if p]
    if args.output is None:
        args.output = results_file(system if system_of is None else system_of(args))
    return args


def results_file(system: str) -> Path:
    """Where a single run of ``system`` writes (``repeat.py`` numbers the files of repeated runs)."""
    return RESULTS / f"peers-{system}.json"


def exit_on_sigterm() -> None:
    """SIGTERM (the session's time limit) raises SystemExit, so every ``finally`` still runs."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def head_rate(completions: Sequence[float], begin: float, head: int) -> float:
    """The drain rate of the first ``head`` runs (completion times of the drained runs in queue order)."""
    if len(completions) < head or head <= 0:
        return math.nan
    return rate(head, max(completions[:head]) - begin)


def cpu_snapshot(procs: Processes | None) -> tuple[float, float]:
    """(CPU seconds the whole machine was busy, CPU seconds of this process and its children)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        total = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return math.nan, math.nan
    me, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = me.ru_utime + me.ru_stime + reaped.ru_utime + reaped.ru_stime
    if procs is not None:
        mine += sum(child.cpu() for child in procs.children if child.alive())
    return total, mine


def now() -> float:
    return time.time()


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else math.nan
