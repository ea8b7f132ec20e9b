"""The task-run server: a durable queue (SQLite), a REST API and the subscription websocket.

Only the CLI, the pytest plugin and tests import this package; workers and submitters
talk to it over the wire.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from trioworker.server.app import create_app
from trioworker.server.queue import Dispatcher, WallClock
from trioworker.server.service import TaskRunService
from trioworker.server.store import SQLiteStore
from trioworker.settings import DEFAULT_HOST, DEFAULT_PORT

log = logging.getLogger("trioworker.server")

#: Seconds open requests and sockets get to finish when the server stops.
GRACEFUL_SECONDS: Final = 2.0


@attrs.frozen
class ServerConfig:
    """How to run the server. ``port=0`` picks a free port (the tests do)."""

    db_path: str | Path = ":memory:"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    max_deliveries: int = 5
    #: The dispatcher's clock (epoch seconds); the default is the real wall clock.
    clock: WallClock | None = None


@attrs.frozen
class RunningServer:
    """What :func:`serve_server` hands to ``nursery.start``'s caller."""

    url: str
    service: TaskRunService

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


async def serve_server(
    config: ServerConfig,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API until ``shutdown`` is set (or until cancelled).

    Starts with ``nursery.start``: it reports a :class:`RunningServer` once the store is
    open, the queues are rebuilt from it and the socket listens.

    **Resource handling:** the store, the delayed-run timer and the HTTP server all live in
    this call's nursery; when it returns, the database is closed.

    **Stopping:** setting ``shutdown`` closes every subscription with 1012 (so workers
    reconnect elsewhere or later) and gives requests :data:`GRACEFUL_SECONDS` to finish.
    """
    closing = trio.Event()
    async with SQLiteStore.open(config.db_path) as store:
        dispatcher = Dispatcher(clock=config.clock) if config.clock else Dispatcher()
        service = TaskRunService(store, dispatcher, max_deliveries=config.max_deliveries)
        queued = await service.recover()
        app = create_app(
            service, api_key=config.api_key, max_body_bytes=config.max_body_bytes, closing=closing
        )
        hconfig = HypercornConfig()
        hconfig.bind = [f"{config.host}:{config.port}"]
        hconfig.accesslog = None
        hconfig.errorlog = logging.getLogger("hypercorn.error")
        hconfig.graceful_timeout = GRACEFUL_SECONDS
        hconfig.websocket_max_message_size = config.max_body_bytes

        async def shutdown_trigger() -> None:
            if shutdown is None:
                await trio.sleep_forever()
            else:
                await shutdown.wait()
            closing.set()

        async with trio.open_nursery() as nursery:

            async def run_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
                await hypercorn_serve(
                    app, hconfig, shutdown_trigger=shutdown_trigger, task_status=task_status
                )
                nursery.cancel_scope.cancel()  # hypercorn stopped: so does the timer

            await nursery.start(dispatcher.release_delayed_runs)
            binds: list[str] = await nursery.start(run_http)
            url = binds[0]
            log.info(
                "trioworker server listening on %s (database %s, %d runs queued)", url, config.db_path, queued
            )
            task_status.started(RunningServer(url=url, service=service))
