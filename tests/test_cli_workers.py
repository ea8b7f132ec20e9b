"""`trioworker workers`: the workers connected to the server, as a user runs the command (a
subprocess) against the test's in-process server and real workers."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

import trio

from trioworker.client.rest import TaskRunClient
from trioworker.tasks import task
from trioworker.worker.task_worker import TaskWorker

from .test_cli_tools import Cli, cli, one_error_line

__all__ = ["cli"]  # a fixture, used by name

Make = Callable[..., TaskWorker]


def cells(line: str) -> list[str]:
    """The cells of one row of a rich table."""
    return [cell.strip() for cell in line.split("│")[1:-1]]


@task(key="w.say")
async def say(text: str) -> str:
    return text


async def test_workers_are_listed_with_their_keys_limits_and_runs_in_flight(
    cli: Cli, trioworker_worker: Make
) -> None:
    entered = trio.Event()
    release = trio.Event()

    @task(key="w.hold")
    async def hold() -> str:
        entered.set()
        await release.wait()
        return "held"

    empty = await cli("workers")
    assert empty.returncode == 0, empty.stderr
    assert "No worker is connected at http://127.0.0.1:" in empty.stdout.decode()
    async with (
        trioworker_worker(hold, say, limit=3, prefetch=2, client_id="host-one") as first,
        trioworker_worker(say, limit=7, client_id="host-two"),
    ):
        future = await hold.delay()
        with trio.fail_after(10):
            await entered.wait()
        table = await cli("workers")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.decode().splitlines()
        [one] = [line for line in lines if "host-one" in line]
        [two] = [line for line in lines if "host-two" in line]
        assert cells(one)[1:5] == ["w.hold, w.say", "3", "2", "1"], one  # keys, limit, prefetch, held
        assert cells(two)[1:5] == ["w.say", "7", "0", "0"], two
        assert lines[-1] == "2 workers"
        assert first.started_at is not None
        assert first.started_at.astimezone().strftime("%Y-%m-%d %H:%M") in one  # connected since, local

        only_hold = await cli("workers", "--task-key", "w.hold", "--json")
        assert only_hold.returncode == 0, only_hold.stderr
        [listed] = json.loads(only_hold.stdout)
        assert listed["client_id"] == "host-one"
        assert (listed["task_keys"], listed["limit"], listed["prefetch"], listed["runs_in_flight"]) == (
            ["w.hold", "w.say"],
            3,
            2,
            1,
        )
        assert datetime.fromisoformat(listed["connected_since"]).tzinfo is not None
        async with TaskRunClient() as client:  # the command shows what the API gives
            assert [w["client_id"] for w in await client.task_workers("w.hold")] == ["host-one"]
        both = json.loads((await cli("workers", "--json")).stdout)
        assert [w["client_id"] for w in both] == ["host-one", "host-two"]
        nobody = await cli("workers", "--task-key", "w.other")
        assert "No worker is connected to w.other at" in nobody.stdout.decode()
        release.set()
        assert await future.result(timeout=10) == "held"


async def test_an_unreachable_server_is_one_line(cli: Cli, refused_port: int) -> None:
    result = await cli("workers", "--api-url", f"http://127.0.0.1:{refused_port}")
    assert result.returncode == 1
    line = one_error_line(result)
    assert line.startswith(
        f"trioworker: cannot reach the trioworker server at http://127.0.0.1:{refused_port}/api"
    )
