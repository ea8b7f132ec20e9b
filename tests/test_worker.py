"""TaskWorker end to end: a real in-process server, real websockets, real threads."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

from trioworker.errors import StopTaskWorker, SubscriptionRefused
from trioworker.models import StateType, TaskRun, converter
from trioworker.server import RunningServer
from trioworker.tasks import task
from trioworker.testing import ServerControl
from trioworker.worker import subscription
from trioworker.worker.task_worker import TaskWorker

from .helpers import history, submit, wait_all

#: Every test here runs its server on each kind of store (tests/stores.py).
pytestmark = pytest.mark.every_store

Make = Callable[..., TaskWorker]


@task(key="t.add")
async def add(a: int, b: int = 10) -> int:
    return a + b


@task(key="t.shout")
def shout(text: str) -> str:
    return text.upper() + "!"


@attrs.frozen
class Point:
    x: int
    y: int


@task(key="t.forms")
def forms(a: int, /, b: str, *args: float, c: bool = False, **kwargs: int) -> dict[str, Any]:
    return {"a": a, "b": b, "args": list(args), "c": c, "kwargs": kwargs}


@task(key="t.move")
async def move(p: Point, by: Point, when: datetime) -> Point:
    assert isinstance(p, Point) and isinstance(when, datetime)
    return Point(p.x + by.x, p.y + by.y)


@task(key="t.boom")
def boom(message: str) -> None:
    raise ValueError(message)


async def test_async_and_sync_tasks_complete(api: httpx.AsyncClient, trioworker_worker: Make) -> None:
    added = await submit(api, "t.add", {"a": 1}, {"a": 1, "b": 2})
    shouted = await submit(api, "t.shout", {"text": "hi"})
    async with trioworker_worker(add, shout) as worker:
        runs = await wait_all(api, added + shouted)
        assert [r["state"]["type"] for r in runs] == ["COMPLETED"] * 3
        assert [r["state"]["data"] for r in runs] == [11, 3, "HI!"]
    # Counted once the server's answer reached the worker: certain after it stopped.
    assert worker.finished_task_runs == {"t.add": 2, "t.shout": 1}
    assert await history(api, added[0]) == [
        ("SCHEDULED", "Scheduled"),
        ("PENDING", "Pending"),
        ("RUNNING", "Running"),
        ("COMPLETED", "Completed"),
    ]


async def test_running_and_completed_in_one_message_make_the_usual_history(
    api: httpx.AsyncClient, trioworker_worker: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that ends in the step that started it sends RUNNING and COMPLETED in one
    message (the worker does not wait to send RUNNING alone); the server applies them in
    order: the same states, history and times as when they come one by one."""
    batches: list[list[tuple[str, str]]] = []
    by_size = subscription._by_size

    def recording(reports: list[Any]) -> list[list[bytes]]:
        batches.append([(str(report.run_id), report.state.type.value) for report in reports])
        return by_size(reports)

    monkeypatch.setattr(subscription, "_by_size", recording)
    ids = await submit(api, "t.add", {"a": 1}, {"a": 2}, {"a": 3})
    async with trioworker_worker(add):
        runs = await wait_all(api, ids)
    assert [(r["state"]["type"], r["state"]["data"], r["run_count"]) for r in runs] == [
        ("COMPLETED", 11, 1),
        ("COMPLETED", 12, 1),
        ("COMPLETED", 13, 1),
    ]
    for run_id in ids:
        assert any({(run_id, "RUNNING"), (run_id, "COMPLETED")} <= set(batch) for batch in batches)
        changes = (await api.get(f"/task_runs/{run_id}/history")).json()
        assert [(c["type"], c["name"]) for c in changes] == [
            ("SCHEDULED", "Scheduled"),
            ("PENDING", "Pending"),
            ("RUNNING", "Running"),
            ("COMPLETED", "Completed"),
        ]
        times = [datetime.fromisoformat(c["timestamp"]) for c in changes]
        assert times == sorted(times)


async def test_every_parameter_form(api: httpx.AsyncClient, trioworker_worker: Make) -> None:
    when = datetime(2030, 5, 6, 7, 8, tzinfo=UTC).isoformat()
    [full, minimal] = await submit(
        api,
        "t.forms",
        {"a": 1, "b": "x", "args": [1.5, 2], "c": True, "kwargs": {"k": 3}},
        {"a": 2, "b": "y"},
    )
    [moved] = await submit(api, "t.move", {"p": {"x": 1, "y": 2}, "by": {"x": 10, "y": 20}, "when": when})
    async with trioworker_worker(forms, move):
        runs = await wait_all(api, [full, minimal, moved])
    assert runs[0]["state"]["data"] == {"a": 1, "b": "x", "args": [1.5, 2.0], "c": True, "kwargs": {"k": 3}}
    assert runs[1]["state"]["data"] == {"a": 2, "b": "y", "args": [], "c": False, "kwargs": {}}
    assert runs[2]["state"]["data"] == {"x": 11, "y": 22}


async def test_unreadable_parameters_fail_the_run_not_the_worker(
    api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    bad = await submit(api, "t.add", {"a": "one"}, {"b": 1}, {"a": 1, "c": 3})
    good = await submit(api, "t.add", {"a": 5})
    async with trioworker_worker(add):
        runs = await wait_all(api, bad + good)
    assert [r["state"]["type"] for r in runs] == ["FAILED", "FAILED", "FAILED", "COMPLETED"]
    messages = [r["state"]["message"] for r in runs[:3]]
    assert "cannot read 'one' as int" in messages[0]
    assert "missing parameter 'a'" in messages[1]
    assert "unexpected parameter(s) c" in messages[2]


async def test_a_failure_records_type_message_and_traceback(
    api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    [run_id] = await submit(api, "t.boom", {"message": "no luck"})
    async with trioworker_worker(boom) as worker:
        [run] = await wait_all(api, [run_id])
    assert worker.failed_task_runs == {"t.boom": 1}
    state = run["state"]
    assert state["type"] == "FAILED"
    assert state["message"] == "ValueError: no luck"
    assert state["data"]["type"] == "builtins.ValueError"
    assert state["data"]["message"] == "no luck"
    assert "raise ValueError(message)" in state["data"]["traceback"]


async def test_retries_go_back_through_the_server_with_their_delays(
    trioworker_autojump_clock: trio.testing.MockClock, api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    attempts: list[float] = []

    @task(key="t.flaky", retries=3, retry_delay_seconds=[10, 100])
    async def flaky() -> str:
        attempts.append(trio.current_time())
        if len(attempts) < 3:
            raise ConnectionError(f"attempt {len(attempts)}")
        return "third time lucky"

    [run_id] = await submit(api, "t.flaky", {})
    async with trioworker_worker(flaky):
        [run] = await wait_all(api, [run_id], seconds=300)
    assert run["state"]["data"] == "third time lucky"
    assert run["run_count"] == 3
    assert attempts[1] - attempts[0] >= 10 - 1e-3  # epoch floats round at ~1e-6
    assert attempts[2] - attempts[1] >= 100 - 1e-3
    names = [name for _, name in await history(api, run_id)]
    assert names.count("AwaitingRetry") == 2


async def test_retry_condition_can_refuse(api: httpx.AsyncClient, trioworker_worker: Make) -> None:
    seen: list[str] = []

    def only_connection_errors(t: object, run: TaskRun, exc: BaseException) -> bool:
        seen.append(type(exc).__name__)
        assert isinstance(run, TaskRun)
        return isinstance(exc, ConnectionError)

    @task(key="t.picky", retries=5, retry_condition_fn=only_connection_errors)
    def picky() -> None:
        raise KeyError("not worth retrying")

    [run_id] = await submit(api, "t.picky", {})
    async with trioworker_worker(picky):
        [run] = await wait_all(api, [run_id])
    assert run["state"]["type"] == "FAILED"
    assert run["run_count"] == 1
    assert seen == ["KeyError"]


async def test_async_timeout_cancels_the_attempt(
    trioworker_autojump_clock: trio.testing.MockClock, api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    @task(key="t.slow", timeout_seconds=5)
    async def slow() -> None:
        await trio.sleep(3600)

    [run_id] = await submit(api, "t.slow", {})
    async with trioworker_worker(slow):
        [run] = await wait_all(api, [run_id], seconds=60)
    assert run["state"]["type"] == "FAILED"
    assert run["state"]["data"]["type"] == "builtins.TimeoutError"
    assert "timed out after 5 s" in run["state"]["message"]


async def test_sync_timeout_applies_when_the_thread_returns(
    trioworker_autojump_clock: trio.testing.MockClock, api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    release = threading.Event()
    entered = trio.Event()

    @task(key="t.stuck", timeout_seconds=5)
    def stuck() -> str:
        trio.from_thread.run_sync(entered.set)
        release.wait(10)
        return "too late"

    [run_id] = await submit(api, "t.stuck", {})
    async with trioworker_worker(stuck) as worker:
        with trio.fail_after(30):
            await entered.wait()
        await trio.sleep(10)  # past the timeout (mock time): the thread still holds the run
        assert worker.current_tasks == 1
        release.set()
        [run] = await wait_all(api, [run_id])
    assert run["state"]["data"]["type"] == "builtins.TimeoutError"


async def test_the_limit_is_never_exceeded(api: httpx.AsyncClient, trioworker_worker: Make) -> None:
    running = 0
    most = 0
    full = trio.Event()
    gate = trio.Event()

    @task(key="t.gated")
    async def gated() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        if running == 3:
            full.set()
        await gate.wait()
        running -= 1

    ids = await submit(api, "t.gated", *[{}] * 9)
    async with trioworker_worker(gated, limit=3) as worker:
        with trio.fail_after(10):
            await full.wait()
        assert (worker.current_tasks, worker.available_tasks) == (3, 0)
        gate.set()
        await wait_all(api, ids)
    assert most == 3


async def test_limit_one_runs_one_after_the_other(api: httpx.AsyncClient, trioworker_worker: Make) -> None:
    events: list[str] = []

    @task(key="t.log")
    def log(name: str) -> None:
        events.append(f"start {name}")
        events.append(f"end {name}")

    ids = await submit(api, "t.log", {"name": "a"}, {"name": "b"}, {"name": "c"})
    async with trioworker_worker(log, limit=1):
        await wait_all(api, ids)
    assert events == ["start a", "end a", "start b", "end b", "start c", "end c"]


async def test_no_limit_runs_overlap(api: httpx.AsyncClient, trioworker_worker: Make) -> None:
    started: set[str] = set()
    both = trio.Event()

    @task(key="t.meet")
    async def meet(name: str) -> None:
        started.add(name)
        if len(started) == 2:
            both.set()
        await both.wait()  # deadlocks unless both run at once

    ids = await submit(api, "t.meet", {"name": "a"}, {"name": "b"})
    async with trioworker_worker(meet, limit=None) as worker:
        runs = await wait_all(api, ids, seconds=10)
        assert worker.available_tasks == float("inf")
    assert {r["state"]["type"] for r in runs} == {"COMPLETED"}


async def test_sync_tasks_run_in_threads_with_our_contextvars(
    api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")
    seen: list[tuple[str, bool]] = []

    @task(key="t.where")
    def where() -> None:
        seen.append((request_id.get(), threading.current_thread() is threading.main_thread()))

    request_id.set("req-7")
    ids = await submit(api, "t.where", {})
    async with trioworker_worker(where):
        await wait_all(api, ids)
    assert seen == [("req-7", False)]


async def test_a_run_stopped_mid_way_is_completed_by_another_worker(
    api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    entered = trio.Event()
    calls: list[str] = []

    @task(key="t.long")
    async def long(n: int) -> int:
        calls.append("call")
        if len(calls) == 1:
            entered.set()
            await trio.sleep_forever()  # the first worker never finishes it
        return n * 2

    [run_id] = await submit(api, "t.long", {"n": 21})
    async with trioworker_worker(long, shutdown_grace_seconds=0.1, client_id="first") as first:
        with trio.fail_after(10):
            await entered.wait()
        first.stop()
    assert (await api.get(f"/task_runs/{run_id}")).json()["state"]["type"] == "SCHEDULED"
    async with trioworker_worker(long, client_id="second"):
        [run] = await wait_all(api, [run_id])
    assert run["state"]["data"] == 42
    assert ("SCHEDULED", "Redelivered") in await history(api, run_id)


async def test_stop_lets_runs_finish_within_the_grace_period(
    api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    entered = trio.Event()
    finish = trio.Event()

    @task(key="t.finishing")
    async def finishing() -> str:
        entered.set()
        await finish.wait()
        return "done"

    [run_id] = await submit(api, "t.finishing", {})
    queued = await submit(api, "t.finishing", {})
    async with trioworker_worker(finishing, limit=1, shutdown_grace_seconds=30) as worker:
        with trio.fail_after(10):
            await entered.wait()
        worker.stop()
        assert worker.stopping
        finish.set()
    [run] = await wait_all(api, [run_id])
    assert run["state"]["data"] == "done"
    # The run it had not started yet went back to the queue.
    assert (await api.get(f"/task_runs/{queued[0]}")).json()["state"]["type"] == "SCHEDULED"


async def test_stop_task_worker_from_a_task_stops_the_worker(
    api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    @task(key="t.quit")
    def quit_now() -> None:
        raise StopTaskWorker

    [run_id] = await submit(api, "t.quit", {})
    worker = trioworker_worker(quit_now)
    with trio.fail_after(10):
        await worker.start()  # returns by itself
    assert worker.stopping
    run = (await api.get(f"/task_runs/{run_id}")).json()
    assert run["state"]["type"] == "SCHEDULED"


async def test_worker_reconnects_after_a_server_restart(
    api: httpx.AsyncClient,
    trioworker_server_control: ServerControl,
    trioworker_server: RunningServer,
    trioworker_worker: Make,
) -> None:
    entered = trio.Event()
    proceed = trio.Event()
    calls = 0

    @task(key="t.span")
    async def span(n: int) -> int:
        nonlocal calls
        calls += 1
        if n == 0:
            entered.set()
            await proceed.wait()
        return n

    [first] = await submit(api, "t.span", {"n": 0})
    async with trioworker_worker(span) as worker:
        with trio.fail_after(10):
            await entered.wait()
        await trioworker_server_control.restart()
        proceed.set()  # it finishes while the worker reconnects
        async with httpx.AsyncClient(base_url=trioworker_server.api_url) as api2:
            later = await submit(api2, "t.span", {"n": 1}, {"n": 2})
            runs = await wait_all(api2, [first, *later])
        assert [r["state"]["data"] for r in runs] == [0, 1, 2]
        assert worker._subscription is not None and worker._subscription.reconnects >= 1
    assert calls == 3  # the run held across the restart ran once


async def test_execute_task_run_directly_runs_once(api: httpx.AsyncClient, trioworker_worker: Make) -> None:
    calls = 0

    @task(key="t.once")
    async def once() -> str:
        nonlocal calls
        calls += 1
        await trio.sleep(0.01)
        return "ok"

    created = (await api.post("/task_runs", json={"task_key": "t.once"})).json()
    run = converter.structure(created, TaskRun)
    worker = trioworker_worker(once)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.execute_task_run, run)
        nursery.start_soon(worker.execute_task_run, run)
    assert calls == 1
    assert (await api.get(f"/task_runs/{run.id}")).json()["state"]["type"] == StateType.COMPLETED


def test_objects_that_are_not_tasks_are_refused() -> None:
    def plain() -> None: ...

    with pytest.raises(TypeError, match=r"is not a task: decorate the function with @trioworker\.task"):
        TaskWorker(add, plain)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one task"):
        TaskWorker()
    with pytest.raises(ValueError, match="limit must be >= 1"):
        TaskWorker(add, limit=0)


async def test_stop_before_start_and_double_start_are_errors(trioworker_worker: Make) -> None:
    worker = trioworker_worker(add)
    with pytest.raises(RuntimeError, match="not running: start"):
        worker.stop()
    async with worker:
        pass
    with pytest.raises(RuntimeError, match="already started"):
        await worker.start()


def _client_sockets_to(port: int) -> int:
    """Open TCP connections from this machine to ``port`` (ESTABLISHED or CLOSE_WAIT)."""
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            if remote_port == port and fields[3] in ("01", "08"):
                count += 1
    return count


async def test_nothing_of_the_worker_outlives_it(
    trioworker_server: RunningServer, trioworker_worker: Make
) -> None:
    port = int(trioworker_server.url.rsplit(":", 1)[1])
    root = trio.lowlevel.current_root_task()
    assert root is not None

    def worker_tasks() -> list[str]:
        """Names of live tasks running worker-side code (the in-process server's excluded)."""

        def walk(t: trio.lowlevel.Task) -> list[str]:
            return [
                t.name,
                *(n for nursery in t.child_nurseries for c in nursery.child_tasks for n in walk(c)),
            ]

        worker_side = (
            "trioworker.worker",
            "trioworker.worker.subscription",
            "trioworker.worker.engine",
            "trioworker.worker.status",
            "trio_websocket",
        )
        return [name for name in walk(root) if name.startswith(worker_side)]

    async with httpx.AsyncClient(base_url=trioworker_server.api_url) as api:
        ids = await submit(api, "t.shout", *[{"text": str(i)} for i in range(20)])
    assert worker_tasks() == []
    async with trioworker_worker(shout, add, status_server_port=0):
        async with httpx.AsyncClient(base_url=trioworker_server.api_url) as api:
            await wait_all(api, ids)
        assert _client_sockets_to(port) >= 1
        assert len(worker_tasks()) >= 3
    assert worker_tasks() == []
    # Trio waits for no thread of this run (the server's in-process ones included) for long:
    # the server's store may still be writing what the worker's leaving changed (on
    # PostgreSQL, the workers in its row). Every run here completed; a sync task abandoned
    # after the grace period would not be counted (tests/test_in_memory.py shows both, after
    # serve() returns).
    with trio.fail_after(10):
        await trio.testing.wait_all_threads_completed()
    assert trio.testing.active_thread_count() == 0
    assert _client_sockets_to(port) == 0


async def test_a_refused_api_key_is_a_clear_error(trioworker_server_control: ServerControl) -> None:
    server = await trioworker_server_control.start(api_key="right")
    worker = TaskWorker(add, api_url=server.api_url, api_key="wrong")
    with pytest.raises(SubscriptionRefused, match="refused the subscription: Unauthorized"):
        await worker.start()
    async with TaskWorker(add, api_url=server.api_url, api_key="right"):
        pass


async def test_an_unusable_api_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        await TaskWorker(add, api_url="localhost:4300/api").start()


async def test_results_that_cannot_travel_fail_the_run(
    api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    @task(key="t.huge")
    def huge() -> str:
        return "x" * (9 * 1024 * 1024)

    @task(key="t.opaque")
    def opaque() -> object:
        return object()

    ids = await submit(api, "t.huge", {}) + await submit(api, "t.opaque", {})
    after = await submit(api, "t.add", {"a": 1})
    async with trioworker_worker(huge, opaque, add):
        runs = await wait_all(api, ids + after)
    assert [r["state"]["type"] for r in runs] == ["FAILED", "FAILED", "COMPLETED"]
    assert "results are limited to 8388608 bytes" in runs[0]["state"]["message"]
    assert "cannot be reported" in runs[1]["state"]["message"]


async def test_stop_works_while_the_server_is_unreachable(refused_port: int) -> None:
    worker = TaskWorker(add, api_url=f"http://127.0.0.1:{refused_port}/api")
    returned = trio.Event()

    async def run() -> None:
        await worker.start()
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()  # connecting, or waiting to try again
        assert worker.started and not returned.is_set()  # it keeps trying: start() has not returned
        worker.stop()
        with trio.fail_after(10):
            await returned.wait()  # stop() ends start() without a server to say goodbye to
    assert worker._subscription is not None and not worker._subscription.connected


async def test_a_run_of_a_key_it_does_not_serve_is_left_or_deleted(
    api: httpx.AsyncClient, trioworker_worker: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    @task(key="t.nobody")
    async def nobody() -> str:
        return "ran where it is served"

    created = (await api.post("/task_runs", json={"task_key": "t.nobody"})).json()
    run = converter.structure(created, TaskRun)
    await trioworker_worker(add).execute_task_run(run)
    # Left as it was: a worker that serves the key still gets it and runs it.
    async with trioworker_worker(nobody):
        [ended] = await wait_all(api, [str(run.id)])
    assert (ended["state"]["type"], ended["state"]["data"]) == ("COMPLETED", "ran where it is served")
    assert ended["run_count"] == 1

    monkeypatch.setenv("TRIOWORKER_DELETE_FAILED_SUBMISSIONS", "1")
    created = (await api.post("/task_runs", json={"task_key": "t.nobody"})).json()
    doomed = converter.structure(created, TaskRun)
    await trioworker_worker(add).execute_task_run(doomed)
    assert (await api.get(f"/task_runs/{doomed.id}")).status_code == 404


async def test_runs_in_a_busy_workers_buffer_go_to_a_worker_with_a_free_slot(
    api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    entered, gate = trio.Event(), trio.Event()
    ran_by: dict[int, str] = {}

    def gated_task(worker: str) -> Any:
        async def gated(i: int) -> int:
            ran_by[i] = worker
            if i == 0:
                entered.set()
                await gate.wait()
            return i

        return task(key="t.gated")(gated)

    first, *later = await submit(api, "t.gated", *({"i": i} for i in range(4)))
    async with trioworker_worker(gated_task("busy"), limit=1, prefetch=3) as busy:
        # All four came in one delivery: run 0 in busy's one slot, 1-3 in its buffer.
        with trio.fail_after(10):
            await entered.wait()
        assert (await api.get("/health")).json()["ready"] == 0
        async with trioworker_worker(gated_task("idle"), limit=2):
            runs = await wait_all(api, later, seconds=10)  # while busy is still stuck
        assert [run["state"]["type"] for run in runs] == ["COMPLETED"] * 3
        assert ran_by == {0: "busy", 1: "idle", 2: "idle", 3: "idle"}
        for run_id in later:  # each was in busy's buffer, and handed back from there
            assert ("SCHEDULED", "Redelivered") in await history(api, run_id)
        assert busy.current_tasks == 1
        gate.set()
        [run] = await wait_all(api, [first])
    assert run["state"]["data"] == 0


def test_prefetch_is_bounded_and_needs_a_limit() -> None:
    with pytest.raises(ValueError, match="prefetch"):
        TaskWorker(add, prefetch=-1)
    with pytest.raises(ValueError, match="prefetch"):
        TaskWorker(add, prefetch=1001)
    assert TaskWorker(add, limit=None, prefetch=5).prefetch == 0  # no limit: nothing to wait for
