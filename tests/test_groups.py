"""Run groups (``trioworker.open_run_group`` and its blocking twin) with a real server and
real workers: what waits, what is cancelled, what is raised, as a Trio nursery has it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio

import trioworker
from trioworker.client.futures import TaskRunFuture
from trioworker.client.rest import SyncTaskRunClient, TaskRunClient
from trioworker.models import StateType, TaskRun, TaskRunCreate
from trioworker.server import RunningServer
from trioworker.tasks import task
from trioworker.worker.task_worker import TaskWorker

pytestmark = pytest.mark.every_store

DEADLINE = 30

Workers = Callable[..., TaskWorker]


class GroupFailure(Exception):
    """The tasks' own exception: importable here, so the group raises it as it is."""


@attrs.define(eq=False)
class Record:
    """What the tasks of this module did (reset before each test)."""

    started: trio.Event = attrs.field(factory=trio.Event)
    stopped: trio.Event = attrs.field(factory=trio.Event)
    release: trio.Event = attrs.field(factory=trio.Event)
    token: trio.lowlevel.TrioToken | None = None
    blocked: int = 0
    cancelled: int = 0


record = Record()


@pytest.fixture(autouse=True)
def _fresh_record() -> None:
    global record
    record = Record()


@task(key="g.echo")
async def echo(text: str) -> str:
    return text


@task(key="g.block")
async def block() -> None:
    """Runs until cancelled (or released)."""
    record.blocked += 1
    record.started.set()
    try:
        await record.release.wait()
    except trio.Cancelled:
        record.cancelled += 1
        record.stopped.set()
        raise


@task(key="g.fail")
async def fail(message: str) -> None:
    await trio.lowlevel.checkpoint()
    raise GroupFailure(message)


@task(key="g.fan_out")
async def fan_out(texts: list[str]) -> list[str]:
    """A task that runs a group of its own: its runs are its children and the group's."""
    async with trioworker.open_run_group() as group:
        await echo.map(texts)
        await block.delay()
    return [str(f.task_run.state.data) for f in group.futures if f.task_run is not None]


async def submit_nested(group: trioworker.RunGroup) -> None:
    """A call from inside the block, and a task started there: their runs join too."""
    await echo.apply_async(["nested call"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo.delay, "nested task")


async def read(*run_ids: Any) -> list[TaskRun]:
    async with TaskRunClient() as client:
        return [await client.read_task_run(run_id) for run_id in run_ids]


async def test_leaving_the_block_waits_for_every_run(trioworker_worker: Workers) -> None:
    async with trioworker_worker(echo, limit=5):
        with trio.fail_after(DEADLINE):
            async with trioworker.open_run_group() as group:
                one = await echo.delay("one")
                mapped = await echo.map(["a", "b", "c"])
                await submit_nested(group)
        assert len(group.futures) == 6 and all(f.done for f in group.futures)
        assert group.futures[:4] == [one, *mapped]  # the futures the calls gave
        results = sorted(str(f.task_run.state.data) for f in group.futures if f.task_run)
        assert results == ["a", "b", "c", "nested call", "nested task", "one"]
        async with TaskRunClient() as client:
            listed = await client.read_task_runs(group_id=group.id)
        assert {run.id for run in listed} == {f.task_run_id for f in group.futures}
        assert {run.group_id for run in listed} == {group.id}


async def test_a_failed_run_cancels_the_others_and_raises_the_tasks_own_exception(
    trioworker_worker: Workers,
) -> None:
    reached_the_end = False
    async with trioworker_worker(block, fail, limit=5):
        with (
            trio.fail_after(DEADLINE),
            pytest.RaisesGroup(pytest.RaisesExc(GroupFailure, check=lambda e: e.args == ("boom",))),
        ):
            async with trioworker.open_run_group() as group:
                blocked = await block.delay()
                await record.started.wait()
                await fail.delay("boom")
                await trio.sleep(math.inf)  # the group's failure cancels the body
                reached_the_end = True
        assert not reached_the_end
        with trio.fail_after(DEADLINE):
            await record.stopped.wait()  # the worker cancelled the blocked run's code
        [run] = await read(blocked.task_run_id)
        assert run.state.type is StateType.CANCELLED
        assert run.state.message == f"cancelled with its run group {group.id}"
        [failed, _] = [f for f in group.futures if f.task_run_id != blocked.task_run_id] + [None]
        assert failed is not None and failed.done
        with pytest.raises(GroupFailure):
            await failed.result()


async def test_several_failures_are_raised_together(trioworker_worker: Workers) -> None:
    async with trioworker_worker(fail, limit=5):
        with trio.fail_after(DEADLINE), pytest.RaisesGroup(GroupFailure, GroupFailure, GroupFailure):
            async with trioworker.open_run_group():
                await fail.map(["x", "y", "z"])


async def test_a_cancelled_block_cancels_its_runs_and_the_cancellation_propagates(
    trioworker_worker: Workers,
) -> None:
    async with trioworker_worker(block):
        with trio.fail_after(DEADLINE):
            with trio.CancelScope() as scope:
                async with trioworker.open_run_group() as group:
                    blocked = await block.delay()
                    await record.started.wait()
                    scope.cancel()
                    await trio.sleep_forever()
            assert scope.cancelled_caught  # the cancellation went through the block, not swallowed
            await record.stopped.wait()
        [run] = await read(blocked.task_run_id)
        assert run.state.type is StateType.CANCELLED
        assert run.state.message == f"cancelled with its run group {group.id}"


async def test_a_deadline_cancels_the_runs_of_the_block(
    trioworker_worker: Workers, trioworker_autojump_clock: trio.testing.MockClock
) -> None:
    later = trio.current_time()
    async with trioworker_worker(block):
        with trio.move_on_after(40) as deadline:  # on Trio's (mock) clock
            async with trioworker.open_run_group() as group:
                waiting = await block.delay()
                await record.started.wait()
        assert deadline.cancelled_caught and trio.current_time() - later >= 40
        with trio.fail_after(DEADLINE):
            await record.stopped.wait()
        [run] = await read(waiting.task_run_id)
        assert run.state.type is StateType.CANCELLED
        assert group.futures == [waiting]


async def test_the_block_raising_cancels_its_runs_and_raises_in_a_group(trioworker_worker: Workers) -> None:
    async with trioworker_worker(block):
        with trio.fail_after(DEADLINE), pytest.RaisesGroup(pytest.RaisesExc(KeyError, match="mine")):
            async with trioworker.open_run_group() as group:
                await block.delay()
                await record.started.wait()
                raise KeyError("mine")
        with trio.fail_after(DEADLINE):
            await record.stopped.wait()
        [run] = await read(group.futures[0].task_run_id)
        assert run.state.type is StateType.CANCELLED


async def test_cancel_ends_the_block_quietly_and_later_runs_are_created_cancelled(
    trioworker_worker: Workers,
) -> None:
    async with trioworker_worker(block):
        with trio.fail_after(DEADLINE):
            async with trioworker.open_run_group() as group:
                blocked = await block.delay()
                await record.started.wait()
                group.cancel()
                assert group.cancel_called
                with trio.CancelScope(shield=True):
                    late = await block.delay()  # shielded: still submitted, and cancelled with the rest
                await trio.sleep(math.inf)
            await record.stopped.wait()
            runs = await read(blocked.task_run_id, late.task_run_id)
            assert [r.state.type for r in runs] == [StateType.CANCELLED, StateType.CANCELLED]
            assert runs[1].state.message == f"cancelled with its run group {group.id}"
            # A create that reaches the server after the group's cancel (one that was in
            # flight) makes a run that is CANCELLED at once, never delivered.
            async with TaskRunClient() as client:
                stray = await client.create_task_run(TaskRunCreate(task_key="g.block", group_id=group.id))
            [again] = await read(stray.id)
        assert stray.state.type is again.state.type is StateType.CANCELLED


async def test_detached_runs_join_no_group(trioworker_worker: Workers) -> None:
    async with trioworker_worker(echo):
        with trio.fail_after(DEADLINE):
            async with trioworker.open_run_group() as group:
                loose = await echo.apply_async(["loose"], detached=True)
                kept = await echo.delay("kept")
            assert group.futures == [kept]
            assert loose.task_run is not None and loose.task_run.group_id is None and loose.task_run.detached
            assert await loose.result(timeout=DEADLINE) == "loose"


async def test_a_run_submitted_after_the_block_ended_is_refused(trioworker_worker: Workers) -> None:
    closed = trio.Event()
    refused: list[BaseException] = []

    async def submit_late() -> None:
        await closed.wait()
        try:
            await echo.delay("too late")
        except RuntimeError as exc:
            refused.append(exc)

    async with trio.open_nursery() as outer:
        async with trioworker.open_run_group():
            outer.start_soon(submit_late)  # a task started in the block keeps its context
        closed.set()
    [error] = refused
    assert "this run group's block has ended" in str(error)


async def test_a_sync_submission_from_a_thread_of_the_block_joins(trioworker_worker: Workers) -> None:
    async with trioworker_worker(echo):
        with trio.fail_after(DEADLINE):
            async with trioworker.open_run_group() as group:
                from_thread = await trio.to_thread.run_sync(echo.sync.delay, "threaded")
        [future] = group.futures
        assert future.task_run_id == from_thread.task_run_id and future.done
        assert await future.result() == "threaded"


async def test_a_group_inside_a_task_is_cancelled_with_its_run(
    trioworker_worker: Workers, trioworker_server: RunningServer
) -> None:
    async with trioworker_worker(fan_out, echo, block, limit=10):
        with trio.fail_after(DEADLINE):
            parent = await fan_out.delay(["a", "b"])
            await record.started.wait()
            async with TaskRunClient() as client:
                children = await client.read_task_runs(parent_task_run_id=parent.task_run_id)
                assert len(children) == 3 and len({run.group_id for run in children}) == 1
                echoes = [run.id for run in children if run.task_key == "g.echo"]
                await client.wait_many(echoes, wait_all=True, seconds=DEADLINE)
                answer = await client.cancel(parent.task_run_id)
            await record.stopped.wait()
        # The blocked child, cancelled with its parent (the cascade) before its group heard.
        assert len(answer.cancelled_descendants) == 1
        [blocked] = [run for run in await read(*answer.cancelled_descendants)]
        assert blocked.task_key == "g.block" and blocked.state.type is StateType.CANCELLED
        assert blocked.state.message == f"cancelled with run {parent.task_run_id}, which was cancelled"


def _sync_group(fail_one: bool) -> list[Any]:
    with trioworker.sync.open_run_group() as group:
        futures = echo.sync.map(["p", "q"])
        if fail_one:
            fail.sync.delay("sync boom")
            block.sync.delay()
    assert [f.result() for f in futures] == ["p", "q"]
    return group.futures


async def test_the_blocking_twin(trioworker_worker: Workers) -> None:
    async with trioworker_worker(echo, fail, block, limit=5):
        with trio.fail_after(DEADLINE):
            futures = await trio.to_thread.run_sync(_sync_group, False)
            assert [f.done for f in futures] == [True, True]
            with pytest.RaisesGroup(pytest.RaisesExc(GroupFailure, check=lambda e: e.args == ("sync boom",))):
                await trio.to_thread.run_sync(_sync_group, True)
            await record.stopped.wait()  # the blocked run was cancelled on its worker

        def raising() -> trioworker.sync.SyncRunGroup:
            with trioworker.sync.open_run_group():
                block.sync.delay()
                trio.from_thread.run(record.started.wait)
                raise ValueError("plain code failed")
            raise AssertionError("not reached")

        record.started, record.stopped = trio.Event(), trio.Event()
        with trio.fail_after(DEADLINE), pytest.RaisesGroup(ValueError):
            await trio.to_thread.run_sync(raising)
        with trio.fail_after(DEADLINE):
            await record.stopped.wait()

        def cancelling() -> list[trioworker.SyncTaskRunFuture[None]]:
            with trioworker.sync.open_run_group() as group:
                block.sync.delay()
                trio.from_thread.run(record.started.wait)
                group.cancel()
            with SyncTaskRunClient() as client:
                assert [r.state.type for r in client.read_task_runs(group_id=group.id)] == [
                    StateType.CANCELLED
                ]
            return group.futures

        record.started, record.stopped = trio.Event(), trio.Event()
        with trio.fail_after(DEADLINE):
            [cancelled] = await trio.to_thread.run_sync(cancelling)
            await record.stopped.wait()
        assert isinstance(cancelled, trioworker.SyncTaskRunFuture)


async def test_futures_of_a_group_are_its_runs_in_order(trioworker_worker: Workers) -> None:
    async with trioworker_worker(echo):
        with trio.fail_after(DEADLINE):
            async with trioworker.open_run_group() as group:
                made = [await echo.delay(str(i)) for i in range(3)]
        assert [f.task_run_id for f in group.futures] == [f.task_run_id for f in made]
        assert all(isinstance(f, TaskRunFuture) for f in group.futures)
        assert repr(group).startswith(f"<RunGroup {group.id} runs=3 pending=0")
