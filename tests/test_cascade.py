"""Cancellation reaches children: cancelling a run cancels every run submitted from inside
it (and from inside those) that has not ended, wherever it is (running on another worker,
queued, delayed, waiting for others), decided by the server, so that it works when the
parent's worker is gone; detached runs opt out. Real server, real workers; a killed worker
is a real process."""

from __future__ import annotations

import signal
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from trioworker.client.rest import TaskRunClient
from trioworker.models import TIMED_OUT, StateType, TaskRun, TaskRunCreate
from trioworker.server import RunningServer
from trioworker.tasks import task
from trioworker.worker.task_worker import TaskWorker

from .test_cli_tools import Cli, make_cli
from .test_cli_worker import OUTPUT_TIMEOUT, start_worker, within, worker_env, write

pytestmark = pytest.mark.every_store

DEADLINE = 30

Workers = Callable[..., TaskWorker]


@attrs.define(eq=False)
class Record:
    """Per task: when its code started, and when it was cancelled (reset before each test)."""

    started: defaultdict[str, trio.Event] = attrs.field(factory=lambda: defaultdict(trio.Event))
    stopped: defaultdict[str, trio.Event] = attrs.field(factory=lambda: defaultdict(trio.Event))
    release: trio.Event = attrs.field(factory=trio.Event)

    async def run_until_cancelled(self, name: str) -> None:
        self.started[name].set()
        try:
            await self.release.wait()
        except trio.Cancelled:
            self.stopped[name].set()
            raise


record = Record()


@pytest.fixture(autouse=True)
def _fresh_record() -> None:
    global record
    record = Record()


@task(key="c.grandchild")
async def grandchild() -> None:
    await record.run_until_cancelled("grandchild")


@task(key="c.child")
async def child() -> None:
    await grandchild.delay()
    await record.run_until_cancelled("child")


@task(key="c.unserved")
async def unserved() -> None:
    """No worker of these tests serves it: its runs wait in the queue."""


@task(key="c.parent")
async def parent(later: datetime) -> None:
    running = await child.delay()  # runs on another worker, and submits a grandchild to a third
    await unserved.apply_async(scheduled_time=later)  # delayed
    await unserved.apply_async(wait_for=[running])  # waiting for another run
    await unserved.delay()  # queued
    await unserved.apply_async(detached=True)  # fire and forget
    await record.run_until_cancelled("parent")


@task(key="c.detached_child")
async def detached_child() -> str:
    record.started["detached_child"].set()
    await record.release.wait()
    return "outlived its parent"


@task(key="c.abandoning")
async def abandoning() -> None:
    await detached_child.apply_async(detached=True)
    await record.run_until_cancelled("abandoning")


@task(key="c.impatient", timeout_seconds=5)
async def impatient() -> None:
    await grandchild.delay()
    await trio.sleep_forever()


async def descendants_of(run_id: uuid.UUID) -> list[TaskRun]:
    async with TaskRunClient() as client:
        return await client.descendants(run_id)


async def test_a_cancel_reaches_every_descendant_wherever_it_is(trioworker_worker: Workers) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    async with (
        trioworker_worker(parent),
        trioworker_worker(child),
        trioworker_worker(grandchild),
    ):
        future = await parent.delay(later)
        with trio.fail_after(DEADLINE):
            for name in ("parent", "child", "grandchild"):
                await record.started[name].wait()
            async with TaskRunClient() as client:
                answer = await client.cancel(future.task_run_id)
            for name in ("parent", "child", "grandchild"):
                await record.stopped[name].wait()  # each on its own worker, told by the server
    assert answer.state.type is StateType.CANCELLED
    tree = await descendants_of(future.task_run_id)
    assert sorted(run.task_key for run in tree) == ["c.child", "c.grandchild", *["c.unserved"] * 4]
    [detached] = [run for run in tree if run.detached]
    assert detached.state.type is StateType.SCHEDULED  # left alone
    cancelled = [run for run in tree if not run.detached]
    assert {run.id for run in cancelled} == set(answer.cancelled_descendants)
    why = f"cancelled with run {future.task_run_id}, which was cancelled"
    assert {(run.state.type, run.state.message) for run in cancelled} == {(StateType.CANCELLED, why)}
    [grandchild_run] = [run for run in tree if run.task_key == "c.grandchild"]
    [child_run] = [run for run in tree if run.task_key == "c.child"]
    assert grandchild_run.parent_task_run_id == child_run.id  # reached through its parent


async def test_detached_children_outlive_their_parents_cancel(trioworker_worker: Workers) -> None:
    async with trioworker_worker(abandoning, detached_child):
        future = await abandoning.delay()
        with trio.fail_after(DEADLINE):
            await record.started["abandoning"].wait()
            await record.started["detached_child"].wait()
            async with TaskRunClient() as client:
                answer = await client.cancel(future.task_run_id)
                await record.stopped["abandoning"].wait()
                assert answer.cancelled_descendants == []
                [kept] = await client.read_task_runs(parent_task_run_id=future.task_run_id)
                assert kept.detached and kept.state.type is StateType.RUNNING
                record.release.set()
                ended = await client.wait(kept.id, seconds=DEADLINE)
    assert ended.state.type is StateType.COMPLETED and ended.state.data == "outlived its parent"


async def test_a_timed_out_attempt_cancels_its_children(
    trioworker_worker: Workers, trioworker_autojump_clock: trio.testing.MockClock
) -> None:
    async with trioworker_worker(impatient, grandchild):
        future = await impatient.delay()
        with trio.fail_after(DEADLINE):
            await record.started["grandchild"].wait()
            await record.stopped["grandchild"].wait()  # the parent's timeout (5 s on Trio's clock)
            run = await future.wait()
    assert run is not None and run.state.type is StateType.FAILED
    assert run.state.state_details.reason == TIMED_OUT
    [cancelled] = await descendants_of(future.task_run_id)
    assert cancelled.state.type is StateType.CANCELLED
    assert cancelled.state.message == f"cancelled with run {future.task_run_id}, which ran out of time"


#: The parent's worker, a process of its own that the test kills.
KILLED_PARENT_SOURCE = """
import sys

import trio

from trioworker import task


@task(key="c.orphan")
async def orphan() -> None:
    ...  # never runs here: the test's own worker serves c.orphan


@task(key="c.doomed_parent")
async def doomed_parent() -> None:
    await orphan.delay()
    print("child submitted", file=sys.stderr, flush=True)
    await trio.sleep_forever()
"""


@task(key="c.orphan")
async def orphan() -> None:
    await record.run_until_cancelled("orphan")


async def test_a_cancel_reaches_the_children_of_a_parent_whose_worker_was_killed(
    tmp_path: Path, api: httpx.AsyncClient, trioworker_server: RunningServer, trioworker_worker: Workers
) -> None:
    tasks_file = write(tmp_path / "doomed.py", KILLED_PARENT_SOURCE)
    env = worker_env(TRIOWORKER_API_URL=trioworker_server.api_url)
    created = await api.post("/task_runs", json={"task_key": "c.doomed_parent"})
    parent_id = created.json()["id"]
    async with trioworker_worker(orphan), trio.open_nursery() as nursery:
        process, output = await start_worker(nursery, [f"{tasks_file}:doomed_parent"], env)
        await output.wait_for("child submitted")
        with within(OUTPUT_TIMEOUT, output):
            await record.started["orphan"].wait()
        process.kill()  # SIGKILL: the parent's worker is gone, with no word to the server
        with within(OUTPUT_TIMEOUT, output):
            assert await process.wait() == -signal.SIGKILL
        response = await api.post(f"/task_runs/{parent_id}/cancel")
        assert response.status_code == 200, response.text
        [orphan_id] = response.json()["cancelled_descendants"]
        with trio.fail_after(DEADLINE):
            await record.stopped["orphan"].wait()
    run = (await api.get(f"/task_runs/{orphan_id}")).json()
    assert run["parent_task_run_id"] == parent_id
    assert run["state"]["type"] == "CANCELLED"
    assert (await api.get(f"/task_runs/{parent_id}")).json()["state"]["type"] == "CANCELLED"


async def test_deleting_a_running_parent_cancels_its_children(trioworker_worker: Workers) -> None:
    async with trioworker_worker(child, grandchild):
        future = await child.delay()
        with trio.fail_after(DEADLINE):
            await record.started["grandchild"].wait()
            async with TaskRunClient() as client:
                [below] = await client.descendants(future.task_run_id)
                await client.delete(future.task_run_id)
                await record.stopped["child"].wait()
                await record.stopped["grandchild"].wait()
                gone = await client.read_task_run(below.id)
    assert gone.state.type is StateType.CANCELLED
    assert gone.state.message == f"cancelled with run {future.task_run_id}, which was deleted"


@pytest.fixture
def cli(trioworker_server: RunningServer) -> Cli:
    return make_cli(trioworker_server.api_url)


async def test_the_command_line_shows_the_tree_and_cancels_it(cli: Cli, trioworker_worker: Workers) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    async with trioworker_worker(parent, child, grandchild):
        future = await parent.delay(later)
        with trio.fail_after(DEADLINE):
            await record.started["grandchild"].wait()
            shown = await cli("run", str(future.task_run_id)[:8])
            assert shown.returncode == 0, shown.stderr.decode()
            cancelled = await cli("cancel", str(future.task_run_id))
            await record.stopped["grandchild"].wait()
    text = shown.stdout.decode()
    assert "Runs submitted from it, at any depth: 6" in text
    tree = text[text.index("Runs submitted from it") :].splitlines()[1:]
    [root] = [line for line in tree if "c.parent" in line]
    [nested] = [line for line in tree if "c.grandchild" in line]
    [detached] = [line for line in tree if "detached" in line]
    assert root.startswith(str(future.task_run_id)[:8]) and "RUNNING" in root
    # The grandchild hangs under the child: deeper than the parent's children.
    child_line = next(line for line in tree if "c.child" in line)
    assert nested.index("c.grandchild") > child_line.index("c.child")
    assert "c.unserved" in detached
    assert cancelled.returncode == 0, cancelled.stderr.decode()
    assert cancelled.stdout.decode() == (
        f"cancelled run {future.task_run_id} (c.parent; it was RUNNING) and 5 of its descendants\n"
    )


async def test_a_retry_of_a_run_cancelled_with_its_parent_runs(trioworker_server: RunningServer) -> None:
    group = uuid.uuid4()
    async with TaskRunClient() as client:
        [top] = await client.create_task_runs([TaskRunCreate(task_key="c.unserved")])
        [below] = await client.create_task_runs(
            [TaskRunCreate(task_key="c.unserved", parent_task_run_id=top.id, group_id=group)]
        )
        answer = await client.cancel(top.id)
        assert answer.cancelled_descendants == [below.id]
        await client.cancel_group(group)
        again = await client.retry(below.id)
    # The operator asked for it: it is queued (in no group, detached from its cancelled parent).
    assert again.state.type is StateType.SCHEDULED
    assert (again.parent_task_run_id, again.group_id, again.detached) == (top.id, None, True)
