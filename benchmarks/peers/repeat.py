"""Runs the peer benchmark scripts, each N times, interleaved (issue 18).

Round k runs every chosen system once, in the order trioworker (SQLite), trioworker
(PostgreSQL), SAQ, Prefect, so that whatever else the machine does in that hour falls on all
of them alike; compare.py then takes per-row medians over the runs of each system and pairs
run k of trioworker with run k of each peer for the ratios::

    python benchmarks/peers/repeat.py [--repeat N] [--without SYSTEM[,SYSTEM]]
        [--python SYSTEM=PYTHON ...] [--postgres-url URL] [--quick] [--phases P,...]

SYSTEM is ``trioworker``, ``trioworker-postgres`` (or ``postgres``), ``saq`` or ``prefect``.
Each script runs with the Python of its own virtualenv (``--python saq=/path/bin/python``;
default: the one running this script) under a time limit (seconds: trioworker 420,
trioworker-postgres 600, SAQ 420, Prefect 600; a third of that, at least 120, with
``--quick``): it gets ``--time-limit`` 20 s shorter and skips the phases it has no time for,
and at the limit it gets SIGTERM (it then records what it measured and stops its servers),
SIGKILL 30 s later. ``trioworker-postgres`` runs only with ``--postgres-url`` (a server on
which the user may CREATE DATABASE). With ``--repeat 1`` (the default) a system's results go
to ``benchmarks/results/peers-SYSTEM.json``; with more, run k's to ``peers-SYSTEM-k.json``.
The files of the chosen systems, numbered or not, are removed first, so compare.py never mixes
in an older run. Options not listed here (``--quick``, ``--phases``) go to every script.
Exit code 1 when a script exited with another code than 0 (its JSON says why).

Standard library only. ``nox -s bench_peers -- --repeat 3 --without prefect`` runs it with
the virtualenvs of the ``bench_peers_*`` sessions, then compare.py.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import RESULTS, die_with_parent, exit_on_sigterm, log  # noqa: E402

#: The systems in the order each round runs them: (script, seconds allowed for a full run).
SYSTEMS: dict[str, tuple[str, int]] = {
    "trioworker": ("run_trioworker.py", 420),
    "trioworker-postgres": ("run_trioworker.py", 600),
    "saq": ("run_saq.py", 420),
    "prefect": ("run_prefect.py", 600),
}
ALIASES = {"postgres": "trioworker-postgres", "pg": "trioworker-postgres"}
GRACE_SECONDS = 30.0  # between SIGTERM and SIGKILL at the time limit


def system_names(values: Sequence[str]) -> list[str]:
    """``["saq,postgres", "prefect"]`` -> ``["saq", "trioworker-postgres", "prefect"]``.

    ValueError for an unknown name.
    """
    names = [ALIASES.get(name, name) for value in values for name in value.split(",") if name]
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"unknown systems {unknown}: choose from {', '.join(SYSTEMS)} (postgres)")
    return names


def time_limit(system: str, quick: bool) -> int:
    seconds = SYSTEMS[system][1]
    return max(120, seconds // 3) if quick else seconds


def results_files(results: Path, system: str) -> list[Path]:
    """The results files of ``system`` in ``results``: ``peers-SYSTEM.json`` and ``peers-SYSTEM-k.json``."""
    pattern = re.compile(rf"peers-{re.escape(system)}(-\d+)?\.json")
    return sorted(path for path in results.glob("peers-*.json") if pattern.fullmatch(path.name))


def output_file(results: Path, system: str, run: int, repeat: int) -> Path:
    return results / (f"peers-{system}.json" if repeat == 1 else f"peers-{system}-{run}.json")


def run_one(python: str, script: Path, args: Sequence[str], limit: int) -> int | None:
    """Runs one script to its end or to its time limit; its exit code (None: killed)."""
    cmd = [python, str(script), *args, "--time-limit", str(limit - 20)]
    log(f"$ {' '.join(cmd)}")
    # In our process group (Ctrl-C reaches it too), and killed if this process dies.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        log(f"  ! {script.name} reached its time limit of {limit} s: SIGTERM")
        return None
    finally:  # the time limit, or our own SIGTERM or Ctrl-C: the script stops its servers
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                log(f"  ! {script.name} did not stop within {GRACE_SECONDS:g} s: SIGKILL")
                proc.kill()
                proc.wait()


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Run the peer benchmark scripts N times each, interleaved (see the module docstring)."
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each system (default 1)")
    parser.add_argument(
        "--systems",
        action="append",
        default=[],
        help=f"the systems to run, comma-separated (default: {', '.join(SYSTEMS)}; "
        "trioworker-postgres only with --postgres-url)",
    )
    parser.add_argument(
        "--without", action="append", default=[], help="systems not to run, comma-separated (e.g. prefect)"
    )
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="SYSTEM=PYTHON",
        help="the Python of a system's virtualenv (default: this one)",
    )
    parser.add_argument("--postgres-url", default=None, help="the PostgreSQL server of trioworker-postgres")
    parser.add_argument("--quick", action="store_true", help="small counts (passed on); shorter time limits")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON files go")
    args, rest = parser.parse_known_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    try:
        chosen = system_names(args.systems) if args.systems else list(SYSTEMS)
        without = set(system_names(args.without))
        pythons: dict[str, str] = {}
        for item in args.python:
            name, sep, python = item.partition("=")
            if not sep or not python:
                raise ValueError(f"--python {item!r}: expected SYSTEM=PYTHON")
            pythons[system_names([name])[0]] = python
    except ValueError as exc:
        parser.error(str(exc))
    if args.postgres_url is None:
        if "trioworker-postgres" in chosen and args.systems:
            parser.error("trioworker-postgres needs --postgres-url")
        if "trioworker-postgres" not in without and not args.systems:
            log("repeat.py: no --postgres-url: trioworker-postgres does not run")
        without.add("trioworker-postgres")
    args.chosen = [name for name in SYSTEMS if name in chosen and name not in without]
    args.pythons = pythons
    if args.quick:
        rest = ["--quick", *rest]
    return args, rest


def main(argv: Sequence[str] | None = None) -> int:
    exit_on_sigterm()
    args, passed_on = parse(argv)
    if not args.chosen:
        log("repeat.py: no system to run")
        return 2
    for system in args.chosen:
        for path in results_files(args.results, system):
            path.unlink()
    log(f"repeat.py: {args.repeat} round(s) of {', '.join(args.chosen)}")
    failed: list[str] = []
    began = time.monotonic()
    for run in range(1, args.repeat + 1):
        for system in args.chosen:
            script, _ = SYSTEMS[system]
            output = output_file(args.results, system, run, args.repeat)
            extra = ["--postgres-url", args.postgres_url] if system == "trioworker-postgres" else []
            log(f"repeat.py: round {run} of {args.repeat}, {system} -> {output}")
            code = run_one(
                args.pythons.get(system, sys.executable),
                HERE / script,
                [*passed_on, *extra, "--output", str(output)],
                time_limit(system, args.quick),
            )
            if code != 0:
                failed.append(f"{system} run {run}: exit code {code}")
    log(f"repeat.py: done in {time.monotonic() - began:.0f} s")
    for line in failed:
        log(f"repeat.py: {line} (its JSON says why)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
