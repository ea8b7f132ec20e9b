"""The worker's optional status server: ``/status``, ``/health`` and ``/metrics``.

:meth:`TaskWorker.start() <trioworker.worker.TaskWorker.start>` runs :func:`serve_status`
in its own nursery when given ``status_server_port``, so the server lives exactly as long
as the worker: cancellation is how it stops, and nothing it opens outlives it. The worker
imports this module (and with it quart and hypercorn) only then.

Every route reads one :class:`~trioworker.worker.statistics.WorkerStatistics`, taken
synchronously on the Trio thread: a response is a consistent snapshot without any
locking. This module knows nothing else of the worker.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import orjson
import trio
from quart import Response
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioworker._http import serve_app
from trioworker.models import JSON
from trioworker.settings import DEFAULT_STATUS_HOST
from trioworker.worker.statistics import WorkerStatistics

log = logging.getLogger("trioworker.worker.status")

#: The Prometheus text exposition format, version 0.0.4.
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def _json_response(payload: JSON, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status=status, content_type="application/json")


def status_payload(stats: WorkerStatistics) -> dict[str, JSON]:
    """The ``/status`` document; the field names are those of Prefect's task stats."""
    available = stats.available_tasks
    return {
        "client_id": stats.client_id,
        "started_at": stats.started_at.isoformat() if stats.started_at is not None else None,
        "stopping": stats.stopping,
        "connected": stats.connected,
        "limit": stats.limit,
        "prefetch": stats.prefetch,
        "current": stats.current_tasks,
        # JSON has no infinity: an unlimited worker says null, as its limit does.
        "available": None if math.isinf(available) else int(available),
        "tasks": list(stats.task_keys),
        "finished": dict(stats.finished_task_runs),
        "in_flight": {
            key: {str(run_id): started.isoformat() for run_id, started in runs.items()}
            for key, runs in stats.in_flight_task_runs.items()
        },
    }


def escape_label_value(value: str) -> str:
    """Escape a label value for the text format (backslash, double quote, newline).

    Task keys are user strings; one unescaped quote would make the whole scrape fail.
    """
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], float]]
) -> list[str]:
    """One metric family: its HELP and TYPE lines, then a line per sample."""
    help_escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    lines = [f"# HELP {name} {help_escaped}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        label_text = ",".join(f'{label}="{escape_label_value(v)}"' for label, v in labels.items())
        selector = f"{name}{{{label_text}}}" if label_text else name
        lines.append(f"{selector} {_format_value(value)}")
    return lines


def render_metrics(stats: WorkerStatistics) -> str:
    """The ``/metrics`` page in the Prometheus text format, written by hand (no dependency)."""
    keys = stats.task_keys

    def per_key(counts: Mapping[str, int]) -> list[tuple[Mapping[str, str], float]]:
        return [({"task_key": key}, counts.get(key, 0)) for key in keys]

    in_flight = {key: len(stats.in_flight_task_runs.get(key, {})) for key in keys}
    limit = math.inf if stats.limit is None else stats.limit
    lines = [
        *_family(
            "trioworker_task_runs_started_total",
            "counter",
            "Task runs this worker started running, per task key.",
            per_key(stats.started_task_runs),
        ),
        *_family(
            "trioworker_task_runs_finished_total",
            "counter",
            "Task runs that ended on this worker (completed, failed, retrying or cancelled).",
            per_key(stats.finished_task_runs),
        ),
        *_family(
            "trioworker_task_runs_failed_total",
            "counter",
            "Task runs that ended FAILED on this worker, per task key.",
            per_key(stats.failed_task_runs),
        ),
        *_family(
            "trioworker_task_runs_in_flight",
            "gauge",
            "Task runs running on this worker right now, per task key.",
            per_key(in_flight),
        ),
        *_family(
            "trioworker_limiter_tokens_total",
            "gauge",
            "The most runs this worker runs at once (+Inf: no limit).",
            [({}, limit)],
        ),
        *_family(
            "trioworker_limiter_tokens_borrowed",
            "gauge",
            "Runs holding a slot of the worker's limiter right now.",
            [({}, stats.current_tasks)],
        ),
        *_family(
            "trioworker_worker_up",
            "gauge",
            "1 while the worker takes runs, 0 once it is stopping.",
            [({}, 0 if stats.stopping else 1)],
        ),
        *_family(
            "trioworker_worker_connected",
            "gauge",
            "1 while the worker holds a live subscription to the server, else 0.",
            [({}, 1 if stats.connected else 0)],
        ),
    ]
    return "\n".join(lines) + "\n"


def create_status_app(statistics: Callable[[], WorkerStatistics]) -> QuartTrio:
    """The status app of a worker (``statistics``: e.g. ``worker.statistics``, called once
    per request); separate from :func:`serve_status` so tests can call it."""
    app = QuartTrio("trioworker.worker.status")

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        # Unknown routes and methods answer in JSON like every other route.
        return _json_response({"detail": exc.description or exc.name}, exc.code or 500)

    @app.get("/status")
    async def status() -> Response:
        return _json_response(status_payload(statistics()))

    @app.get("/health")
    async def health() -> Response:
        # 503 unless the worker can take runs: while stopping, and while it holds no live
        # subscription (not yet connected, or the server is gone and it is reconnecting).
        stats = statistics()
        if stats.stopping:
            return _json_response({"status": "stopping", "connected": stats.connected}, 503)
        if not stats.connected:
            return _json_response({"status": "disconnected", "connected": False}, 503)
        return _json_response({"status": "ok", "connected": True})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(statistics()), status=200, content_type=METRICS_CONTENT_TYPE)

    return app


async def serve_status(
    statistics: Callable[[], WorkerStatistics],
    port: int,
    host: str = DEFAULT_STATUS_HOST,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the status app of a worker on ``host:port`` until cancelled (``statistics``:
    see :func:`create_status_app`).

    ``host`` is ``127.0.0.1`` by default (this machine only); ``0.0.0.0`` or ``::`` let a
    probe on another host reach it.

    Reports the URL it listens on (``port=0`` picks a free port, so only the bound socket
    knows it). A host that does not resolve or a port in use raises ``OSError`` from
    ``nursery.start``, one line naming ``--status-host`` (or ``--status-port``) and the
    value, so the worker fails at start instead of running without the server it was
    asked for.
    """
    label = f"worker {statistics().client_id} status server"
    await serve_app(
        create_status_app(statistics),
        host,
        port,
        label=label,
        settings=("--status-host", "--status-port"),
        role="status server",
        task_status=task_status,
    )
