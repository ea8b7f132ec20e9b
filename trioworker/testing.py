"""pytest plugin (registered as ``pytest11``): a real trioworker server inside the test's Trio run.

Fixtures:

``trioworker_server``
    A :class:`~trioworker.server.RunningServer` on a free loopback port with a fresh
    SQLite file in ``tmp_path``. While the test runs, ``TRIOWORKER_API_URL`` points at it.

``trioworker_server_control``
    A :class:`ServerControl` for tests that stop and start the server on the same file.

Both need pytest-trio (``trio_mode = true``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from trioworker.server import RunningServer, ServerConfig, serve_server


@attrs.define(eq=False)
class ServerControl:
    """Starts and stops an in-process server; every start reuses the same database file."""

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
        """Stop, then start again on the same port and file."""
        assert self.running is not None
        port = int(self.running.url.rsplit(":", 1)[1])
        await self.stop()
        return await self.start(port=port)


@pytest.fixture
async def trioworker_server_control(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServerControl]:
    async with trio.open_nursery() as nursery:
        control = ServerControl(nursery, ServerConfig(db_path=tmp_path / "trioworker.db", port=0))
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
