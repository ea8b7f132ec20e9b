"""State hooks end to end (Prefect's ``on_completion``, ``on_failure``, and
``on_cancellation``): called on a real worker with ``(task, task_run, state)`` once the
server accepted the run's end; a hook that raises is logged and changes nothing."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
import trio

import trioworker
from trioworker.models import State, StateType, TaskRun
from trioworker.worker.task_worker import TaskWorker

Make = Callable[..., TaskWorker]

#: What a hook saw: (hook, task key, run id, state type, state name, data, current run id).
Seen = tuple[str, str, str, StateType, str, Any, str | None]


def recorder(seen: list[Seen], label: str, *, sync: bool) -> Callable[..., Any]:
    """A hook (sync or async) that records what it was called with."""

    def record(task: trioworker.Task[..., Any], run: TaskRun, state: State) -> None:
        assert run.state == state  # the run, as it ended
        current = trioworker.current_run()
        seen.append(
            (
                label,
                task.key,
                str(run.id),
                state.type,
                state.name,
                state.data,
                None if current is None else str(current.task_run_id),
            )
        )

    if sync:

        def sync_hook(task: trioworker.Task[..., Any], run: TaskRun, state: State) -> None:
            assert threading.current_thread() is not threading.main_thread()  # in a worker thread
            record(task, run, state)

        return sync_hook

    async def async_hook(task: trioworker.Task[..., Any], run: TaskRun, state: State) -> None:
        await trio.lowlevel.checkpoint()
        record(task, run, state)

    return async_hook


async def test_on_completion_hooks_get_the_task_the_run_and_its_state_in_order(
    trioworker_worker: Make,
) -> None:
    seen: list[Seen] = []

    @trioworker.task(
        key="h.add",
        on_completion=[recorder(seen, "sync", sync=True), recorder(seen, "async", sync=False)],
        on_failure=[recorder(seen, "failure", sync=True)],
    )
    async def add(a: int, b: int) -> int:
        return a + b

    async with trioworker_worker(add):
        future = await add.delay(2, 3)
        assert await future.result(timeout=10) == 5
    run_id = str(future.task_run_id)
    assert seen == [
        ("sync", "h.add", run_id, StateType.COMPLETED, "Completed", 5, run_id),
        ("async", "h.add", run_id, StateType.COMPLETED, "Completed", 5, run_id),
    ]
    assert add.load_result(seen[0][5]) == 5


async def test_on_failure_hooks_run_once_the_last_retry_failed(
    trioworker_autojump_clock: trio.testing.MockClock, trioworker_worker: Make
) -> None:
    seen: list[Seen] = []
    attempts: list[int] = []

    @trioworker.task(
        key="h.flaky", retries=2, retry_delay_seconds=30, on_failure=[recorder(seen, "f", sync=False)]
    )
    def flaky() -> None:
        attempts.append(1)
        raise ConnectionError("down")

    async with trioworker_worker(flaky):
        future = await flaky.delay()
        error = await future.result(timeout=3600, raise_on_failure=False)
    assert isinstance(error, ConnectionError) and len(attempts) == 3
    [(_, _, run_id, state_type, name, data, _)] = seen  # not for the two retries
    assert (run_id, state_type, name) == (str(future.task_run_id), StateType.FAILED, "Failed")
    assert data["type"] == "builtins.ConnectionError"


async def test_a_hook_that_raises_is_logged_and_changes_nothing(
    trioworker_worker: Make, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Seen] = []

    def broken(task: trioworker.Task[..., Any], run: TaskRun, state: State) -> None:
        raise RuntimeError("the hook broke")

    async def exits(task: trioworker.Task[..., Any], run: TaskRun, state: State) -> None:
        raise SystemExit(3)  # a BaseException of the hook's own: logged too

    def forgot_async(task: trioworker.Task[..., Any], run: TaskRun, state: State) -> Any:
        return trio.lowlevel.checkpoint()  # noqa: ASYNC105 - a coroutine from a plain function

    @trioworker.task(
        key="h.echo", on_completion=[broken, exits, forgot_async, recorder(seen, "after", sync=True)]
    )
    async def echo(text: str) -> str:
        return text

    caplog.set_level(logging.ERROR, logger="trioworker.worker.hooks")
    async with trioworker_worker(echo, limit=1) as worker:
        first = await echo.delay("one")
        assert await first.result(timeout=10) == "one"
        second = await echo.delay("two")  # the worker goes on
        assert await second.result(timeout=10) == "two"
    assert [(await f.get_state()).type for f in (first, second)] == [StateType.COMPLETED] * 2
    assert worker.finished_task_runs == {"h.echo": 2} and worker.failed_task_runs == {"h.echo": 0}
    assert [s[0] for s in seen] == ["after", "after"]  # the hooks after the broken ones ran
    lines = [r.getMessage() for r in caplog.records if r.name == "trioworker.worker.hooks"]
    assert len(lines) == 6
    assert lines[0] == (
        f"run {first.task_run_id} of h.echo: hook test_a_hook_that_raises_is_logged_and_changes_nothing."
        "<locals>.broken for COMPLETED failed: RuntimeError: the hook broke"
    )
    assert "SystemExit: 3" in lines[1] and "it returned a coroutine: make the hook `async def`" in lines[2]
    assert caplog.records[0].exc_info is not None  # with its traceback


async def test_on_cancellation_hooks_run_when_a_running_run_is_cancelled(trioworker_worker: Make) -> None:
    seen: list[Seen] = []
    entered = trio.Event()
    heard = trio.Event()

    async def note(task: trioworker.Task[..., Any], run: TaskRun, state: State) -> None:
        await recorder(seen, "cancelled", sync=False)(task, run, state)
        heard.set()

    @trioworker.task(key="h.forever", on_cancellation=[note], on_completion=[recorder(seen, "no", sync=True)])
    async def forever() -> None:
        entered.set()
        await trio.sleep_forever()

    async with trioworker_worker(forever):
        future = await forever.delay()
        with trio.fail_after(10):
            await entered.wait()
        assert await future.cancel() is True
        with trio.fail_after(10):
            await heard.wait()
    [(label, _, run_id, state_type, _, _, _)] = seen
    assert (label, run_id, state_type) == ("cancelled", str(future.task_run_id), StateType.CANCELLED)


async def test_a_stopping_worker_cancels_a_hook_under_way(trioworker_worker: Make) -> None:
    in_hook = trio.Event()
    left: list[str] = []

    async def slow(task: trioworker.Task[..., Any], run: TaskRun, state: State) -> None:
        in_hook.set()
        try:
            await trio.sleep_forever()
        finally:
            left.append("cancelled")

    @trioworker.task(key="h.quick", on_completion=[slow])
    async def quick() -> int:
        return 1

    with trio.fail_after(10):
        async with trioworker_worker(quick) as worker:
            future = await quick.delay()
            await in_hook.wait()
            worker.stop(grace_seconds=0)
    assert left == ["cancelled"]  # trio.Cancelled went through the hook, not swallowed
    state = await future.get_state()
    assert state.type is StateType.COMPLETED  # the run's end was set before its hooks


def test_bad_hooks_are_refused_at_decoration() -> None:
    with pytest.raises(TypeError, match="state hooks are given as a list of functions"):
        trioworker.task(on_completion=print)(lambda: None)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="a state hook must be callable, got 5"):
        trioworker.task(on_failure=[5])(lambda: None)  # type: ignore[list-item]
