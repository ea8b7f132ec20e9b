"""Chaos on the real thing, small: three servers and three workers, each a process, on one
PostgreSQL database; while a few hundred runs go through, a server or a worker is killed
with SIGKILL every couple of seconds (and replaced). No run is lost, and a run executed
twice was in flight at a kill. ``benchmarks/chaos.py`` runs the same harness
(``tests/chaos.py``) with 10,000 runs."""

from __future__ import annotations

import random
from pathlib import Path

from .chaos import ChaosConfig, Deployment, kill_every


async def test_killed_servers_and_workers_lose_no_run_and_repeat_only_runs_in_flight(
    postgres_url: str, tmp_path: Path
) -> None:
    config = ChaosConfig(database=postgres_url, workdir=tmp_path, rate=40.0, task_sleep=1.0, deadline=60.0)
    async with Deployment.start(config) as deployment:
        report = await deployment.drive(400, kill_every(1.0, random.Random(12), alternate=True))
    print("\n".join(report.lines()))
    kinds = [d.what for d in report.disruptions]
    assert kinds.count("server killed") >= 2 and kinds.count("worker killed") >= 2, kinds
    assert report.lost == {}
    assert report.repeated  # a worker killed had runs in flight (each run takes up to 1 s)
    assert report.unexplained == []
    assert report.executions == report.runs + sum(len(why) for why in report.repeated.values())
