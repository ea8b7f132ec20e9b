"""A bad run fails alone: worker faults, duplicate runs, malformed frames, a bounded stop.

The worker runs for real: real sockets, real threads, the real server for REST. Where the
test must speak for the server (to send what a server should never send, or to deliver a
run twice), the worker's subscription or client channel goes through :mod:`tests.fakes`.
"""

from __future__ import annotations

import logging
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import trioworker
from trioworker.cli.worker import EXIT_RUNS_IGNORED_STOP
from trioworker.models import TaskRun, TaskRunCreate, converter
from trioworker.serializers import FUTURE_KEY
from trioworker.server import RunningServer
from trioworker.tasks import task
from trioworker.worker import engine
from trioworker.worker.task_worker import MAX_WORKER_FAULTS, TaskWorker

from .fakes import (
    CHANNEL_PATH,
    SUBSCRIPTION_PATH,
    FakeSockets,
    Proxy,
    Session,
    answer_states,
    delivered,
    fake_sockets,
    quit_when_asked,
    routing_proxy,
)
from .helpers import LogEvents, history, submit, wait_all
from .test_cli_worker import OUTPUT_TIMEOUT, start_worker, within, worker_env, write

# -- seams


@pytest.fixture
async def fake() -> AsyncIterator[FakeSockets]:
    async with fake_sockets() as sockets:
        yield sockets


def real_port(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


@pytest.fixture
async def proxy(trioworker_server: RunningServer, fake: FakeSockets) -> AsyncIterator[Proxy]:
    """The worker's subscription goes to the fake; REST goes to the real server."""
    async with routing_proxy(real_port(trioworker_server), fake.port, {SUBSCRIPTION_PATH}) as routing:
        yield routing


async def complete(api: httpx.AsyncClient, run_id: str, data: Any) -> None:
    """Finish a run over REST, as a worker would."""
    for state in (
        {"type": "RUNNING", "name": "Running"},
        {"type": "COMPLETED", "name": "Completed", "data": data},
    ):
        response = await api.post(f"/task_runs/{run_id}/set_state", json={"state": state})
        assert response.json()["status"] == "ACCEPT", response.text


@asynccontextmanager
async def connected_to_fake(
    routed: Proxy, fake: FakeSockets
) -> AsyncIterator[tuple[trioworker.TaskRunClient, Session]]:
    """``trioworker.connect()`` whose client channel is the fake's first session."""
    sessions: list[Session] = []
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            session = await fake.next()
            await session.accept_channel()
            sessions.append(session)

        nursery.start_soon(accept)
        async with trioworker.connect(routed.api_url) as client:
            yield client, sessions[0]


@contextmanager
def deadline(seconds: float = 20) -> Iterator[None]:
    with trio.fail_after(seconds):
        yield


# -- 1. a fault of the worker while it handles one run: that run is handed back, alone


async def test_a_rest_failure_while_a_run_is_prepared_hands_it_back_and_spares_the_others(
    api: httpx.AsyncClient, proxy: Proxy, fake: FakeSockets, logs: LogEvents
) -> None:
    # An upstream run, COMPLETED on the real server, whose result the run under test takes.
    [upstream] = await submit(api, "f.up", {})
    await complete(api, upstream, 41)
    held_started, held_proceed = trio.Event(), trio.Event()

    @task(key="f.held")
    async def held() -> str:
        held_started.set()
        await held_proceed.wait()
        return "held"

    @task(key="f.plus")
    async def plus(a: int) -> int:
        return a + 1

    worker = TaskWorker(held, plus, api_url=proxy.api_url, shutdown_grace_seconds=5)
    seen: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.start)
        session = await fake.next()
        await session.accept_subscription()
        other = delivered("f.held")
        await session.send({"type": "task_runs", "task_runs": [other]})
        with deadline():
            await held_started.wait()
            proxy.drop_rest()  # the server restarts: REST calls fail
            run = delivered("f.plus", {"a": {FUTURE_KEY: upstream}}, wait_for=[upstream])
            await session.send({"type": "task_runs", "task_runs": [run]})
            released = await session.receive_type("release", seen)
        assert released["ids"] == [run["id"]]
        [fault] = logs.matching(f"run {run['id']} of f.plus: the worker failed while handling it")
        assert fault.levelno == logging.ERROR
        assert "ServerUnavailable" in fault.getMessage()
        assert worker.current_tasks == 1  # the other run still runs, untouched

        proxy.restore_rest()
        await session.send({"type": "task_runs", "task_runs": [run]})  # delivered again, as after a release
        held_proceed.set()
        with deadline():
            states = await answer_states(session, {run["id"]: "COMPLETED", other["id"]: "COMPLETED"}, seen)
        assert states[run["id"]]["data"] == 42
        assert states[other["id"]]["data"] == "held"
        worker.stop()
        await quit_when_asked(session)
    assert worker.finished_task_runs == {"f.held": 1, "f.plus": 1}


async def test_a_failing_delete_of_an_unknown_key_releases_that_run_only(
    proxy: Proxy, fake: FakeSockets, logs: LogEvents, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIOWORKER_DELETE_FAILED_SUBMISSIONS", "1")

    @task(key="f.ok")
    async def ok() -> str:
        return "ok"

    worker = TaskWorker(ok, api_url=proxy.api_url)
    seen: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.start)
        session = await fake.next()
        await session.accept_subscription()
        proxy.drop_rest()
        stranger, good = delivered("f.nobody"), delivered("f.ok")
        await session.send({"type": "task_runs", "task_runs": [stranger, good]})
        with deadline():
            states = await answer_states(session, {good["id"]: "COMPLETED"}, seen)
            while not any(m["type"] == "release" for m in seen):
                seen.append(await session.receive())
        assert states[good["id"]]["data"] == "ok"
        assert [m["ids"] for m in seen if m["type"] == "release"] == [[stranger["id"]]]
        assert logs.matching(f"run {stranger['id']} of f.nobody: the worker failed to take it")
        worker.stop()
        await quit_when_asked(session)


async def test_execute_task_run_survives_a_server_it_cannot_reach(proxy: Proxy, logs: LogEvents) -> None:
    @task(key="f.never")
    async def never() -> str:
        raise AssertionError("must not run: RUNNING was never accepted")

    run = converter.structure(delivered("f.never"), TaskRun)
    proxy.drop_rest()
    with deadline():
        await TaskWorker(never, api_url=proxy.api_url).execute_task_run(run)  # returns, raises nothing
    assert logs.matching(f"run {run.id} of f.never: the worker failed while handling it")
    assert logs.matching(f"run {run.id}: could not hand it back")


def broken_failure_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the worker's own handling of a failed run fault, every time."""

    def broken(message: str, exc: BaseException) -> Any:
        raise RuntimeError("no report for you")

    monkeypatch.setattr(engine, "_failed", broken)


async def test_a_run_whose_handling_faults_again_and_again_ends_failed(
    api: httpx.AsyncClient, trioworker_worker: Any, logs: LogEvents, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken_failure_report(monkeypatch)

    @task(key="f.fails")
    async def fails() -> None:
        raise ValueError("the task's own failure")

    @task(key="f.fine")
    async def fine() -> str:
        return "fine"

    [bad] = await submit(api, "f.fails", {})
    async with trioworker_worker(fails, fine) as worker:
        [run] = await wait_all(api, [bad], seconds=30)
        [good] = await wait_all(api, await submit(api, "f.fine", {}))
    state = run["state"]
    assert state["type"] == "FAILED"
    assert state["message"] == "the worker could not handle this run: RuntimeError: no report for you"
    assert state["data"]["type"] == "builtins.RuntimeError"
    assert good["state"]["data"] == "fine"
    assert (
        len(logs.matching(f"run {bad} of f.fails: the worker failed while handling it \\("))
        == MAX_WORKER_FAULTS - 1
    )
    assert logs.matching(
        f"run {bad} of f.fails: the worker failed while handling it {MAX_WORKER_FAULTS} times"
    )
    assert worker.failed_task_runs["f.fails"] == 1


async def test_execute_task_run_fails_a_run_whose_handling_faults_again_and_again(
    api: httpx.AsyncClient, trioworker_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken_failure_report(monkeypatch)

    @task(key="f.fails_rest")
    def fails_rest() -> None:
        raise ValueError("the task's own failure")

    [run_id] = await submit(api, "f.fails_rest", {})
    worker = TaskWorker(fails_rest, api_url=trioworker_server.api_url)
    types = []
    with deadline():
        for _ in range(MAX_WORKER_FAULTS):
            run = converter.structure((await api.get(f"/task_runs/{run_id}")).json(), TaskRun)
            await worker.execute_task_run(run)
            types.append((await api.get(f"/task_runs/{run_id}")).json()["state"]["type"])
    assert types == ["SCHEDULED"] * (MAX_WORKER_FAULTS - 1) + ["FAILED"]
    [final] = await wait_all(api, [run_id])
    assert final["state"]["message"].startswith("the worker could not handle this run: RuntimeError")


# -- 2. the same run handed over twice runs once


async def test_the_same_run_delivered_again_and_after_a_reconnect_runs_once(
    proxy: Proxy, fake: FakeSockets
) -> None:
    calls = 0
    started, proceed = trio.Event(), trio.Event()

    @task(key="f.once")
    async def once() -> int:
        nonlocal calls
        calls += 1
        started.set()
        await proceed.wait()
        return calls

    worker = TaskWorker(once, api_url=proxy.api_url, limit=3)
    seen: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.start)
        first = await fake.next()
        await first.accept_subscription()
        run = delivered("f.once")
        with deadline():
            await first.send({"type": "task_runs", "task_runs": [run, run]})  # twice in one message
            await started.wait()
            await first.send({"type": "task_runs", "task_runs": [run]})  # and again
            await first.ws.aclose(1012, "server restart")
            second = await fake.next()
            subscribe = await second.accept_subscription()
            assert subscribe["held"] == [run["id"]]
            await second.send({"type": "task_runs", "task_runs": [run]})  # after the reconnect
            proceed.set()
            states = await answer_states(second, {run["id"]: "COMPLETED"}, seen)
        assert states[run["id"]]["data"] == 1
        assert calls == 1
        assert worker.current_tasks == 0  # every slot was given back
        worker.stop()
        await quit_when_asked(second)


async def test_execute_task_run_for_a_run_the_subscription_runs_returns_at_once(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    calls = 0
    started, proceed = trio.Event(), trio.Event()

    @task(key="f.busy")
    async def busy() -> str:
        nonlocal calls
        calls += 1
        started.set()
        await proceed.wait()
        return "done"

    async with TaskWorker(busy, api_url=trioworker_server.api_url) as worker:
        [run_id] = await submit(api, "f.busy", {})
        with deadline():
            await started.wait()
            run = converter.structure((await api.get(f"/task_runs/{run_id}")).json(), TaskRun)
            await worker.execute_task_run(run)  # already running here: returns at once
            await worker.execute_task_run(run)
        proceed.set()
        [ended] = await wait_all(api, [run_id])
    assert (ended["state"]["type"], ended["state"]["data"], calls) == ("COMPLETED", "done", 1)


async def test_a_run_delivered_while_execute_task_run_runs_it_runs_once(
    api: httpx.AsyncClient, proxy: Proxy, fake: FakeSockets, logs: LogEvents
) -> None:
    calls = 0
    started, proceed = trio.Event(), trio.Event()

    @task(key="f.direct")
    async def direct() -> str:
        nonlocal calls
        calls += 1
        started.set()
        await proceed.wait()
        return "direct"

    [run_id] = await submit(api, "f.direct", {})
    run = converter.structure((await api.get(f"/task_runs/{run_id}")).json(), TaskRun)
    worker = TaskWorker(direct, api_url=proxy.api_url, limit=1)
    seen: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.start)
        session = await fake.next()
        await session.accept_subscription()
        with deadline():
            async with trio.open_nursery() as direct_runs:
                direct_runs.start_soon(worker.execute_task_run, run)
                await started.wait()
                await session.send({"type": "task_runs", "task_runs": [converter.unstructure(run)]})
                await logs.wait_for(f"run {run_id} was delivered while it runs here")
                proceed.set()
            released = await session.receive_type("release", seen)  # the lease is answered
        assert released["ids"] == [run_id]
        assert calls == 1
        assert not [m for m in seen if m["type"] == "states"]  # the subscription never ran it
        worker.stop()
        await quit_when_asked(session)
    state = (await api.get(f"/task_runs/{run_id}")).json()["state"]
    assert (state["type"], state["data"]) == ("COMPLETED", "direct")


# -- 3. malformed frames from the server: dropped, made again, nothing lost

MALFORMED_SUBSCRIPTION_FRAMES = [
    pytest.param("{nope", "malformed JSON", id="not-json"),
    pytest.param("[1, 2]", "not an object", id="array"),
    pytest.param('"text"', "not an object", id="string"),
    pytest.param('{"kind": "task_runs"}', 'without a string "type"', id="no-type"),
    pytest.param('{"type": 7}', 'without a string "type"', id="type-not-string"),
    pytest.param('{"type": "dance"}', "unknown type 'dance'", id="unknown-type"),
    pytest.param(b'{"type": "cancel", "ids": []}', "binary frame", id="binary"),
    pytest.param('{"type": "task_runs", "task_runs": {}}', "not a list of task runs", id="runs-not-list"),
    pytest.param(
        '{"type": "task_runs", "task_runs": [{"id": "x"}]}', "not a list of task runs", id="bad-run"
    ),
    pytest.param('{"type": "task_runs"}', "not a list of task runs", id="runs-missing"),
    pytest.param('{"type": "cancel", "ids": "abc"}', "without task run ids", id="ids-not-list"),
    pytest.param('{"type": "cancel", "ids": ["nope"]}', "without task run ids", id="id-not-uuid"),
    pytest.param('{"type": "revoke", "ids": [1]}', "without task run ids", id="id-not-string"),
    pytest.param('{"type": "state_results", "results": 5}', "state results", id="results-not-list"),
    pytest.param('{"type": "state_results", "results": [{"ref": "a"}]}', "state results", id="ref-not-int"),
    pytest.param(
        '{"type": "state_results", "results": [{"ref": 0, "status": "MAYBE"}]}', "state results", id="status"
    ),
    pytest.param(
        '{"type": "state_results", "results": [{"ref": 0, "status": "REJECT", "state": {"type": 3}}]}',
        "state results",
        id="state",
    ),
]


@pytest.mark.parametrize(("frame", "said"), MALFORMED_SUBSCRIPTION_FRAMES)
async def test_a_malformed_frame_drops_the_subscription_and_it_is_made_again(
    proxy: Proxy, fake: FakeSockets, logs: LogEvents, frame: str | bytes, said: str
) -> None:
    @task(key="f.echo")
    async def echo(text: str) -> str:
        return text

    worker = TaskWorker(echo, api_url=proxy.api_url)
    seen: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.start)
        first = await fake.next()
        await first.accept_subscription()
        await first.send(frame)
        assert await first.close_code() == 1002
        second = await fake.next()
        await second.accept_subscription()
        run = delivered("f.echo", {"text": "still here"})
        await second.send({"type": "task_runs", "task_runs": [run]})
        with deadline():
            states = await answer_states(second, {run["id"]: "COMPLETED"}, seen)
        assert states[run["id"]]["data"] == "still here"
        worker.stop()
        await quit_when_asked(second)
    [lost] = logs.matching("subscription lost")
    assert said in lost.getMessage()
    assert "\n" not in lost.getMessage()


@pytest.mark.parametrize("reply", ["{nope", b'{"type": "auth_success"}', '{"type": "subscribed"}', "[]"])
async def test_a_malformed_handshake_reply_is_retried(
    proxy: Proxy, fake: FakeSockets, logs: LogEvents, reply: str | bytes
) -> None:
    @task(key="f.echo")
    async def echo(text: str) -> str:
        return text

    worker = TaskWorker(echo, api_url=proxy.api_url)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.start)
        first = await fake.next()
        assert (await first.receive())["type"] == "auth"
        await first.send(reply)
        assert await first.close_code() == 1002
        second = await fake.next()
        await second.accept_subscription()
        run = delivered("f.echo", {"text": "in"})
        await second.send({"type": "task_runs", "task_runs": [run]})
        with deadline():
            states = await answer_states(second, {run["id"]: "COMPLETED"}, [])
        assert states[run["id"]]["data"] == "in"
        worker.stop()
        await quit_when_asked(second)
    assert len(logs.matching("subscription lost")) == 1


async def test_reports_whose_answer_was_malformed_are_sent_again(proxy: Proxy, fake: FakeSockets) -> None:
    @task(key="f.echo")
    async def echo(text: str) -> str:
        return text

    worker = TaskWorker(echo, api_url=proxy.api_url)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.start)
        first = await fake.next()
        await first.accept_subscription()
        run = delivered("f.echo", {"text": "once"})
        await first.send({"type": "task_runs", "task_runs": [run]})
        with deadline():
            reported: list[str] = []
            while "COMPLETED" not in reported:
                reported += [e["state"]["type"] for e in (await first.receive_type("states"))["states"]]
            await first.send('{"type": "state_results", "results": [{"ref": 0, "status": "MAYBE"}]}')
            second = await fake.next()
            subscribe = await second.accept_subscription()
            assert subscribe["held"] == [run["id"]]  # not answered yet: still ours
            states = await answer_states(second, {run["id"]: "COMPLETED"}, [])
        assert states[run["id"]]["data"] == "once"
        worker.stop()
        await quit_when_asked(second)
    assert worker.finished_task_runs == {"f.echo": 1}


MALFORMED_CHANNEL_FRAMES = [
    pytest.param("{nope", id="not-json"),
    pytest.param("[]", id="array"),
    pytest.param(b'{"type": "created"}', id="binary"),
    pytest.param('{"type": "dance"}', id="unknown-type"),
    pytest.param('{"type": "created", "ref": 0, "task_runs": [{"id": 1}]}', id="bad-run"),
    pytest.param('{"type": "created", "ref": "0", "task_runs": []}', id="ref-not-int"),
    pytest.param('{"type": "error", "ref": 0, "status": "bad"}', id="status-not-int"),
    pytest.param('{"type": "ended", "task_runs": [], "missing": [3]}', id="missing-not-ids"),
    pytest.param('{"type": "ended", "task_runs": 5}', id="ended-not-list"),
]


@pytest.mark.parametrize("frame", MALFORMED_CHANNEL_FRAMES)
async def test_a_malformed_frame_drops_the_client_channel_and_it_is_made_again(
    trioworker_server: RunningServer, fake: FakeSockets, logs: LogEvents, frame: str | bytes
) -> None:
    async with (
        routing_proxy(real_port(trioworker_server), fake.port, {CHANNEL_PATH}) as routed,
        connected_to_fake(routed, fake) as (client, first),
    ):
        channel = client.channel
        assert channel is not None
        with deadline():
            await channel.wait_usable()
            in_flight: list[TaskRun] = []
            async with trio.open_nursery() as nursery:

                async def create_in_flight() -> None:
                    # Never a parse error: the channel is lost, and the create goes on over HTTP.
                    in_flight.append(await client.create_task_run(TaskRunCreate(task_key="f.k")))

                nursery.start_soon(create_in_flight)
                request = await first.receive_type("create")
                await first.send(frame)
            assert await first.close_code() == 1002
            [made] = in_flight  # by the real server, with the id the lost message carried
            assert str(made.id) == request["task_runs"][0]["id"]
            assert (await client.read_task_run(made.id)).task_key == "f.k"
            second = await fake.next()
            await second.accept_channel()
            await channel.wait_usable()
            assert channel.reopened == 1
            async with trio.open_nursery() as nursery:
                created: list[TaskRun] = []

                async def create() -> None:
                    created.append(await client.create_task_run(TaskRunCreate(task_key="f.k")))

                nursery.start_soon(create)
                request = await second.receive_type("create")
                run = delivered("f.k")
                await second.send({"type": "created", "ref": request["ref"], "task_runs": [run]})
            assert [str(r.id) for r in created] == [run["id"]]
    [lost] = logs.matching("channel to .* lost")
    assert "\n" not in lost.getMessage()


async def test_a_wait_on_a_channel_that_sent_a_malformed_frame_falls_back_to_http(
    api: httpx.AsyncClient, trioworker_server: RunningServer, fake: FakeSockets
) -> None:
    [run_id] = await submit(api, "f.waited", {})
    async with (
        routing_proxy(real_port(trioworker_server), fake.port, {CHANNEL_PATH}) as routed,
        connected_to_fake(routed, fake) as (client, first),
    ):
        assert client.channel is not None
        future: trioworker.TaskRunFuture[int] = trioworker.TaskRunFuture(uuid.UUID(run_id))
        with deadline():
            await client.channel.wait_usable()
            async with trio.open_nursery() as nursery:
                results: list[int] = []

                async def wait() -> None:
                    results.append(await future.result(timeout=15))

                nursery.start_soon(wait)
                await first.receive_type("watch")
                await first.send('{"type": "ended", "task_runs": "garbage"}')
                assert await first.close_code() == 1002
                await complete(api, run_id, 7)
        assert results == [7]  # the wait went on over HTTP: nothing lost


# -- 4. stopping is bounded


async def test_after_the_grace_period_a_stuck_thread_is_not_waited_for_and_its_result_is_dropped(
    api: httpx.AsyncClient, trioworker_server: RunningServer, logs: LogEvents
) -> None:
    entered = trio.Event()
    let_go, returned = threading.Event(), threading.Event()
    calls = 0

    @task(key="f.stuck")
    def stuck() -> str:
        nonlocal calls
        calls += 1
        trio.from_thread.run_sync(entered.set)
        try:
            let_go.wait(30)  # never checks for cancellation
            return f"call {calls}"
        finally:
            returned.set()

    [run_id] = await submit(api, "f.stuck", {})
    with deadline():
        async with TaskWorker(stuck, api_url=trioworker_server.api_url, shutdown_grace_seconds=0.5) as worker:
            await entered.wait()
            worker.stop()
    assert not returned.is_set()  # the worker stopped while the thread still runs
    await logs.wait_for(r"stopping: waiting 0\.\d s more for 1 run\(s\) to finish: f\.stuck " + run_id)
    await logs.wait_for(r"grace period over: cancelling 1 run\(s\) and handing them back")
    await logs.wait_for(f"run {run_id} of f.stuck: not waiting for its thread|stopped waiting for its thread")
    state = (await api.get(f"/task_runs/{run_id}")).json()["state"]
    assert (state["type"], state["name"]) == ("SCHEDULED", "Redelivered")

    let_go.set()
    with deadline():
        await trio.to_thread.run_sync(returned.wait)
        await trio.lowlevel.checkpoint()
    assert (await api.get(f"/task_runs/{run_id}")).json()["state"]["type"] == "SCHEDULED"  # dropped

    returned.clear()
    async with TaskWorker(stuck, api_url=trioworker_server.api_url):
        [run] = await wait_all(api, [run_id])
    assert (run["state"]["type"], run["state"]["data"]) == ("COMPLETED", "call 2")
    assert [h for h in await history(api, run_id) if h[0] == "COMPLETED"] == [("COMPLETED", "Completed")]


async def test_a_second_stop_without_grace_stops_at_once(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    entered = trio.Event()

    @task(key="f.sleepy")
    async def sleepy() -> None:
        entered.set()
        await trio.sleep_forever()

    [run_id] = await submit(api, "f.sleepy", {})
    with deadline(10):
        async with TaskWorker(
            sleepy, api_url=trioworker_server.api_url, shutdown_grace_seconds=3600
        ) as worker:
            await entered.wait()
            worker.stop()
            worker.stop()  # changes nothing
            worker.stop(grace_seconds=0)
    state = (await api.get(f"/task_runs/{run_id}")).json()["state"]
    assert (state["type"], state["name"]) == ("SCHEDULED", "Redelivered")


SLEEPER_SOURCE = """
import os, sys, time
from pathlib import Path
from trioworker.tasks import task

@task(key="t.sleeper")
def sleeper(marker: str) -> str:
    first = not Path(marker).exists()
    Path(marker).write_text("seen")
    if first:
        print("sleeping now", file=sys.stderr, flush=True)
        time.sleep(25)  # a plain sleep: no cancellation check
        return f"late from {os.getpid()}"
    return f"finished by {os.getpid()}"
"""


async def test_sigterm_with_grace_stops_within_grace_while_a_sync_task_sleeps(
    tmp_path: Path, api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    tasks_file = write(tmp_path / "sleeper.py", SLEEPER_SOURCE)
    [run_id] = await submit(api, "t.sleeper", {"marker": str(tmp_path / "marker")})
    env = worker_env(TRIOWORKER_API_URL=trioworker_server.api_url)
    async with trio.open_nursery() as nursery:
        process, output = await start_worker(nursery, [f"{tasks_file}:sleeper", "--grace", "2"], env)
        await output.wait_for("sleeping now")
        process.send_signal(signal.SIGTERM)
        with within(2 + 6, output):
            assert await process.wait() == 0
        waiting = r"stopping: waiting [12]\.\d s more for 1 run\(s\) to finish: t\.sleeper "
        await output.wait_for(waiting + run_id)
        await output.wait_for(r"grace period over: cancelling 1 run\(s\)")
        await output.wait_for(r"handing back 1 unfinished run\(s\)")
        state = (await api.get(f"/task_runs/{run_id}")).json()["state"]
        assert (state["type"], state["name"]) == ("SCHEDULED", "Redelivered"), output.text

        second, second_output = await start_worker(nursery, [f"{tasks_file}:sleeper"], env)
        [run] = await wait_all(api, [run_id], seconds=OUTPUT_TIMEOUT)
        assert run["state"]["data"] == f"finished by {second.pid}"
        second.send_signal(signal.SIGTERM)
        with within(OUTPUT_TIMEOUT, second_output):
            assert await second.wait() == 0
    assert [h for h in await history(api, run_id) if h[0] == "COMPLETED"] == [("COMPLETED", "Completed")]
    assert "Traceback" not in output.text


async def test_a_second_signal_stops_the_worker_at_once(
    tmp_path: Path, api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    tasks_file = write(tmp_path / "sleeper.py", SLEEPER_SOURCE)
    [run_id] = await submit(api, "t.sleeper", {"marker": str(tmp_path / "marker")})
    env = worker_env(TRIOWORKER_API_URL=trioworker_server.api_url)
    async with trio.open_nursery() as nursery:
        process, output = await start_worker(nursery, [f"{tasks_file}:sleeper", "--grace", "600"], env)
        await output.wait_for("sleeping now")
        process.send_signal(signal.SIGTERM)
        await output.wait_for(r"stopping: waiting \d+\.\d s more for 1 run\(s\)")
        process.send_signal(signal.SIGINT)
        with within(6, output):
            assert await process.wait() == 0
        await output.wait_for("received SIGINT again: stopping now")
    state = (await api.get(f"/task_runs/{run_id}")).json()["state"]
    assert (state["type"], state["name"]) == ("SCHEDULED", "Redelivered"), output.text
    assert "Traceback" not in output.text


IGNORER_SOURCE = """
import os, sys, time
from pathlib import Path
import trio
from trioworker.tasks import task

@task(key="t.ignorer", timeout_seconds=1)
async def ignorer(marker: str, how: str) -> str:
    first = not Path(marker).exists()
    Path(marker).write_text("seen")
    if first:
        print("ignoring now", file=sys.stderr, flush=True)
        if how == "shield":
            with trio.CancelScope(shield=True):
                await trio.sleep(60)
        else:
            end = time.monotonic() + 60
            while time.monotonic() < end:
                try:
                    await trio.sleep(0.1)
                except trio.Cancelled:
                    time.sleep(0.01)  # and goes on, as if nothing happened
        return f"late from {os.getpid()}"
    return f"finished by {os.getpid()}"
"""


@pytest.mark.parametrize("how", ["shield", "catch"])
@pytest.mark.parametrize("second_signal", [False, True], ids=["grace_over", "second_signal"])
async def test_a_worker_process_exits_when_async_runs_ignore_the_stop(
    tmp_path: Path, api: httpx.AsyncClient, trioworker_server: RunningServer, how: str, second_signal: bool
) -> None:
    tasks_file = write(tmp_path / "ignorer.py", IGNORER_SOURCE)
    [run_id] = await submit(api, "t.ignorer", {"marker": str(tmp_path / "marker"), "how": how})
    env = worker_env(TRIOWORKER_API_URL=trioworker_server.api_url)
    grace = "600" if second_signal else "2"
    async with trio.open_nursery() as nursery:
        process, output = await start_worker(nursery, [f"{tasks_file}:ignorer", "--grace", grace], env)
        await output.wait_for("ignoring now")
        process.send_signal(signal.SIGTERM)
        if second_signal:
            await output.wait_for(r"stopping: waiting \d+\.\d s more for 1 run\(s\)")
            process.send_signal(signal.SIGTERM)
        with within(20, output):
            assert await process.wait() == EXIT_RUNS_IGNORED_STOP
        await output.wait_for(
            f"runs ignore cancellation after the stop; exiting without them .*t.ignorer {run_id}"
        )

        second, second_output = await start_worker(nursery, [f"{tasks_file}:ignorer"], env)
        [run] = await wait_all(api, [run_id], seconds=OUTPUT_TIMEOUT)
        assert run["state"]["data"] == f"finished by {second.pid}"
        second.send_signal(signal.SIGTERM)
        with within(OUTPUT_TIMEOUT, second_output):
            assert await second.wait() == 0
    assert "Traceback" not in output.text
