"""Chaos on the real thing, small: three servers and three workers, each a process, on one
PostgreSQL database; while a few hundred runs go through, a server or a worker is killed
with SIGKILL every couple of seconds (and replaced). No run is lost, and a run executed
twice was in flight at a kill. ``benchmarks/chaos.py`` runs the same harness
(``tests/chaos.py``) with 10,000 runs."""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from .chaos import ChaosConfig, Deployment, kill_every
from .postgres import Cluster, binaries, throwaway_cluster, unavailable


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


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster of the test's own, to restart."""
    bin_dir = binaries()
    if bin_dir is None:
        unavailable("no initdb and pg_ctl to start a PostgreSQL cluster that the test can restart")
    assert bin_dir is not None
    with throwaway_cluster(bin_dir) as running:
        yield running


async def stopped(cluster: Cluster, seconds: float) -> None:
    """Stop the database for ``seconds``, then start it."""
    await trio.to_thread.run_sync(cluster.stop)
    await trio.sleep(seconds)
    await trio.to_thread.run_sync(cluster.start)


async def test_database_restarts_lose_no_run_and_repeat_only_runs_in_flight(
    cluster: Cluster, tmp_path: Path
) -> None:
    config = ChaosConfig(
        database=cluster.url,
        workdir=tmp_path,
        servers=2,
        workers=1,
        replica_timeout=4.0,
        rate=30.0,
        task_sleep=0.5,
        deadline=60.0,
    )
    worker_log = trio.Path(tmp_path / "worker-0.log")
    after_restart = ""

    async def restart_then_stop(deployment: Deployment, submitted: trio.Event) -> None:
        nonlocal after_restart
        await trio.sleep(3)  # runs go through, then:
        await deployment.outage("database restarted", partial(trio.to_thread.run_sync, cluster.restart))
        await trio.sleep(3)
        after_restart = await worker_log.read_text()
        await deployment.outage("database stopped for 6 s", partial(stopped, cluster, 6))

    async with Deployment.start(config) as deployment:
        report = await deployment.drive(450, restart_then_stop)
    print("\n".join(report.lines()))
    kinds = [d.what for d in report.disruptions]
    assert [k for k in kinds if k.startswith("database")] == [
        "database restarted",
        "database stopped for 6 s",
    ]
    assert kinds.count("server fenced") >= 2  # each, without its database for 6 s
    assert report.lost == {}
    assert report.unexplained == []
    # Through the restart (shorter than --replica-timeout) the worker kept its socket: the
    # servers tried its reports again until the database answered.
    assert after_restart.count("subscribed to") == 1 and "subscription lost" not in after_restart
    # Stopped for longer, the servers closed their sockets, and the worker came back.
    assert "closed with 1012 the server cannot reach its database" in await worker_log.read_text()
