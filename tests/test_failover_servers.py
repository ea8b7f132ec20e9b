"""Several servers, for real: two in-process servers (each on its own SQLite file), a worker
and a client pointed at both, and the command line.

Two SQLite servers share no runs (each has its own database), so these tests show the
moving, not shared state: a run made on A is run and read through A, one made after A
stopped is made, run and read through B. (Replicas on one PostgreSQL database share them.)
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio

import trioworker
from trioworker.cli import build_parser
from trioworker.cli._common import api_roots_of
from trioworker.client.rest import TaskRunClient
from trioworker.errors import ApiError, NotFound, SubscriptionRefused
from trioworker.server import RunningServer, ServerConfig, serve_server
from trioworker.server.queue import trio_anchored_clock
from trioworker.tasks import task
from trioworker.worker.task_worker import TaskWorker

from .test_cli_tools import make_cli, one_error_line


@task(key="failover.double")
async def double(x: int) -> int:
    return 2 * x


@attrs.define(eq=False)
class Replica:
    """One in-process server: :meth:`stop` stops it as SIGTERM does (its sockets close
    with 1012), :meth:`kill` as a crash does (they just drop)."""

    server: RunningServer
    shutdown: trio.Event
    scope: trio.CancelScope
    stopped: trio.Event

    @property
    def api_url(self) -> str:
        return self.server.api_url

    async def stop(self) -> None:
        self.shutdown.set()
        await self.stopped.wait()

    async def kill(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()

    async def has(self, run_id: uuid.UUID) -> bool:
        return await self.server.service.read_run(run_id) is not None


async def start_replica(nursery: trio.Nursery, db_path: Path, api_key: str | None = None) -> Replica:
    config = ServerConfig(db_path=db_path, port=0, api_key=api_key, clock=trio_anchored_clock())
    shutdown, stopped = trio.Event(), trio.Event()

    async def run(*, task_status: trio.TaskStatus[tuple[trio.CancelScope, RunningServer]]) -> None:
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as inner:
                    server = await inner.start(partial(serve_server, config, shutdown=shutdown))
                    task_status.started((scope, server))
        finally:
            stopped.set()

    scope, server = await nursery.start(run)
    return Replica(server, shutdown, scope, stopped)


@pytest.fixture
async def replicas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Replica, Replica]]:
    """Replicas A and B (each on its own database), in the test's Trio run."""
    monkeypatch.setenv("TRIOWORKER_HOME", str(tmp_path))
    monkeypatch.delenv("TRIOWORKER_API_KEY", raising=False)
    async with trio.open_nursery() as nursery:
        a = await start_replica(nursery, tmp_path / "a.db")
        b = await start_replica(nursery, tmp_path / "b.db")
        monkeypatch.setenv("TRIOWORKER_API_URL", f"{a.api_url},{b.api_url}")
        yield a, b
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_a_worker_and_a_client_move_to_the_next_server_when_theirs_goes(
    replicas: tuple[Replica, Replica], how: str
) -> None:
    a, b = replicas
    urls = [a.api_url, b.api_url]
    async with TaskWorker(double, api_url=urls, limit=2) as worker, trioworker.connect(urls) as client:
        assert client.channel is not None
        with trio.fail_after(20):
            before = await double.delay(21)
            assert await before.result() == 42
        assert await a.has(before.task_run_id) and not await b.has(before.task_run_id)
        assert (worker.api_url, client.api_url) == (a.api_url, a.api_url)

        await (a.stop() if how == "stop" else a.kill())
        with trio.fail_after(20):
            after = await double.delay(4)  # made on B (A is gone) ...
            assert await after.result() == 8  # ... and run by the worker, now on B
        assert await b.has(after.task_run_id)
        assert (worker.api_url, client.api_url) == (b.api_url, b.api_url)
        assert worker.connected
        runs = await client.read_task_runs()
        assert [run.id for run in runs] == [after.task_run_id]  # read from B
        assert worker.api_urls == client.api_urls == (a.api_url, b.api_url)


async def test_a_dead_first_server_is_skipped(replicas: tuple[Replica, Replica], refused_port: int) -> None:
    _, b = replicas
    urls = f"http://127.0.0.1:{refused_port},{b.server.url}"
    async with TaskWorker(double, api_url=urls) as worker, trioworker.connect(urls) as client:
        assert client.channel is not None  # opened on B
        with trio.fail_after(20):
            future = await double.delay(5)
            assert await future.result() == 10
        assert await b.has(future.task_run_id)
        assert worker.api_url == client.api_url == b.api_url


async def test_an_unknown_run_or_a_refused_key_does_not_fail_over(
    replicas: tuple[Replica, Replica], tmp_path: Path
) -> None:
    a, b = replicas
    async with TaskRunClient([a.api_url, b.api_url]) as client:
        with pytest.raises(NotFound):
            await client.read_task_run(uuid.uuid4())
        assert client.api_url == a.api_url
    async with trio.open_nursery() as nursery:
        keyed = await start_replica(nursery, tmp_path / "keyed.db", api_key="sekrit")
        urls = [keyed.api_url, b.api_url]
        async with TaskRunClient(urls, "wrong") as client:
            with pytest.raises(ApiError) as caught:
                await client.read_task_runs()
            assert caught.value.status_code == 401
            assert client.api_url == keyed.api_url
        worker = TaskWorker(double, api_url=urls, api_key="wrong")
        with trio.fail_after(20), pytest.raises(SubscriptionRefused, match=f"at {keyed.api_url} refused"):
            await worker.start()
        assert worker.api_url == keyed.api_url
        nursery.cancel_scope.cancel()


# -- the command line


@pytest.mark.parametrize("command", [["worker", "m:t"], ["runs"], ["run", "x"], ["submit", "m:t"]])
def test_api_url_is_repeatable_and_takes_lists(command: list[str]) -> None:
    args = build_parser().parse_args(
        [*command, "--api-url", "http://a:1", "--api-url", "http://b:2/api,http://c:3"]
    )
    assert args.api_url == "http://a:1,http://b:2/api,http://c:3"
    assert api_roots_of(args) == ("http://a:1/api", "http://b:2/api", "http://c:3/api")


async def test_commands_use_the_next_server_and_say_which_failed(
    replicas: tuple[Replica, Replica], refused_port: int
) -> None:
    _, b = replicas
    dead = f"http://127.0.0.1:{refused_port}"
    cli = make_cli(f"{dead},{b.server.url}")  # TRIOWORKER_API_URL, comma-separated
    results = [await cli("runs"), await cli("runs", "--api-url", dead, "--api-url", b.server.url)]
    assert [result.returncode for result in results] == [0, 0], [r.stderr for r in results]

    line = one_error_line(await cli("runs", "--api-url", f"{dead},ftp://b"))
    assert line == (
        "trioworker: unusable API URL from --api-url: the API URL must start with http:// or "
        f"https://, got 'ftp://b' (entry 2 of the API URL list '{dead}, ftp://b')"
    )
    env_line = one_error_line(await make_cli(f"{dead},,{b.server.url}")("runs"))
    assert env_line.startswith("trioworker: unusable API URL from TRIOWORKER_API_URL: ")
    assert env_line.endswith("has an empty entry (entry 2)")

    other_dead = f"http://127.0.0.1:{refused_port}/other"
    line = one_error_line(await cli("runs", "--api-url", f"{dead},{other_dead}"))
    assert line.startswith(
        f"trioworker: cannot reach the trioworker servers at {dead}/api, {other_dead}/api: "
    )
