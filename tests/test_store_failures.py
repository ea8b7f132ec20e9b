"""The store's failure paths: a failed commit, a store that fails while a connection is
dropped at shutdown. The server answers with a clear error or finishes cleanly, and what it
had confirmed is still there afterwards. (Operations queued at or after close: see
``test_store_contract.py``.)

Failures are injected at the SQLite boundary only: COMMIT fails as on a full disk; the rest
is the real store, server and sockets.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trioworker.server import RunningServer, ServerConfig, serve_server
from trioworker.server.store import SQLiteStore
from trioworker.testing import ServerControl

from .helpers import submit
from .raw import subscribe

DEADLINE = 30


class FailingCommits:
    """The store's SQLite connection, whose next ``fail`` COMMITs fail as on a full disk."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.fail = 0
        self.failed = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.fail > 0 and sql == "COMMIT":
            self.fail -= 1
            self.failed += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def failing_commits(server: RunningServer) -> FailingCommits:
    store = server.service.store
    assert isinstance(store, SQLiteStore)
    proxy = FailingCommits(store._ops.conn)
    store._ops.conn = proxy  # type: ignore[assignment]
    return proxy


async def parameters_of_all(api_url: str) -> list[Any]:
    async with httpx.AsyncClient(base_url=api_url, timeout=DEADLINE) as api:
        return [run["parameters"] for run in (await api.get("/task_runs")).json()]


async def test_a_failed_commit_is_a_clear_error_and_loses_nothing_confirmed(
    trioworker_server_control: ServerControl, trioworker_server: RunningServer, api: httpx.AsyncClient
) -> None:
    [confirmed] = await submit(api, "k", {"n": 1})
    commits = failing_commits(trioworker_server)
    commits.fail = 1
    response = await api.post("/task_runs", json={"task_key": "k", "parameters": {"n": 2}})
    assert commits.failed == 1
    assert response.status_code == 503
    assert response.json()["detail"] == (
        "the server's store failed: the store could not commit: "
        "OperationalError('database or disk is full'); nothing of it was saved"
    )
    # The server goes on: the next request commits; the refused one left nothing behind.
    [after] = await submit(api, "k", {"n": 3})
    assert sorted(p["n"] for p in await parameters_of_all(trioworker_server.api_url)) == [1, 3]
    server = await trioworker_server_control.restart()
    assert sorted(p["n"] for p in await parameters_of_all(server.api_url)) == [1, 3]
    async with subscribe(server, ["k"], credit=2) as sub:
        got = await sub.runs()
        while len(got) < 2:
            got += await sub.runs()
    assert sorted(r["id"] for r in got) == sorted([confirmed, after])


async def test_a_failed_claim_commit_gives_the_run_to_the_next_subscriber(
    trioworker_server: RunningServer, api: httpx.AsyncClient
) -> None:
    [run_id] = await submit(api, "k", {"n": 1})
    commits = failing_commits(trioworker_server)
    commits.fail = 1  # the claim of the delivery
    with trio.fail_after(DEADLINE):
        async with subscribe(trioworker_server, ["k"], credit=1, client_id="first") as first:
            with pytest.raises(Exception):  # noqa: B017 - a delivery, then the close, or the close alone
                while True:
                    await first.receive()
        assert commits.failed == 1
        async with subscribe(trioworker_server, ["k"], credit=1, client_id="second") as second:
            [run] = await second.runs()
            assert run["id"] == run_id
            await second.finish([run_id])
    state = (await api.get(f"/task_runs/{run_id}")).json()["state"]
    assert state["type"] == "COMPLETED"


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


async def test_a_store_failing_while_a_connection_is_dropped_at_shutdown(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = ServerConfig(db_path=tmp_path / "db.sqlite", port=0)
    shutdown, stopped = trio.Event(), trio.Event()

    async def run(*, task_status: trio.TaskStatus[RunningServer]) -> None:
        await serve_server(config, shutdown=shutdown, task_status=task_status)
        stopped.set()  # returned, not raised

    server: RunningServer = await nursery.start(run)
    async with httpx.AsyncClient(base_url=server.api_url, timeout=DEADLINE) as api:
        [held, queued] = await submit(api, "k", {"n": 1}, {"n": 2})
    commits = failing_commits(server)
    async with subscribe(server, ["k"], credit=1) as sub:
        assert [r["id"] for r in await sub.runs()] == [held]
        await sub.report([held], "RUNNING")
        commits.fail = 10  # handing back what the connection held fails
        shutdown.set()
        with trio.fail_after(DEADLINE), pytest.raises(Exception):  # noqa: B017 - closed with 1012
            await sub.ws.get_message()
    with trio.fail_after(DEADLINE):
        await stopped.wait()  # the server finished cleanly all the same
    assert commits.failed >= 1
    # The next start hands the held run out again, ahead of the queued one: nothing lost.
    restarted: RunningServer = await nursery.start(partial(serve_server, config))
    async with subscribe(restarted, ["k"], credit=2) as sub:
        got = await sub.runs()
        while len(got) < 2:
            got += await sub.runs()
    assert [r["id"] for r in got] == [held, queued]
    assert got[0]["state"]["type"] == "PENDING" and got[0]["delivery_count"] == 2
