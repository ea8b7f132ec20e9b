"""The server's Prometheus metrics, served as text at ``GET /metrics``.

Each server has its own :class:`ServerMetrics` (its service's), with its own
``prometheus_client`` registry: nothing is registered in the library's global default
registry, so two servers in one process never share a series.

What the service counts as it happens (kept in the registry):

- ``trioworker_task_runs_created_total{task_key}``: runs created here (a repeated create
  that an idempotency key or an id answers with the existing run is not counted);
- ``trioworker_task_runs_ended_total{task_key,state}``: runs that reached a terminal state
  through this server (COMPLETED, FAILED, CANCELLED, CRASHED);
- ``trioworker_task_run_delivery_latency_seconds{task_key}`` (histogram): from the moment a
  run was ready (queued when created or handed back, or its scheduled time when it was
  delayed) to its delivery to a worker;
- ``trioworker_task_run_duration_seconds{task_key,state}`` (histogram): from the run's last
  RUNNING to its end, for runs that started and ended through this server.

What is read when scraped (nothing kept): runs by task key and state
(``trioworker_task_runs{task_key,state}``) and the age of the run first in line
(``trioworker_task_run_oldest_waiting_age_seconds{task_key}``), both from the overview the
dashboard shares (:meth:`~trioworker.server.service.TaskRunService.overview`, throttled), and
from the dispatcher's memory: ``trioworker_subscriptions``, ``trioworker_workers`` and
``trioworker_task_workers{task_key}``.

The ``_created`` series ``prometheus_client`` adds to counters and histograms (a creation
timestamp per label set) are left out: they double the series and say nothing here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Final

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from trioworker.models import StateType, TaskRun
from trioworker.server.overview import Overview
from trioworker.server.queue import Dispatcher

#: Where the server serves the metrics (outside ``/api``, where scrapers look).
METRICS_ROUTE: Final = "/metrics"
#: The Prometheus text exposition format, version 0.0.4.
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
#: Upper bounds (seconds) of the delivery latency's buckets.
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
#: Upper bounds (seconds) of the run duration's buckets.
DURATION_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
    4 * 3600,
)
#: Most runs whose start is remembered for their duration (beyond that, runs that start
#: are not timed until some end).
MAX_TIMED_RUNS: Final = 100_000


@attrs.define(eq=False)
class ServerMetrics:
    """One server's metrics: what its service tells it, and the text of a scrape."""

    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    #: When each run running here started (its RUNNING state's time).
    _running_since: dict[uuid.UUID, datetime] = attrs.field(factory=dict)
    created: Counter = attrs.field(init=False)
    ended: Counter = attrs.field(init=False)
    delivery_latency: Histogram = attrs.field(init=False)
    run_duration: Histogram = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        registry = self.registry
        self.created = Counter(
            "trioworker_task_runs_created", "Runs created", ["task_key"], registry=registry
        )
        self.ended = Counter(
            "trioworker_task_runs_ended",
            "Runs that reached a terminal state",
            ["task_key", "state"],
            registry=registry,
        )
        self.delivery_latency = Histogram(
            "trioworker_task_run_delivery_latency_seconds",
            "Seconds from a run being ready (created, handed back, or its scheduled time) to its "
            "delivery to a worker",
            ["task_key"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.run_duration = Histogram(
            "trioworker_task_run_duration_seconds",
            "Seconds from a run's last RUNNING to its end",
            ["task_key", "state"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )

    # -- what the service reports
    def runs_created(self, runs: Iterable[TaskRun]) -> None:
        """These runs were just created."""
        for run in runs:
            self.created.labels(run.task_key).inc()

    def runs_delivered(
        self, runs: Sequence[TaskRun], ready_since: Mapping[uuid.UUID, float], now: float
    ) -> None:
        """These runs are being sent to a worker at ``now``; ``ready_since`` says since when
        each was ready (both epoch seconds on the dispatcher's clock)."""
        for run in runs:
            since = ready_since.get(run.id)
            if since is not None:
                self.delivery_latency.labels(run.task_key).observe(max(0.0, now - since))

    def runs_changed(self, runs: Iterable[TaskRun]) -> None:
        """These runs changed state (each as the change left it, in the order applied)."""
        for run in runs:
            state = run.state
            if state.type is StateType.RUNNING:
                if run.id in self._running_since or len(self._running_since) < MAX_TIMED_RUNS:
                    self._running_since[run.id] = state.timestamp
            elif state.type.is_terminal:
                self.ended.labels(run.task_key, state.type.value).inc()
                started = self._running_since.pop(run.id, None)
                if started is not None:
                    seconds = (state.timestamp - started).total_seconds()
                    self.run_duration.labels(run.task_key, state.type.value).observe(max(0.0, seconds))
            else:
                self._running_since.pop(run.id, None)

    def forget(self, run_ids: Iterable[uuid.UUID]) -> None:
        """These runs stopped running without ending (handed back, deleted): their start is dropped."""
        for run_id in run_ids:
            self._running_since.pop(run_id, None)

    # -- a scrape
    def exposition(self, overview: Overview, dispatcher: Dispatcher) -> bytes:
        """The text of a scrape: what was counted, the counts of ``overview``, ages measured
        at the dispatcher's time now, and the subscriptions of ``dispatcher``."""
        return generate_latest(_Scrape(self.registry, overview, dispatcher))


@attrs.frozen
class _Scrape:
    """A collector for one scrape: the kept metrics and those read now."""

    registry: CollectorRegistry
    overview: Overview
    dispatcher: Dispatcher

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric
        runs = GaugeMetricFamily(
            "trioworker_task_runs", "Runs in the store by task key and state", labels=["task_key", "state"]
        )
        oldest = GaugeMetricFamily(
            "trioworker_task_run_oldest_waiting_age_seconds",
            "How long the run first in line (the due SCHEDULED run created first) has waited",
            labels=["task_key"],
        )
        now = self.dispatcher.clock()
        for key in self.overview.task_keys:
            for state, count in key.counts.items():
                runs.add_metric([key.task_key, state.value], count)
            if key.oldest_waiting is not None:
                oldest.add_metric([key.task_key], max(0.0, now - key.oldest_waiting.since.timestamp()))
        yield runs
        yield oldest
        subs = self.dispatcher.subscriptions
        yield GaugeMetricFamily(
            "trioworker_subscriptions", "Worker connections subscribed to this server", value=len(subs)
        )
        yield GaugeMetricFamily(
            "trioworker_workers",
            "Workers (distinct client ids) subscribed to this server",
            value=len({sub.client_id for sub in subs}),
        )
        by_key = GaugeMetricFamily(
            "trioworker_task_workers",
            "Workers subscribed to this server that take runs of the task key",
            labels=["task_key"],
        )
        per_key: dict[str, set[str]] = {}
        for sub in subs:
            for key_name in sub.keys:
                per_key.setdefault(key_name, set()).add(sub.client_id)
        for key_name, clients in sorted(per_key.items()):
            by_key.add_metric([key_name], len(clients))
        yield by_key
