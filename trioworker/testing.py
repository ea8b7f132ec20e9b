"""pytest plugin (registered as ``pytest11``): a real trioworker server inside the test's Trio run.

Fixtures:

``trioworker_server``
    A :class:`~trioworker.server.RunningServer` on a free loopback port with a fresh
    database (``trioworker_db``). While the test runs, ``TRIOWORKER_API_URL`` points at it.

``trioworker_server_control``
    A :class:`ServerControl` for tests that stop and start the server on the same database.

``trioworker_db``
    The server's database: a fresh SQLite file in ``tmp_path``. Override it to run the
    server elsewhere, e.g. on a PostgreSQL database: return a ``postgresql://`` URL (of an
    empty database or schema of the test's own; the server creates its tables).

``trioworker_worker``
    A factory: ``async with trioworker_worker(say, yell, limit=5) as worker:`` runs a real
    :class:`~trioworker.TaskWorker` against ``trioworker_server`` and stops it at the end.

``trioworker_autojump_clock``
    A ``MockClock`` that jumps to the next deadline once every task has been blocked for
    0.1 s of real time. Use it instead of pytest-trio's ``autojump_clock`` (threshold 0)
    when a real server runs in the test: that one jumps while a SQLite call or a socket
    read is still in flight, and fires timeouts that would never fire for real.

The server's dispatcher reads Trio's clock, so a mock clock also moves delayed runs and
retries along.

Both need pytest-trio (``trio_mode = true``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from trioworker.server import RunningServer, ServerConfig, serve_server
from trioworker.server.queue import trio_anchored_clock
from trioworker.tasks import Task
from trioworker.worker.task_worker import TaskWorker


@attrs.define(eq=False)
class ServerControl:
    """Starts and stops an in-process server; every start reuses the same database."""

    nursery: trio.Nursery
    config: ServerConfig
    running: RunningServer | None = None
    _scope: trio.CancelScope | None = None
    _stopped: trio.Event | None = None

    async def start(self, **changes: Any) -> RunningServer:
        """Start the server (``changes`` override config fields, e.g. ``port=``)."""
        if self.running is not None:
            raise RuntimeError("the server is already running; stop it first")
        config = attrs.evolve(self.config, **changes)
        stopped = trio.Event()

        async def run(*, task_status: trio.TaskStatus[tuple[trio.CancelScope, RunningServer]]) -> None:
            try:
                async with trio.open_nursery() as inner:
                    running = await inner.start(partial(serve_server, config))
                    task_status.started((inner.cancel_scope, running))
            finally:
                stopped.set()

        scope, running = await self.nursery.start(run)
        assert isinstance(running, RunningServer)
        self._scope, self._stopped, self.running = scope, stopped, running
        return running

    async def stop(self) -> None:
        """Stop the server abruptly (as a crash would) and wait until its database is closed."""
        if self._scope is None or self._stopped is None:
            raise RuntimeError("the server is not running")
        self._scope.cancel()
        await self._stopped.wait()
        self._scope = self._stopped = self.running = None

    async def restart(self) -> RunningServer:
        """Stop, then start again on the same port and database."""
        assert self.running is not None
        port = int(self.running.url.rsplit(":", 1)[1])
        await self.stop()
        return await self.start(port=port)


@pytest.fixture
def trioworker_db(tmp_path: Path) -> str | Path:
    return tmp_path / "trioworker.db"


@pytest.fixture
async def trioworker_server_control(
    trioworker_db: str | Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServerControl]:
    async with trio.open_nursery() as nursery:
        config = ServerConfig(db_path=trioworker_db, port=0, clock=trio_anchored_clock())
        control = ServerControl(nursery, config)
        monkeypatch.setenv("TRIOWORKER_HOME", str(tmp_path))
        yield control
        nursery.cancel_scope.cancel()


@pytest.fixture
async def trioworker_server(
    trioworker_server_control: ServerControl, monkeypatch: pytest.MonkeyPatch
) -> RunningServer:
    running = await trioworker_server_control.start()
    monkeypatch.setenv("TRIOWORKER_API_URL", running.api_url)
    monkeypatch.delenv("TRIOWORKER_API_KEY", raising=False)
    return running


@pytest.fixture
def trioworker_worker(trioworker_server: RunningServer) -> Callable[..., TaskWorker]:
    """``trioworker_worker(*tasks, **options)`` -> a TaskWorker for the test server.

    Use the result as ``async with``: the worker runs in the test until the block ends,
    then stops cleanly. A short grace period keeps tests quick.
    """

    def make(*tasks: Task[..., Any], **options: Any) -> TaskWorker:
        options.setdefault("api_url", trioworker_server.api_url)
        options.setdefault("shutdown_grace_seconds", 5.0)
        return TaskWorker(*tasks, **options)

    return make


#: Real seconds every task must be blocked before the clock jumps (I/O finishes well within).
AUTOJUMP_THRESHOLD = 0.1


@pytest.fixture
def trioworker_autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=AUTOJUMP_THRESHOLD)
