"""``serve(..., timeout=N)`` and ``TaskWorker.start(timeout=N)``: serve for at most N seconds,
then stop as ``stop()`` does (the grace period included), log it, and return normally.

A real server and real workers; the clock is a ``MockClock`` that jumps once everything is
blocked, so the seconds below are the clock's, not the test's.
"""

from __future__ import annotations

import logging

import httpx
import pytest
import trio
import trio.testing

from trioworker.server import RunningServer
from trioworker.tasks import task
from trioworker.worker.task_worker import TaskWorker, serve

from .helpers import history, submit, wait_all


@task(key="t.nap")
async def nap(seconds: float) -> str:
    await trio.sleep(seconds)
    return f"slept {seconds:g}"


async def test_a_timeout_stops_the_worker_after_the_runs_finish_within_the_grace(
    trioworker_autojump_clock: trio.testing.MockClock,
    trioworker_server: RunningServer,
    api: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trioworker.worker")
    [run_id] = await submit(api, "t.nap", {"seconds": 20})
    worker = TaskWorker(nap, api_url=trioworker_server.api_url, shutdown_grace_seconds=30)
    started = trio.current_time()
    with trio.fail_after(100):
        await worker.start(timeout=10)  # returns by itself, without an error
    # Stopped at 10 s, then the run in flight had its grace period and ended at 20 s.
    assert 20 <= trio.current_time() - started < 25
    assert worker.stopping
    [run] = await wait_all(api, [run_id])
    assert (run["state"]["type"], run["state"]["data"]) == ("COMPLETED", "slept 20")
    assert f"worker {worker.client_id}: its timeout of 10 s ran out" in caplog.messages
    assert worker.finished_task_runs == {"t.nap": 1}


async def test_runs_that_outlast_the_grace_after_a_timeout_go_back_to_the_queue(
    trioworker_autojump_clock: trio.testing.MockClock,
    trioworker_server: RunningServer,
    api: httpx.AsyncClient,
) -> None:
    [run_id] = await submit(api, "t.nap", {"seconds": 1000})
    started = trio.current_time()
    with trio.fail_after(100):
        await serve(nap, api_url=trioworker_server.api_url, shutdown_grace_seconds=5, timeout=10)
    assert 15 <= trio.current_time() - started < 20  # the timeout, then the grace period
    run = (await api.get(f"/task_runs/{run_id}")).json()
    assert (run["state"]["type"], run["state"]["name"]) == ("SCHEDULED", "Redelivered")
    assert ("RUNNING", "Running") in await history(api, run_id)


async def test_a_worker_without_runs_returns_at_its_timeout(
    trioworker_autojump_clock: trio.testing.MockClock, trioworker_server: RunningServer
) -> None:
    started = trio.current_time()
    worker = TaskWorker(nap, api_url=trioworker_server.api_url)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: worker.start(timeout=30, task_status=task_status))
        assert worker.connected  # subscribed, serving until the time runs out
    assert 30 <= trio.current_time() - started < 31


async def test_an_earlier_stop_wins_over_the_timeout(
    trioworker_autojump_clock: trio.testing.MockClock,
    trioworker_server: RunningServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trioworker.worker")
    worker = TaskWorker(nap, api_url=trioworker_server.api_url)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: worker.start(timeout=3600, task_status=task_status))
        await trio.sleep(5)
        worker.stop()
    assert 5 <= trio.current_time() - started < 6
    assert not any("timeout" in message for message in caplog.messages)


@pytest.mark.parametrize("seconds", [-1.0, float("nan")])
async def test_a_bad_timeout_is_refused_before_anything_starts(
    trioworker_server: RunningServer, seconds: float
) -> None:
    with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
        await TaskWorker(nap, api_url=trioworker_server.api_url).start(timeout=seconds)
    with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
        await serve(nap, api_url=trioworker_server.api_url, timeout=seconds)
