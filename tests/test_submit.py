"""Submitting runs and awaiting results, end to end with the real server and a real worker."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

import trioworker
from trioworker import (
    NotFound,
    SyncTaskRunFuture,
    TaskRunFailed,
    TaskRunFuture,
    TaskWorker,
    current_run,
    task,
    unmapped,
)
from trioworker.server import RunningServer
from trioworker.testing import ServerControl

from .helpers import history

#: Every test here runs its server on each kind of store (tests/stores.py).
pytestmark = pytest.mark.every_store

Make = Callable[..., TaskWorker]


class Oops(Exception):
    """A task's own exception type, importable by the submitter."""


@attrs.frozen
class Money:
    cents: int


@task(key="s.add")
async def add(a: int, b: int = 10) -> int:
    return a + b


@task(key="s.shout")
def shout(text: str, suffix: str = "!") -> str:
    return text.upper() + suffix


@task(key="s.total")
def total(amounts: list[Money], fee: Money = Money(0)) -> Money:
    return Money(sum(a.cents for a in amounts) + fee.cents)


@task(key="s.fail")
def fail(kind: str) -> None:
    if kind == "own":
        raise Oops("own type")
    local = type("LocalError", (Exception,), {})
    raise local("not importable")


def count_requests(client: trioworker.TaskRunClient) -> Counter[str]:
    """Count this client's requests by path (the http client's event hook)."""
    seen: Counter[str] = Counter()

    async def hook(request: httpx.Request) -> None:
        seen[request.url.path.split("/api", 1)[1]] += 1

    client._http.event_hooks["request"].append(hook)
    return seen


async def test_delay_returns_a_future_with_the_result(trioworker_worker: Make) -> None:
    future = await add.delay(1, 2)
    assert isinstance(future, TaskRunFuture)
    assert future.task_run is not None and future.task_run.state.type.value == "SCHEDULED"
    async with trioworker_worker(add):
        assert await future.result(timeout=10) == 3
    assert future.done
    assert future.state is not None and future.state.type.value == "COMPLETED"


async def test_the_four_states_of_a_plain_run(api: httpx.AsyncClient, trioworker_worker: Make) -> None:
    future = await shout.delay("hi")
    async with trioworker_worker(shout):
        assert await future.result(timeout=10) == "HI!"
    assert await history(api, str(future.task_run_id)) == [
        ("SCHEDULED", "Scheduled"),
        ("PENDING", "Pending"),
        ("RUNNING", "Running"),
        ("COMPLETED", "Completed"),
    ]


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "missing a required argument: 'a'"),
        ((1,), {"a": 2}, "multiple values for argument 'a'"),
        ((1,), {"c": 3}, "got an unexpected keyword argument 'c'"),
        ((1, 2, 3), {}, "too many positional arguments"),
    ],
)
async def test_arguments_are_bound_at_submit_time(
    api: httpx.AsyncClient, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        await add.delay(*args, **kwargs)
    assert (await api.get("/task_runs")).json() == []


async def test_defaults_are_filled_in_and_attrs_arguments_round_trip(trioworker_worker: Make) -> None:
    future = await total.delay([Money(100), Money(250)])
    assert future.task_run is not None
    assert future.task_run.parameters == {"amounts": [{"cents": 100}, {"cents": 250}], "fee": {"cents": 0}}
    async with trioworker_worker(total):
        assert await future.result(timeout=10) == Money(350)


async def test_a_future_argument_is_replaced_by_its_result(trioworker_worker: Make) -> None:
    first = await add.delay(1, 2)
    second = await add.apply_async(args=[first], kwargs={"b": 100})
    assert second.task_run is not None and second.task_run.wait_for == [first.task_run_id]
    third = await total.apply_async(kwargs={"amounts": [Money(1)], "fee": await total.delay([Money(5)])})
    async with trioworker_worker(add, total):
        assert await second.result(timeout=10) == 103
        assert await third.result(timeout=10) == Money(6)


async def test_wait_for_fails_clearly_when_an_upstream_failed(trioworker_worker: Make) -> None:
    broken = await fail.delay("own")
    after = await add.apply_async(args=[1], wait_for=[broken])
    async with trioworker_worker(add, fail):
        with pytest.raises(TaskRunFailed, match=r"not started: a run it waits for .* ended FAILED") as info:
            await after.result(timeout=10)
    assert info.value.state_type == "FAILED"


async def test_failures_raise_the_tasks_own_exception_type(trioworker_worker: Make) -> None:
    own = await fail.delay("own")
    foreign = await fail.delay("local")
    async with trioworker_worker(fail):
        with pytest.raises(Oops, match="own type") as info:
            await own.result(timeout=10)
        assert any(
            "Remote traceback" in note and 'raise Oops("own type")' in note for note in info.value.__notes__
        )
        with pytest.raises(TaskRunFailed) as failed:
            await foreign.result(timeout=10)
    assert failed.value.exc_type == "tests.test_submit.LocalError"
    assert failed.value.remote_traceback is not None and "not importable" in failed.value.remote_traceback
    returned: object = await own.result(raise_on_failure=False)
    assert isinstance(returned, Oops)


async def test_result_times_out_while_the_run_is_queued(trioworker_server: RunningServer) -> None:
    future = await add.delay(1)
    with pytest.raises(TimeoutError, match="has not finished yet"):
        await future.result(timeout=0.1)
    assert (await future.get_state()).type.value == "SCHEDULED"


async def test_waiting_on_thousands_of_futures_costs_a_few_requests(trioworker_worker: Make) -> None:
    async with trioworker.connect(channel=False) as client:
        futures = await add.map(range(2000))
        requests = count_requests(client)
        in_flight = [0, 0]  # long-polls now, most at once
        wait_many = client.wait_many

        async def counted(*args: Any, **kwargs: Any) -> Any:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
            try:
                return await wait_many(*args, **kwargs)
            finally:
                in_flight[0] -= 1

        client.wait_many = counted  # type: ignore[method-assign]  # counts, then calls the real one
        results: dict[int, int] = {}
        async with trioworker_worker(add, limit=100), trio.open_nursery() as nursery:

            async def one(i: int, future: TaskRunFuture[int]) -> None:
                results[i] = await future.result(timeout=60)

            for i, future in enumerate(futures):
                nursery.start_soon(one, i, future)
        assert results == {i: i + 10 for i in range(2000)}
        # One shared long-poll at a time, restarted when new waiters arrive: never one per
        # future. How many rounds it takes follows the pace of completions (machine load),
        # so the count has a wide bound; the one-at-a-time rule is exact.
        assert in_flight == [0, 1]
        assert requests["/task_runs/wait"] <= 2000 / 20


async def test_wait_all_and_as_completed(trioworker_worker: Make) -> None:
    async with trioworker.connect() as client:
        futures = await shout.map(["a", "b", "c"], suffix=unmapped("?"))
        requests = count_requests(client)
        async with trioworker_worker(shout):
            await trioworker.wait_all(futures, timeout=10)
            assert [await f.result() for f in futures] == ["A?", "B?", "C?"]
            seen = [f.task_run_id async for f in trioworker.as_completed(futures)]
        assert sorted(seen) == sorted(f.task_run_id for f in futures)
        assert requests["/task_runs/wait"] <= 3


async def test_map_submits_in_batches_and_keeps_order(trioworker_worker: Make) -> None:
    async with trioworker.connect(channel=False) as client:
        requests = count_requests(client)
        futures = await add.map(range(1200), b=unmapped(0))
        assert requests["/task_runs/batch"] == 3  # 500 + 500 + 200
        paired = await shout.map(["x", "y"], suffix=["1", "2"])
    async with trioworker_worker(add, shout, limit=50):
        await trioworker.wait_all([*futures, *paired], timeout=30)
    assert [await f.result() for f in futures[:5]] == [0, 1, 2, 3, 4]
    assert [await f.result() for f in paired] == ["X1", "Y2"]


async def test_map_refuses_uneven_or_missing_iterables() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        await add.map([1, 2], b=[1])
    with pytest.raises(ValueError, match="at least one iterable"):
        await add.map(1, b=2)


async def test_scheduled_runs_are_not_delivered_before_their_time(
    trioworker_autojump_clock: trio.testing.MockClock,
    trioworker_server: RunningServer,
    trioworker_worker: Make,
) -> None:
    clock = trioworker_server.service.dispatcher.clock
    later = datetime.fromtimestamp(clock(), UTC) + timedelta(minutes=5)
    future = await add.apply_async(args=[1], scheduled_time=later)
    started = trio.current_time()
    async with trioworker_worker(add):
        assert await future.result(timeout=3600) == 11
    assert trio.current_time() - started >= 300 - 1


async def test_cancelling_a_scheduled_run_means_it_never_runs(trioworker_worker: Make) -> None:
    calls: list[int] = []

    @task(key="s.record")
    def record(i: int) -> None:
        calls.append(i)

    doomed = await record.delay(1)
    kept = await record.delay(2)
    assert await doomed.cancel() is True
    async with trioworker_worker(record):
        await kept.result(timeout=10)
    assert calls == [2]
    assert (await doomed.get_state()).type.value == "CANCELLED"
    with pytest.raises(TaskRunFailed, match="CANCELLED"):
        await doomed.result()
    assert await kept.cancel() is False  # already finished


async def test_cancelling_a_running_async_run_cancels_its_scope(trioworker_worker: Make) -> None:
    entered = trio.Event()
    cancelled = trio.Event()

    @task(key="s.forever")
    async def forever() -> None:
        entered.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    future = await forever.delay()
    async with trioworker_worker(forever, add, limit=1) as worker:
        with trio.fail_after(10):
            await entered.wait()
        assert await future.cancel() is True
        with trio.fail_after(10):
            await cancelled.wait()
        assert (await future.get_state()).type.value == "CANCELLED"
        # The worker is free again: the cancelled run no longer counts against its credit.
        assert await (await add.delay(1)).result(timeout=10) == 11
        assert worker.current_tasks == 0


async def test_tags_context_and_parent_are_visible_inside_the_run(trioworker_worker: Make) -> None:
    @task(key="s.inspect")
    async def inspect_run() -> dict[str, Any]:
        run = current_run()
        assert run is not None
        child = await shout.delay("child")
        return {
            "id": str(run.task_run_id),
            "tags": list(run.tags),
            "context": run.context,
            "child": str(child.task_run_id),
        }

    with trioworker.tags("nightly"), trioworker.tags("billing"), trioworker.user_context(user="ann"):
        future = await inspect_run.delay()
    assert current_run() is None
    async with trioworker_worker(inspect_run, shout):
        seen = await future.result(timeout=10)
        child = TaskRunFuture[str](uuid.UUID(seen["child"]), shout)
        assert await child.result(timeout=10) == "CHILD!"
    assert seen["tags"] == ["nightly", "billing"]
    assert seen["context"] == {"user": "ann"}
    assert child.task_run is not None
    assert str(child.task_run.parent_task_run_id) == seen["id"]
    assert child.task_run.tags == ["nightly", "billing"]  # inherited by what the run submits


async def test_same_idempotency_key_gives_the_same_run(trioworker_server: RunningServer) -> None:
    first = await add.apply_async(args=[1], idempotency_key="invoice-42")
    second = await add.apply_async(args=[2], idempotency_key="invoice-42")
    assert first.task_run_id == second.task_run_id


async def test_blocking_twins_from_a_thread(trioworker_worker: Make) -> None:
    def script() -> tuple[str, list[int], str]:
        future = shout.sync.delay("plain")
        assert isinstance(future, SyncTaskRunFuture)
        futures = add.sync.map([1, 2, 3])
        trioworker.sync.wait_all(futures, timeout=20)
        done = [f.task_run_id for f in trioworker.sync.as_completed(futures)]
        assert len(done) == 3
        with trioworker.sync.connect():
            state = future.get_state().type.value
        return future.result(timeout=20), [f.result() for f in futures], state

    async with trioworker_worker(shout, add):
        text, sums, state = await trio.to_thread.run_sync(script)
    assert (text, sums) == ("PLAIN!", [11, 12, 13])
    assert state in {"SCHEDULED", "PENDING", "RUNNING", "COMPLETED"}


async def test_a_future_of_a_deleted_run_says_so(api: httpx.AsyncClient) -> None:
    future = await add.delay(1)
    await api.delete(f"/task_runs/{future.task_run_id}")
    with pytest.raises(NotFound):
        await future.wait(timeout=5)


async def test_the_channel_carries_creates_and_results_without_http(trioworker_worker: Make) -> None:
    async with trioworker.connect() as client:
        assert client.channel is not None
        requests = count_requests(client)
        async with trioworker_worker(add):
            for i in range(20):
                future = await add.delay(i)
                assert await future.result(timeout=10) == i + 10
            futures = await add.map(range(600))
            assert [await f.result(timeout=30) for f in futures][-1] == 609
        with pytest.raises(TypeError):
            await add.delay()  # type: ignore[call-arg]
        assert sum(requests.values()) == 0


async def test_refused_input_over_the_channel_is_an_api_error(trioworker_server: RunningServer) -> None:
    async with trioworker.connect() as client:
        assert client.channel is not None
        run = await client.create_task_run(trioworker.models.TaskRunCreate(task_key="k"))
        with pytest.raises(trioworker.ApiError, match="task_key"):
            await client.create_task_run(trioworker.models.TaskRunCreate(task_key=""))
        assert (await client.read_task_run(run.id)).id == run.id  # the channel is still fine
        assert client.channel.usable


async def test_losing_the_channel_falls_back_to_http(
    trioworker_server_control: ServerControl, trioworker_server: RunningServer
) -> None:
    async with trioworker.connect() as client:
        channel = client.channel
        assert channel is not None
        lost = channel._lost
        await trioworker_server_control.restart()
        with trio.fail_after(10):
            await lost.wait()  # the reader saw the socket close (a moment after the restart)
        assert not channel.usable
        future = await add.delay(2)  # over HTTP now
        assert future.task_run is not None
        assert (await future.get_state()).type.value == "SCHEDULED"


async def test_a_task_in_a_script_is_keyed_by_the_scripts_name(tmp_path: Any) -> None:
    script = tmp_path / "myscript.py"
    script.write_text("import trioworker\n@trioworker.task\ndef say(): ...\nprint(say.key)\n")
    import sys

    result = await trio.run_process([sys.executable, str(script)], capture_stdout=True)
    assert result.stdout.decode().strip() == "myscript.say"


def test_task_key_is_prefects_name_for_the_key() -> None:
    @trioworker.task(key="submit.prefect_named")
    def named() -> None: ...

    @trioworker.task
    def default_keyed() -> None: ...

    assert named.task_key == named.key == "submit.prefect_named"
    assert default_keyed.task_key == default_keyed.key == f"{__name__}.{default_keyed.fn.__qualname__}"
    assert named.with_options(key="submit.other").task_key == "submit.other"
    with pytest.raises(AttributeError):
        named.task_key = "submit.changed"  # type: ignore[misc]


async def test_cancelling_a_running_sync_run_lets_its_thread_finish(trioworker_worker: Make) -> None:
    import threading

    entered = trio.Event()
    release = threading.Event()
    finished: list[bool] = []

    @task(key="s.blocking")
    def blocking() -> str:
        trio.from_thread.run_sync(entered.set)
        release.wait(20)
        finished.append(True)
        return "discarded"

    future = await blocking.delay()
    async with trioworker_worker(blocking, add, limit=1) as worker:
        with trio.fail_after(10):
            await entered.wait()
        assert await future.cancel() is True
        assert (await future.get_state()).type.value == "CANCELLED"
        assert worker.current_tasks == 1  # the thread is still running: it cannot be interrupted
        release.set()
        assert await (await add.delay(1)).result(timeout=10) == 11
    assert finished == [True]
    assert (await future.get_state()).type.value == "CANCELLED"  # the late result was discarded


async def test_a_future_made_from_an_id_as_text_sees_its_run_end(trioworker_worker: Make) -> None:
    async with trioworker_worker(add):
        done = await add.delay(1, 2)
        assert await done.result(timeout=10) == 3
    text = str(done.task_run_id)  # as `trioworker submit` prints it
    future: TaskRunFuture[int] = TaskRunFuture(text, add)  # the text is read as a UUID
    assert future.task_run_id == done.task_run_id
    with trio.fail_after(5):  # it used to wait out its whole timeout, asking the server again and again
        assert await future.result(timeout=60) == 3
        assert [f.task_run_id async for f in trioworker.as_completed([future])] == [done.task_run_id]
    blocking = trioworker.SyncTaskRunFuture(text, add)
    assert await trio.to_thread.run_sync(lambda: blocking.result(timeout=60)) == 3


@pytest.mark.parametrize("bad", ["not-a-uuid", "", 42, None, b"\x00" * 16])
def test_a_future_needs_a_run_id(bad: object) -> None:
    with pytest.raises(ValueError, match="is not a task run id"):
        TaskRunFuture(bad, add)  # type: ignore[arg-type]
