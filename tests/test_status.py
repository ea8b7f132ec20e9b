"""The worker's status server end to end: a real server, a real worker, real HTTP."""

from __future__ import annotations

import errno
import re
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

from trioworker.server import RunningServer
from trioworker.tasks import Task, task
from trioworker.testing import ServerControl
from trioworker.worker.status import (
    METRICS_CONTENT_TYPE,
    create_status_app,
    escape_label_value,
    render_metrics,
    serve_status,
)
from trioworker.worker.task_worker import TaskWorker

from .test_cli_worker import TASKS_FILE, start_worker, worker_command, worker_env

Labels = tuple[tuple[str, str], ...]


@task(key="status.ok")
async def ok(x: int) -> int:
    return x + 1


@task(key="status.boom")
async def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


def blocking_task() -> tuple[Task[[int], int], trio.Event, trio.Event]:
    """A task that signals ``running`` and then waits for ``release``: a run we control."""
    running, release = trio.Event(), trio.Event()

    @task(key="status.block")
    async def block(x: int) -> int:
        running.set()
        await release.wait()
        return x

    return block, running, release


# -- helpers


async def submit(api: httpx.AsyncClient, key: str, *xs: int) -> list[str]:
    response = await api.post(
        "/task_runs/batch", json=[{"task_key": key, "parameters": {"x": x}} for x in xs]
    )
    assert response.status_code == 201, response.text
    return [run["id"] for run in response.json()]


async def wait_ended(api: httpx.AsyncClient, ids: list[str]) -> list[dict[str, Any]]:
    response = await api.post("/task_runs/wait", json={"ids": ids, "timeout": 10, "all": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["pending"] == [] and body["missing"] == [], body
    ended: list[dict[str, Any]] = body["ended"]
    return ended


async def status_until(
    client: httpx.AsyncClient, predicate: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """``/status`` once ``predicate`` holds.

    The server answers a waiter as soon as it accepts the final state, concurrently with
    telling the worker; the worker counts the run only when that answer reaches it. So
    the counters trail ``/task_runs/wait`` by a moment: look again (no sleep; between
    looks every task is let run until blocked) until they catch up.
    """
    with trio.fail_after(10):
        while True:
            body: dict[str, Any] = (await client.get("/status")).json()
            if predicate(body):
                return body
            await trio.testing.wait_all_tasks_blocked()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_labels(text: str) -> Labels:
    labels: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        match = _LABEL.match(text, position)
        assert match is not None, f"bad labels at {text[position:]!r}"
        value = re.sub(r"\\.", lambda m: _UNESCAPE[m.group(0)], match.group(2))
        labels.append((match.group(1), value))
        position = match.end()
    return tuple(labels)


def parse_metrics(text: str) -> tuple[dict[tuple[str, Labels], float], dict[str, str], dict[str, str]]:
    """Samples ``(name, labels) -> value``, then HELP and TYPE by family name."""
    assert text.endswith("\n")
    samples: dict[tuple[str, Labels], float] = {}
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP ") :].partition(" ")
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE ") :].partition(" ")
            types[name] = kind
        else:
            match = _SAMPLE.match(line)
            assert match is not None, f"not a sample line: {line!r}"
            key = (match.group(1), parse_labels(match.group(2) or ""))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = float(match.group(3))
    return samples, helps, types


def by_key(key: str) -> Labels:
    return (("task_key", key),)


async def get_metrics(client: httpx.AsyncClient) -> dict[tuple[str, Labels], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == METRICS_CONTENT_TYPE
    samples, _, _ = parse_metrics(response.text)
    return samples


@asynccontextmanager
async def status_client(worker: TaskWorker) -> AsyncIterator[httpx.AsyncClient]:
    assert worker.status_url is not None
    async with httpx.AsyncClient(base_url=worker.status_url, timeout=10) as client:
        yield client


# -- /status


async def test_status_fields_and_finished_counts(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    async with TaskWorker(
        ok, api_url=trioworker_server.api_url, status_server_port=0, limit=3, client_id="status-test"
    ) as worker:
        assert worker.status_url is not None
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", worker.status_url)
        async with status_client(worker) as client:
            response = await client.get("/status")
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            body = response.json()
            assert worker.started_at is not None
            assert datetime.fromisoformat(body.pop("started_at")) == worker.started_at
            assert body == {
                "client_id": "status-test",
                "stopping": False,
                "connected": True,
                "limit": 3,
                "prefetch": 0,
                "current": 0,
                "available": 3,
                "tasks": ["status.ok"],
                "finished": {"status.ok": 0},
                "in_flight": {"status.ok": {}},
            }

            ids = await submit(api, "status.ok", 1, 2, 3)
            ended = await wait_ended(api, ids)
            assert [run["state"]["type"] for run in ended] == ["COMPLETED"] * 3
            body = await status_until(client, lambda b: b["finished"] == {"status.ok": 3})
            assert body["in_flight"] == {"status.ok": {}}
            assert body["current"] == 0
            assert body["available"] == 3


async def test_in_flight_shows_a_running_run(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    block, running, release = blocking_task()
    async with (
        TaskWorker(block, api_url=trioworker_server.api_url, status_server_port=0, limit=3) as worker,
        status_client(worker) as client,
    ):
        [run_id] = await submit(api, "status.block", 7)
        with trio.fail_after(10):
            await running.wait()

        body = (await client.get("/status")).json()
        assert list(body["in_flight"]) == ["status.block"]
        assert list(body["in_flight"]["status.block"]) == [run_id]
        started = datetime.fromisoformat(body["in_flight"]["status.block"][run_id])
        assert worker.started_at is not None and started >= worker.started_at
        assert body["current"] == 1
        assert body["available"] == 2
        assert body["finished"] == {"status.block": 0}

        metrics = await get_metrics(client)
        assert metrics["trioworker_task_runs_in_flight", by_key("status.block")] == 1
        assert metrics["trioworker_task_runs_started_total", by_key("status.block")] == 1
        assert metrics["trioworker_limiter_tokens_borrowed", ()] == 1

        release.set()
        [ended] = await wait_ended(api, [run_id])
        assert ended["state"]["type"] == "COMPLETED"
        body = await status_until(client, lambda b: b["finished"] == {"status.block": 1})
        assert body["in_flight"] == {"status.block": {}}
        assert body["current"] == 0


async def test_no_limit_is_null(trioworker_server: RunningServer) -> None:
    async with (
        TaskWorker(ok, api_url=trioworker_server.api_url, status_server_port=0, limit=None) as worker,
        status_client(worker) as client,
    ):
        body = (await client.get("/status")).json()
        assert body["limit"] is None
        assert body["available"] is None
        assert body["current"] == 0
        metrics = await get_metrics(client)
        assert metrics["trioworker_limiter_tokens_total", ()] == float("inf")
        assert metrics["trioworker_limiter_tokens_borrowed", ()] == 0


# -- /metrics


async def test_metrics_count_runs_per_key(api: httpx.AsyncClient, trioworker_server: RunningServer) -> None:
    async with (
        TaskWorker(ok, boom, api_url=trioworker_server.api_url, status_server_port=0, limit=3) as worker,
        status_client(worker) as client,
    ):
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples, helps, types = parse_metrics(response.text)
        assert types == {
            "trioworker_task_runs_started_total": "counter",
            "trioworker_task_runs_finished_total": "counter",
            "trioworker_task_runs_failed_total": "counter",
            "trioworker_task_runs_in_flight": "gauge",
            "trioworker_limiter_tokens_total": "gauge",
            "trioworker_limiter_tokens_borrowed": "gauge",
            "trioworker_worker_up": "gauge",
            "trioworker_worker_connected": "gauge",
        }
        assert set(helps) == set(types) and all(helps.values())
        # Every per-key family has a sample for every key from the start, at zero.
        for family in ("started_total", "finished_total", "failed_total", "in_flight"):
            for key in ("status.ok", "status.boom"):
                assert samples[f"trioworker_task_runs_{family}", by_key(key)] == 0
        assert samples["trioworker_limiter_tokens_total", ()] == 3
        assert samples["trioworker_limiter_tokens_borrowed", ()] == 0
        assert samples["trioworker_worker_up", ()] == 1
        assert samples["trioworker_worker_connected", ()] == 1
        assert len(samples) == 4 * 2 + 4

        ids = await submit(api, "status.ok", 1, 2) + await submit(api, "status.boom", 3)
        ended = await wait_ended(api, ids)
        assert sorted(run["state"]["type"] for run in ended) == ["COMPLETED", "COMPLETED", "FAILED"]
        await status_until(client, lambda b: b["finished"] == {"status.ok": 2, "status.boom": 1})

        metrics = await get_metrics(client)
        expected = {
            "started_total": {"status.ok": 2, "status.boom": 1},
            "finished_total": {"status.ok": 2, "status.boom": 1},
            "failed_total": {"status.ok": 0, "status.boom": 1},
            "in_flight": {"status.ok": 0, "status.boom": 0},
        }
        for family, counts in expected.items():
            for key, count in counts.items():
                assert metrics[f"trioworker_task_runs_{family}", by_key(key)] == count, (family, key)
        assert metrics["trioworker_limiter_tokens_borrowed", ()] == 0
        assert metrics["trioworker_worker_up", ()] == 1
        assert worker.failed_task_runs == {"status.ok": 0, "status.boom": 1}


async def test_statistics_is_a_frozen_snapshot(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    async with TaskWorker(ok, boom, api_url=trioworker_server.api_url, limit=2, client_id="stats") as worker:
        before = worker.statistics()
        [run_id] = await submit(api, "status.ok", 1)
        await wait_ended(api, [run_id])
    after = worker.statistics()  # stopped: the run's task has ended and counted itself
    assert not before.stopping and after.stopping
    assert (before.client_id, before.limit, before.task_keys) == ("stats", 2, ("status.ok", "status.boom"))
    assert before.finished_task_runs == {"status.ok": 0, "status.boom": 0}
    assert before.started_task_runs == {"status.ok": 0, "status.boom": 0}
    assert after.finished_task_runs == {"status.ok": 1, "status.boom": 0}
    assert after.started_task_runs == {"status.ok": 1, "status.boom": 0}
    assert after.failed_task_runs == {"status.ok": 0, "status.boom": 0}
    assert after.in_flight_task_runs == {"status.ok": {}, "status.boom": {}}
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        after.stopping = True  # type: ignore[misc]


async def test_label_values_are_escaped() -> None:
    assert escape_label_value("plain.key") == "plain.key"
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert escape_label_value('\\"') == '\\\\\\"'  # a backslash before a quote stays two escapes

    weird = 'we"ird\\key\nline'

    @task(key=weird)
    async def odd() -> None:
        pass

    # A worker that never started: its counters are all there, at zero.
    worker = TaskWorker(odd, api_url="http://127.0.0.1:9/api", limit=1)
    text = render_metrics(worker.statistics())
    assert 'trioworker_task_runs_started_total{task_key="we\\"ird\\\\key\\nline"} 0\n' in text
    samples, _, _ = parse_metrics(text)
    assert samples["trioworker_task_runs_failed_total", by_key(weird)] == 0
    assert all("\n" not in line for line in text.splitlines())  # the newline did not split a sample


# -- /health and stopping


async def test_health_ok_then_503_once_stopping(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    block, running, release = blocking_task()
    async with (
        TaskWorker(block, api_url=trioworker_server.api_url, status_server_port=0, limit=2) as worker,
        status_client(worker) as client,
    ):
        response = await client.get("/health")
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "connected": True}

        # A run in flight keeps the worker (and so its status server) up through its
        # grace period after stop(): the stopping state is observable over real HTTP.
        [run_id] = await submit(api, "status.block", 1)
        with trio.fail_after(10):
            await running.wait()
        worker.stop()

        response = await client.get("/health")
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/json"
        assert response.json()["status"] == "stopping"
        body = (await client.get("/status")).json()
        assert body["stopping"] is True
        assert list(body["in_flight"]["status.block"]) == [run_id]
        metrics = await get_metrics(client)
        assert metrics["trioworker_worker_up", ()] == 0

        release.set()
        [ended] = await wait_ended(api, [run_id])
        assert ended["state"]["type"] == "COMPLETED"


async def test_app_of_a_stopped_worker(trioworker_server: RunningServer) -> None:
    async with TaskWorker(ok, api_url=trioworker_server.api_url, limit=1) as worker:
        assert worker.status_url is None  # no port, no status server
    assert worker.stopping

    client = create_status_app(worker.statistics).test_client()
    response = await client.get("/health")
    assert response.status_code == 503
    assert await response.get_json() == {"status": "stopping", "connected": False}
    response = await client.get("/status")
    assert response.status_code == 200
    body = await response.get_json()
    assert body["stopping"] is True
    assert body["finished"] == {"status.ok": 0}
    response = await client.get("/metrics")
    assert "\ntrioworker_worker_up 0\n" in (await response.get_data(as_text=True))


async def health_until(client: httpx.AsyncClient, status_code: int) -> dict[str, Any]:
    """``/health`` once it answers ``status_code`` (looked at again whenever every task is blocked)."""
    with trio.fail_after(20):
        while True:
            response = await client.get("/health")
            if response.status_code == status_code:
                body: dict[str, Any] = response.json()
                return body
            await trio.testing.wait_all_tasks_blocked()


async def test_health_is_503_without_a_live_subscription(trioworker_server_control: ServerControl) -> None:
    port = int((await trioworker_server_control.start()).url.rsplit(":", 1)[1])
    await trioworker_server_control.stop()  # nothing listens there now: the worker cannot subscribe
    worker = TaskWorker(ok, api_url=f"http://127.0.0.1:{port}", status_server_port=0)
    subscribed = trio.Event()
    async with trio.open_nursery() as nursery:

        async def run_worker() -> None:
            await nursery.start(worker.start)
            subscribed.set()

        nursery.start_soon(run_worker)
        with trio.fail_after(10):
            while worker.status_url is None:  # the status server starts before the subscription
                await trio.testing.wait_all_tasks_blocked()
        async with status_client(worker) as client:
            response = await client.get("/health")
            assert (response.status_code, response.json()) == (
                503,
                {"status": "disconnected", "connected": False},
            )
            assert (await client.get("/status")).json()["connected"] is False
            assert (await get_metrics(client))["trioworker_worker_connected", ()] == 0
            assert not worker.connected

            await trioworker_server_control.start(port=port)
            with trio.fail_after(20):
                await subscribed.wait()
            response = await client.get("/health")
            assert (response.status_code, response.json()) == (200, {"status": "ok", "connected": True})
            assert (await client.get("/status")).json()["connected"] is True
            assert (await get_metrics(client))["trioworker_worker_connected", ()] == 1

            await trioworker_server_control.stop()  # the server goes away: so does the subscription
            assert await health_until(client, 503) == {"status": "disconnected", "connected": False}
            assert (await client.get("/status")).json()["connected"] is False

            await trioworker_server_control.start(port=port)
            assert await health_until(client, 200) == {"status": "ok", "connected": True}
        worker.stop()


async def other_loopback_address_answers(url: str) -> bool:
    """Whether the status server at ``url`` (on 127.0.0.1) also answers on 127.0.0.2."""
    port = url.rsplit(":", 1)[1]
    async with httpx.AsyncClient(timeout=10) as client:
        try:
            response = await client.get(f"http://127.0.0.2:{port}/health")
        except httpx.ConnectError:
            return False
    return response.status_code == 200


async def test_status_host_lets_other_addresses_reach_it(trioworker_server: RunningServer) -> None:
    async with TaskWorker(ok, api_url=trioworker_server.url, status_server_port=0) as worker:
        assert worker.status_url is not None and worker.status_url.startswith("http://127.0.0.1:")
        assert not await other_loopback_address_answers(worker.status_url)  # the default: this host only
    async with TaskWorker(
        ok, api_url=trioworker_server.url, status_server_port=0, status_server_host="0.0.0.0"
    ) as worker:
        assert worker.status_url is not None and worker.status_url.startswith("http://0.0.0.0:")
        assert await other_loopback_address_answers(worker.status_url)


async def test_the_worker_command_takes_status_host(trioworker_server: RunningServer) -> None:
    env = worker_env(TRIOWORKER_API_URL=trioworker_server.url)
    args = [f"{TASKS_FILE}:echo", "--status-port", "0", "--status-host", "0.0.0.0"]
    async with trio.open_nursery() as nursery:
        process, output = await start_worker(nursery, args, env)
        url = (await output.wait_for(r"status server listening on (http://\S+)")).group(1)
        assert url.startswith("http://0.0.0.0:")
        await output.wait_for(r"subscribed to cli\.echo")
        assert await other_loopback_address_answers(url)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0


# -- errors and lifetime


async def test_unknown_route_is_json_404(trioworker_server: RunningServer) -> None:
    async with (
        TaskWorker(ok, api_url=trioworker_server.api_url, status_server_port=0) as worker,
        status_client(worker) as client,
    ):
        response = await client.get("/nope")
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/json"
        assert isinstance(response.json()["detail"], str) and response.json()["detail"]

        response = await client.post("/status")
        assert response.status_code == 405
        assert response.headers["content-type"] == "application/json"
        assert response.json()["detail"]


async def test_serve_status_stops_when_cancelled() -> None:
    worker = TaskWorker(ok, api_url="http://127.0.0.1:9/api")
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(serve_status, worker.statistics, 0)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            response = await client.get("/health")  # never started: no subscription
            assert (response.status_code, response.json()) == (
                503,
                {"status": "disconnected", "connected": False},
            )
        nursery.cancel_scope.cancel()
    # serve_status returned: its socket is closed, nothing listens there any more.
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/health")


async def test_port_in_use_fails_the_start() -> None:
    worker = TaskWorker(ok, api_url="http://127.0.0.1:9/api")
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        async with trio.open_nursery() as nursery:
            # The bind error itself, not hypercorn's nested exception groups.
            with pytest.raises(OSError) as refused:
                await nursery.start(serve_status, worker.statistics, port)
            assert refused.value.errno == errno.EADDRINUSE


async def test_worker_with_a_port_in_use_does_not_start(trioworker_server: RunningServer) -> None:
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        worker = TaskWorker(ok, api_url=trioworker_server.api_url, status_server_port=port)
        with pytest.RaisesGroup(OSError, flatten_subgroups=True):
            async with worker:
                pytest.fail("the worker started without its status server")
    assert worker.stopping and worker.status_url is None


@pytest.mark.parametrize(
    ("host", "line"),
    [
        ("bogus.invalid", "trioworker: --status-host 'bogus.invalid' does not resolve: "),
        (
            "192.0.2.1",
            "trioworker: the status server cannot listen on --status-host '192.0.2.1' with --status-port 0: ",
        ),
        ("::1%nope", "trioworker: --status-host '::1%nope' does not resolve: "),
    ],
)
async def test_a_bad_status_host_is_named_in_one_line(
    trioworker_server: RunningServer, host: str, line: str
) -> None:
    """The worker command says which setting it could not use (192.0.2.1 is TEST-NET-1:
    not this machine's)."""
    args = [f"{TASKS_FILE}:echo", "--status-port", "0", "--status-host", host]
    with trio.fail_after(60):
        done = await trio.run_process(
            worker_command(*args),
            env=worker_env(TRIOWORKER_API_URL=trioworker_server.url),
            capture_stderr=True,
            check=False,
        )
    last = done.stderr.decode().strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith(line), done.stderr.decode()


async def test_a_status_port_in_use_is_named_in_one_line(trioworker_server: RunningServer) -> None:
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        args = [f"{TASKS_FILE}:echo", "--status-port", str(port)]
        with trio.fail_after(60):
            done = await trio.run_process(
                worker_command(*args),
                env=worker_env(TRIOWORKER_API_URL=trioworker_server.url),
                capture_stderr=True,
                check=False,
            )
    last = done.stderr.decode().strip().splitlines()[-1]
    assert done.returncode == 1
    setting = f"--status-host '127.0.0.1' with --status-port {port}"
    assert last == f"trioworker: the status server cannot listen on {setting}: Address already in use"
