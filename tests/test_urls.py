"""One rule for API URLs: the URL the server prints (``http://host:port``) and ``.../api``,
with or without trailing slashes, reach the same API from workers, clients and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio

import trioworker
from trioworker.client.channel import channel_url
from trioworker.client.rest import SyncTaskRunClient, TaskRunClient
from trioworker.server import RunningServer
from trioworker.settings import api_root, socket_url
from trioworker.tasks import task
from trioworker.worker.subscription import websocket_url
from trioworker.worker.task_worker import TaskWorker


@task(key="urls.double")
async def double(x: int) -> int:
    return 2 * x


@pytest.mark.parametrize(
    ("given", "root"),
    [
        ("http://h:4300", "http://h:4300/api"),
        ("http://h:4300/", "http://h:4300/api"),
        ("http://h:4300/api", "http://h:4300/api"),
        ("http://h:4300/api/", "http://h:4300/api"),
        ("http://h:4300/api//", "http://h:4300/api"),
        ("  http://h:4300/api  ", "http://h:4300/api"),
        ("HTTP://h:4300", "http://h:4300/api"),
        ("https://queue.example.com", "https://queue.example.com/api"),
        ("https://example.com/queue/", "https://example.com/queue/api"),
        ("https://example.com/queue/api", "https://example.com/queue/api"),
        ("http://[::1]:4300", "http://[::1]:4300/api"),
    ],
)
def test_api_root(given: str, root: str) -> None:
    assert api_root(given) == root


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("localhost:4300/api", "must start with http:// or https://, got 'localhost:4300/api'"),
        ("ftp://h/api", "must start with http:// or https://"),
        ("http:/h/api", "must start with http:// or https://"),
        ("http://h:port/api", "has a port that is not a number from 0 to 65535"),
        ("http://h:99999", "has a port that is not a number from 0 to 65535"),
        ("http:///api", "has no host"),
        ("http://h/api?x=1", "takes no query or fragment"),
        ("http://h/api#top", "takes no query or fragment"),
    ],
)
def test_unusable_api_urls_are_one_clear_error(given: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^the API URL ") as caught:
        api_root(given)
    assert message in str(caught.value)
    for make in (websocket_url, channel_url, TaskRunClient, SyncTaskRunClient):
        with pytest.raises(ValueError, match=r"^the API URL "):
            make(given)
    with pytest.raises(ValueError, match=r"^the API URL "):
        TaskWorker(double, api_url=given)


@pytest.mark.parametrize("given", ["http://h:1", "http://h:1/", "http://h:1/api", "http://h:1/api/"])
def test_every_websocket_url_follows_the_rule(given: str) -> None:
    assert websocket_url(given) == "ws://h:1/api/task_runs/subscriptions/scheduled"
    assert channel_url(given) == "ws://h:1/api/task_runs/channel"
    assert socket_url(given.replace("http", "https", 1), "/x") == "wss://h:1/api/x"
    assert TaskRunClient(given).api_url == "http://h:1/api"
    assert TaskWorker(double, api_url=given).api_url == "http://h:1/api"


def spellings(server: RunningServer) -> list[str]:
    return [server.url, server.url + "/", server.api_url, server.api_url + "/"]


async def test_a_worker_and_a_client_work_with_the_printed_url(trioworker_server: RunningServer) -> None:
    for url in spellings(trioworker_server):
        async with TaskWorker(double, api_url=url, limit=2) as worker, trioworker.connect(url) as client:
            assert client.channel is not None  # the channel's websocket URL was right too
            future = await double.delay(21)
            assert await future.result(timeout=10) == 42
            assert worker.connected
            assert (await client.read_task_run(future.task_run_id)).task_key == "urls.double"


async def test_the_cli_takes_the_printed_url(trioworker_server: RunningServer) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRIOWORKER_API_URL", "TRIOWORKER_API_KEY")}
    for url in spellings(trioworker_server):
        with trio.fail_after(30):
            result = await trio.run_process(
                [sys.executable, "-m", "trioworker", "runs", "--api-url", url],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
            )
        assert result.returncode == 0, result.stderr.decode()
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "trioworker", "runs"],
            capture_stderr=True,
            stdout=subprocess.DEVNULL,
            check=False,
            env={**env, "TRIOWORKER_API_URL": trioworker_server.url + "/"},
        )
    assert result.returncode == 0, result.stderr.decode()
