"""The task-run server: a durable queue (SQLite or PostgreSQL), a REST API and the subscription websocket.

Only the CLI, the pytest plugin and tests import this package; workers and submitters
talk to it over the wire.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import attrs
import trio

from trioworker._http import serve_app
from trioworker.protocol import api_root
from trioworker.server.app import create_app
from trioworker.server.guard import Exposure, exposure
from trioworker.server.limits import QueueLimit
from trioworker.server.queue import Dispatcher, WallClock
from trioworker.server.replicas import Replica
from trioworker.server.retention import keep_retention
from trioworker.server.schedules import keep_schedules
from trioworker.server.service import TaskRunService
from trioworker.server.store import SharedStore, open_store
from trioworker.settings import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_REPLICA_TIMEOUT_SECONDS,
    DEFAULT_RETENTION_SECONDS,
)

log = logging.getLogger("trioworker.server")


@attrs.frozen
class ServerConfig:
    """How to run the server. ``port=0`` picks a free port (the tests do)."""

    #: The database: a SQLite file (or ``":memory:"``, or a ``sqlite://`` URL), or a
    #: ``postgresql://`` URL (see :func:`~trioworker.server.store.open_store`).
    db_path: str | Path = ":memory:"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    max_deliveries: int = 5
    #: On PostgreSQL (which several servers may share): seconds this server may go without
    #: a heartbeat before the others hand back its runs (and it closes its sockets).
    replica_timeout: float = attrs.field(
        default=DEFAULT_REPLICA_TIMEOUT_SECONDS, validator=attrs.validators.gt(0)
    )
    #: Seconds a run is kept after it ended (then it is deleted with its history); 0 keeps
    #: every run.
    retention: float = attrs.field(default=DEFAULT_RETENTION_SECONDS, validator=attrs.validators.ge(0))
    #: The origins (``http(s)://host[:port]``) of other web pages allowed to change things
    #: and open websockets; pages of the server's own origin always may (see
    #: :mod:`~trioworker.server.guard`).
    allowed_origins: tuple[str, ...] = ()
    #: The dispatcher's clock (epoch seconds); the default is the real wall clock.
    clock: WallClock | None = None
    #: At most this many runs of one task key wait for a worker; a create beyond it answers
    #: 429 (see :mod:`~trioworker.server.limits`). None: no bound.
    max_queued: int | None = None
    #: Serve over TLS (``https://``, ``wss://``) with this certificate (chain) and its
    #: private key, PEM files; both or neither.
    certfile: str | Path | None = None
    keyfile: str | Path | None = None

    def __attrs_post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together: give both, or neither")


@attrs.frozen
class RunningServer:
    """What :func:`serve_server` hands to ``nursery.start``'s caller."""

    url: str
    service: TaskRunService

    @property
    def api_url(self) -> str:
        return api_root(self.url)


async def serve_server(
    config: ServerConfig,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API until ``shutdown`` is set (or until cancelled).

    Starts with ``nursery.start``: it reports a :class:`RunningServer` once the store is
    open, the queues are rebuilt from it and the socket listens.

    **Resource handling:** the store, the delayed-run timer, the retention task (see
    :mod:`~trioworker.server.retention`), the schedule timer (see
    :mod:`~trioworker.server.schedules`) and the HTTP server all live in this call's
    nursery; when it returns, the database is closed. On PostgreSQL, so do the tasks of
    :class:`~trioworker.server.replicas.Replica` (heartbeat, listener): the server is one
    of those sharing the database, and recovers at start only what dead ones held.

    **Stopping:** setting ``shutdown`` closes every subscription with 1012 (so workers
    reconnect elsewhere or later) and gives requests :data:`trioworker._http.GRACEFUL_SECONDS`
    to finish; on PostgreSQL the server's row is deleted then. Cancelled, it leaves its row,
    which the other servers find dead after ``replica_timeout`` (as if it had crashed).
    """
    closing = trio.Event()
    async with open_store(config.db_path) as store:
        shared = isinstance(store, SharedStore)
        dispatcher = Dispatcher(clock=config.clock or time.time, shared=shared)
        service = TaskRunService(
            store,
            dispatcher,
            max_deliveries=config.max_deliveries,
            queue_limit=QueueLimit(config.max_queued),
        )
        replica = None
        if isinstance(store, SharedStore):
            replica = Replica(store, service, config.replica_timeout)
            await replica.register()
        queued = await service.recover()
        app = create_app(
            service,
            api_key=config.api_key,
            max_body_bytes=config.max_body_bytes,
            closing=closing,
            allowed_origins=config.allowed_origins,
            loopback_only=await exposure(config.host) is Exposure.LOOPBACK,
        )

        async def shutdown_trigger() -> None:
            if shutdown is None:
                await trio.sleep_forever()
            else:
                await shutdown.wait()
            closing.set()

        async with trio.open_nursery() as nursery:

            async def run_http(*, task_status: trio.TaskStatus[str]) -> None:
                await serve_app(
                    app,
                    config.host,
                    config.port,
                    certfile=None if config.certfile is None else str(config.certfile),
                    keyfile=None if config.keyfile is None else str(config.keyfile),
                    label="trioworker server",
                    shutdown_trigger=shutdown_trigger,
                    websocket_max_message_size=config.max_body_bytes,
                    settings=("--host", "--port"),
                    tls_settings=("--certfile", "--keyfile"),
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()  # the HTTP server stopped: so do the timers

            await nursery.start(dispatcher.release_delayed_runs)
            if replica is not None:
                await nursery.start(replica.run)
            if config.retention > 0:
                await nursery.start(keep_retention, service, config.retention)
            await nursery.start(keep_schedules, service)
            url: str = await nursery.start(run_http)
            service.url = url
            if replica is not None:
                await replica.register(url)
                log.info("server %s among those sharing the database", replica.id)
            log.info("database %s, %d runs queued", store.location, queued)
            task_status.started(RunningServer(url=url, service=service))
        if replica is not None:
            await replica.unregister()
