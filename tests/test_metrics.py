"""The server's ``/metrics``: Prometheus text, parsed with prometheus_client's own parser,
after real runs through a real worker; the dispatcher's ready times; one registry per server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trioworker.models import StateType
from trioworker.server import RunningServer, ServerConfig, serve_server
from trioworker.server.metrics import ServerMetrics
from trioworker.server.overview import Overview, TaskKeyOverview, WaitingRun
from trioworker.server.queue import Dispatcher, Subscription
from trioworker.server.store import QueuedRun
from trioworker.tasks import task

from .helpers import submit, wait_all

#: (sample name, sorted label items) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@task(key="metrics.nap")
async def nap(seconds: float) -> float:
    await trio.sleep(seconds)
    return seconds


@task(key="metrics.fail")
def fail() -> None:
    raise RuntimeError("on purpose")


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample of a scrape, and the type of every family."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples, types


async def scrape(url: str, **headers: str) -> tuple[Samples, dict[str, str]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.every_store
async def test_metrics_after_real_runs(
    trioworker_server: RunningServer, api: httpx.AsyncClient, trioworker_worker: Any
) -> None:
    async with trioworker_worker(nap, fail, limit=10):
        naps = await submit(api, "metrics.nap", *({"seconds": 0.3} for _ in range(4)))
        failed = await submit(api, "metrics.fail", {})
        await wait_all(api, naps + failed)
        [cancelled] = await submit(api, "metrics.idle", {})
        assert (await api.post(f"/task_runs/{cancelled}/cancel")).status_code == 200
        await submit(api, "metrics.idle", {})  # waits: no worker takes it
        samples, types = await scrape(trioworker_server.url)
        assert value(samples, "trioworker_subscriptions") == 1
        assert value(samples, "trioworker_workers") == 1
        assert value(samples, "trioworker_task_workers", task_key="metrics.nap") == 1
        assert value(samples, "trioworker_task_workers", task_key="metrics.idle") == 0
    assert types["trioworker_task_runs_created"] == "counter"
    assert types["trioworker_task_run_delivery_latency_seconds"] == "histogram"
    assert types["trioworker_task_runs"] == "gauge"
    assert not [name for name, _ in samples if name.endswith("_created")]

    created = "trioworker_task_runs_created_total"
    assert value(samples, created, task_key="metrics.nap") == 4
    assert value(samples, created, task_key="metrics.fail") == 1
    assert value(samples, created, task_key="metrics.idle") == 2
    ended = "trioworker_task_runs_ended_total"
    assert value(samples, ended, task_key="metrics.nap", state="COMPLETED") == 4
    assert value(samples, ended, task_key="metrics.fail", state="FAILED") == 1
    assert value(samples, ended, task_key="metrics.idle", state="CANCELLED") == 1

    latency = "trioworker_task_run_delivery_latency_seconds"
    assert value(samples, f"{latency}_count", task_key="metrics.nap") == 4
    assert value(samples, f"{latency}_bucket", task_key="metrics.nap", le="+Inf") == 4
    assert value(samples, f"{latency}_count", task_key="metrics.fail") == 1
    assert value(samples, f"{latency}_count", task_key="metrics.idle") == 0  # never delivered
    assert 0 <= value(samples, f"{latency}_sum", task_key="metrics.nap") < 4 * 10

    duration = "trioworker_task_run_duration_seconds"
    assert value(samples, f"{duration}_count", task_key="metrics.nap", state="COMPLETED") == 4
    # Every nap took 0.3 s on the worker: none is in the buckets up to 0.1 s.
    assert value(samples, f"{duration}_bucket", task_key="metrics.nap", state="COMPLETED", le="0.1") == 0
    assert value(samples, f"{duration}_sum", task_key="metrics.nap", state="COMPLETED") >= 4 * 0.2
    assert value(samples, f"{duration}_count", task_key="metrics.fail", state="FAILED") == 1
    assert value(samples, f"{duration}_count", task_key="metrics.idle", state="CANCELLED") == 0

    runs = "trioworker_task_runs"
    assert value(samples, runs, task_key="metrics.nap", state="COMPLETED") == 4
    assert value(samples, runs, task_key="metrics.fail", state="FAILED") == 1
    assert value(samples, runs, task_key="metrics.idle", state="CANCELLED") == 1
    assert value(samples, runs, task_key="metrics.idle", state="SCHEDULED") == 1
    age = value(samples, "trioworker_task_run_oldest_waiting_age_seconds", task_key="metrics.idle")
    assert 0 <= age < 60
    assert ("trioworker_task_run_oldest_waiting_age_seconds", (("task_key", "metrics.nap"),)) not in samples

    after, _ = await scrape(trioworker_server.url)  # the worker is gone
    assert value(after, "trioworker_subscriptions") == value(after, "trioworker_workers") == 0


@pytest.fixture
async def second_server() -> AsyncIterator[RunningServer]:
    async with trio.open_nursery() as nursery:
        yield await nursery.start(serve_server, ServerConfig(port=0, api_key="sesame"))
        nursery.cancel_scope.cancel()


async def test_two_servers_in_one_process_keep_their_own_metrics_and_a_key_guards_them(
    trioworker_server: RunningServer, api: httpx.AsyncClient, second_server: RunningServer
) -> None:
    await submit(api, "metrics.one", {}, {})
    first, _ = await scrape(trioworker_server.url)
    assert value(first, "trioworker_task_runs_created_total", task_key="metrics.one") == 2
    async with httpx.AsyncClient() as client:
        refused = await client.get(f"{second_server.url}/metrics")
        wrong = await client.get(f"{second_server.url}/metrics", headers={"Authorization": "Bearer nope"})
    assert refused.status_code == wrong.status_code == 401
    assert "API key" in refused.json()["detail"]
    second, _ = await scrape(second_server.url, Authorization="Bearer sesame")
    assert not [key for key in second if key[0] == "trioworker_task_runs_created_total"]
    assert value(second, "trioworker_task_runs", task_key="metrics.one", state="SCHEDULED") == 0


def test_the_oldest_waiting_age_is_measured_at_the_scrape() -> None:
    now = [1_000_000.0]
    dispatcher = Dispatcher(clock=lambda: now[0])
    since = datetime.fromtimestamp(now[0] - 90, UTC)
    key = TaskKeyOverview("k", {StateType.SCHEDULED: 3}, WaitingRun(uuid.uuid4(), "r", since))
    overview = Overview(datetime.fromtimestamp(now[0], UTC), [key], [], [], [])
    metrics = ServerMetrics()
    samples, _ = parse(metrics.exposition(overview, dispatcher).decode())
    assert value(samples, "trioworker_task_run_oldest_waiting_age_seconds", task_key="k") == 90
    assert value(samples, "trioworker_task_runs", task_key="k", state="SCHEDULED") == 3
    now[0] += 30  # the same (cached) overview, scraped later
    samples, _ = parse(metrics.exposition(overview, dispatcher).decode())
    assert value(samples, "trioworker_task_run_oldest_waiting_age_seconds", task_key="k") == 120
    assert ServerMetrics().registry is not metrics.registry


async def test_a_delayed_run_is_ready_since_its_scheduled_time() -> None:
    now = [500.0]
    dispatcher = Dispatcher(clock=lambda: now[0])
    delayed = QueuedRun(1, uuid.uuid4(), "k", 510.0)
    dispatcher.enqueue([delayed])
    now[0] = 525.0
    plain = QueuedRun(2, uuid.uuid4(), "k", None)
    dispatcher.enqueue([plain])
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.release_delayed_runs)  # releases what is due at once
        nursery.cancel_scope.cancel()
    sub = Subscription(client_id="w", keys=("k",), credit=5)
    dispatcher.subscribe(sub)
    assert dispatcher.take_timed(sub) == {delayed.id: 510.0, plain.id: 525.0}
