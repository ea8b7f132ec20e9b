"""Chaos on the real thing: three ``trioworker server`` processes on one PostgreSQL database
and three ``trioworker worker`` processes, each given the three URLs; 10,000 runs submitted
at a steady rate while, every few seconds, a random server or worker is killed with SIGKILL
and replaced. Then it prints the runs lost (must be 0), the runs executed more than once and
how many of those were in flight at a kill, and the time taken::

    python benchmarks/chaos.py [--runs 10000] [--rate 200] [--kill-every 3] [--seed N]
                               [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]

Each run of the task appends a line to a file (its run, its worker's pid, a token it then
returns); the harness, shared with ``tests/test_chaos.py``, is ``tests/chaos.py`` (its
docstring says what explains a second execution). The servers run on a fresh database of
``--postgres-url``, dropped at the end; the processes' logs and the executions' file stay
in ``--workdir`` (a temporary folder by default).

Exit code 0 when no run was lost and every run executed twice was in flight at a kill,
1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
for _path in (str(HERE), str(PROJECT)):  # bench_server, and the harness in tests/, run from anywhere
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_server import DEFAULT_POSTGRES_URL, git_commit, postgres_database  # noqa: E402

from tests.chaos import ChaosConfig, Deployment, Report, kill_every  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=200.0, help="runs submitted per second (default 200)")
    parser.add_argument(
        "--kill-every", type=float, default=3.0, help="mean seconds between kills (default 3)"
    )
    parser.add_argument("--replica-timeout", type=float, default=3.0, help="each server's (default 3 s)")
    parser.add_argument(
        "--task-sleep", type=float, default=0.05, help="each run sleeps up to this (default 0.05 s)"
    )
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds to wait for the last runs")
    parser.add_argument("--seed", type=int, default=None, help="of the kills (default: random, printed)")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="logs and executions (default: a temp folder)"
    )
    return parser.parse_args(argv)


async def chaos(config: ChaosConfig, runs: int, kill_seconds: float, seed: int) -> Report:
    async with Deployment.start(config) as deployment:
        return await deployment.drive(runs, kill_every(kill_seconds, random.Random(seed)))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="trioworker-chaos-"))
    load = " ".join(f"{n:.2f}" for n in os.getloadavg())
    print(
        f"chaos: {args.servers} servers, {args.workers} workers, {args.runs} runs at {args.rate:g}/s, "
        f"a kill every {args.kill_every:g} s (seed {seed}), --replica-timeout {args.replica_timeout:g}; "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {(git_commit() or '?')[:10]}, "
        f"{os.cpu_count()} CPUs, load {load}; logs in {workdir}",
        flush=True,
    )
    with postgres_database(args.postgres_url, "chaos") as database:
        config = ChaosConfig(
            database=database,
            workdir=workdir,
            servers=args.servers,
            workers=args.workers,
            replica_timeout=args.replica_timeout,
            task_sleep=args.task_sleep,
            rate=args.rate,
            deadline=args.deadline,
        )
        began = time.monotonic()
        report = trio.run(chaos, config, args.runs, args.kill_every, seed)
    print("\n".join(report.lines()))
    load = " ".join(f"{n:.2f}" for n in os.getloadavg())
    print(f"{'OK' if report.ok else 'FAILED'} in {time.monotonic() - began:.0f} s with start-up; load {load}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
