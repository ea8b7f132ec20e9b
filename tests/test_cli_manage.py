"""`trioworker cancel`, `retry`, `delete`, ids by their start, `--json` and `--`, as a user
runs them: real subprocesses talking to the test's in-process server and worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from trioworker.cli import parse_args
from trioworker.client.futures import TaskRunFuture
from trioworker.client.rest import SyncTaskRunClient, TaskRunClient
from trioworker.models import State, StateType, TaskRun, TaskRunCreate, converter
from trioworker.server import RunningServer
from trioworker.worker.task_worker import TaskWorker

from .test_cli_tools import (
    TASKS_SOURCE,
    Cli,
    add,
    fail,
    finished_runs,
    make_cli,
    one_error_line,
    run_all,
    short,
)

#: Three runs whose ids start alike: 0b7c7c36 names them all, 0b7c7c36-8d3a two of them.
ALIKE = [
    uuid.UUID("0b7c7c36-8d3a-4a4e-9f6e-2f1d2c9b6a10"),
    uuid.UUID("0b7c7c36-8d3a-4a4e-9f6e-2f1d2c9b6a11"),
    uuid.UUID("0b7c7c36-9d3a-4a4e-9f6e-2f1d2c9b6a10"),
]


@pytest.fixture
def cli(trioworker_server: RunningServer) -> Cli:
    return make_cli(trioworker_server.api_url)


@pytest.fixture
def tasks_file(tmp_path: Path) -> Path:
    path = tmp_path / "tools_tasks.py"
    path.write_text(TASKS_SOURCE)
    return path


async def create_alike() -> list[TaskRun]:
    async with TaskRunClient() as client:
        return await client.create_task_runs([TaskRunCreate(task_key="k", id=run_id) for run_id in ALIKE])


async def read(run_id: uuid.UUID) -> TaskRun:
    async with TaskRunClient() as client:
        return await client.read_task_run(run_id)


@pytest.mark.every_store
async def test_a_run_is_named_by_the_start_of_its_id_where_it_is_unique(cli: Cli) -> None:
    await create_alike()
    unique, with_dashes, upper, whole, ambiguous, more = await run_all(
        cli,
        ["run", "0b7c7c36-9"],
        ["run", "0b7c7c36-8d3a-4a4e-9f6e-2f1d2c9b6a1", "--json"],
        ["run", "0B7C7C368D3A4A4E9F6E2F1D2C9B6A11", "--json"],
        ["run", str(ALIKE[0]), "--json"],
        ["run", "0b7c7c36"],
        ["cancel", "0b7c7c36-8d3a"],
    )
    assert unique.returncode == 0, unique.stderr.decode()
    assert str(ALIKE[2]) in unique.stdout.decode()
    assert one_error_line(with_dashes) == (
        "trioworker: the id prefix '0b7c7c36-8d3a-4a4e-9f6e-2f1d2c9b6a1' is ambiguous: 2 runs' ids "
        f"start with it: {ALIKE[0]} (k), {ALIKE[1]} (k); give more of the id"
    )
    assert json.loads(upper.stdout)["id"] == str(ALIKE[1])
    assert json.loads(whole.stdout)["id"] == str(ALIKE[0])
    line = one_error_line(ambiguous)
    assert line.startswith("trioworker: the id prefix '0b7c7c36' is ambiguous: 3 runs' ids start with it: ")
    assert one_error_line(more).startswith("trioworker: the id prefix '0b7c7c36-8d3a' is ambiguous: 2 runs")
    assert [(await read(run_id)).state.type for run_id in ALIKE] == [
        StateType.SCHEDULED
    ] * 3  # none cancelled


async def test_run_json_gives_the_run_and_its_history(
    cli: Cli, trioworker_worker: Callable[..., TaskWorker]
) -> None:
    ids = await finished_runs(trioworker_worker)
    result = await cli("run", short(ids["add1"]), "--json")
    assert result.returncode == 0, result.stderr.decode()
    shown = json.loads(result.stdout)
    history = shown.pop("history")
    assert converter.structure(shown, TaskRun) == await read(ids["add1"])
    assert [change["type"] for change in history] == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]
    assert shown["state"]["data"] == 5


async def test_cancel_retry_and_delete(cli: Cli, trioworker_worker: Callable[..., TaskWorker]) -> None:
    ids = await finished_runs(trioworker_worker)  # add1, add2 completed; fail failed; shout scheduled
    cancelled, not_cancelled, retried, not_retried, deleted = await run_all(
        cli,
        ["cancel", short(ids["shout"])],
        ["cancel", str(ids["add2"])],
        ["retry", short(ids["fail"])],
        ["retry", short(ids["add2"])],  # completed: a run that ended can be retried
        ["delete", short(ids["add1"])],
    )
    assert cancelled.returncode == 0, cancelled.stderr.decode()
    assert cancelled.stdout.decode() == f"cancelled run {ids['shout']} (tools.shout; it was SCHEDULED)\n"
    assert (await read(ids["shout"])).state.type is StateType.CANCELLED

    assert one_error_line(not_cancelled) == (
        f"trioworker: cannot cancel run {ids['add2']} (tools.add): "
        "the run is already COMPLETED; it cannot become CANCELLED"
    )

    assert retried.returncode == 0, retried.stderr.decode()
    new_id = uuid.UUID(retried.stdout.decode().strip())  # stdout is the new run's id, nothing else
    new, old = await read(new_id), await read(ids["fail"])
    assert (new.task_key, new.parameters, new.state.type) == (
        old.task_key,
        old.parameters,
        StateType.SCHEDULED,
    )
    assert not_retried.returncode == 0, not_retried.stderr.decode()

    assert deleted.stdout.decode() == f"deleted run {ids['add1']} (tools.add; it was COMPLETED)\n"
    assert one_error_line(await cli("run", str(ids["add1"]))) == f"trioworker: no task run {ids['add1']}"

    # A run that has not ended cannot be retried: the new run is scheduled.
    assert one_error_line(await cli("retry", str(new_id))) == (
        f"trioworker: cannot retry run {new_id} (tools.fail): the run is SCHEDULED: "
        "only a run that ended can be retried (cancel it first)"
    )
    async with trioworker_worker(fail):
        failed_again = await TaskRunFuture(new_id, fail).wait(timeout=20)
    assert failed_again is not None and failed_again.state.type is StateType.FAILED


async def test_double_dash_ends_the_options_wherever_it_stands(
    cli: Cli, tasks_file: Path, trioworker_worker: Callable[..., TaskWorker]
) -> None:
    async with trioworker_worker(add):
        submitted, waited = await run_all(
            cli,
            ["submit", f"{tasks_file}:add", "--", "-5"],
            ["submit", f"{tasks_file}:add", "--wait", "1", "--timeout", "20", "--", "-5"],
        )
    assert submitted.returncode == 0, submitted.stderr.decode()
    run = await read(uuid.UUID(submitted.stdout.decode().strip()))
    assert run.parameters == {"a": -5, "b": 0}
    assert waited.returncode == 0, waited.stderr.decode()
    assert waited.stdout.decode() == "-4\n"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["submit", "m:t", "--", "-5"], {"task": "m:t", "arguments": ["-5"], "wait": False}),
        (
            ["submit", "m:t", "1", "--wait", "2", "--", "--timeout", "3"],
            {"arguments": ["1", "2", "--timeout", "3"], "wait": True, "timeout": None},
        ),
        (["submit", "--wait", "--", "m:t", "-x"], {"task": "m:t", "arguments": ["-x"], "wait": True}),
        (["submit", "m:t", "--", "1", "--", "2"], {"arguments": ["1", "--", "2"]}),
        (["run", "--", "-abc"], {"id": "-abc"}),
        (["cancel", "--", "--api-url"], {"id": "--api-url", "api_url": None}),
        (["worker", "--limit", "3", "--", "-a:b"], {"tasks": ["-a:b"], "limit": 3}),
    ],
)
def test_double_dash_makes_what_follows_positional(argv: list[str], expected: dict[str, object]) -> None:
    args = parse_args(argv)
    assert {name: getattr(args, name) for name in expected} == expected


def test_what_follows_a_double_dash_is_named_as_given_when_unrecognized(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["runs", "--", "-x"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "trioworker: error: unrecognized arguments: -x"


@pytest.mark.every_store
async def test_purge_deletes_the_runs_that_ended_long_ago_once_confirmed(
    trioworker_server: RunningServer, trioworker_worker: Callable[..., TaskWorker]
) -> None:
    ids = await finished_runs(trioworker_worker)  # add1, add2 completed; fail failed; shout scheduled
    env = {**os.environ, "TRIOWORKER_API_URL": trioworker_server.api_url}

    async def purge(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        with trio.fail_after(30):
            return await trio.run_process(
                [sys.executable, "-m", "trioworker", "purge", *args],
                stdin=stdin,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
            )

    async def left() -> set[uuid.UUID]:
        async with TaskRunClient() as client:
            return {run.id for run in await client.read_task_runs()}

    recent = await purge("--older-than", "1h", "--yes")
    assert (recent.returncode, recent.stdout) == (0, b"deleted 0 runs that ended more than 1h ago\n")
    question = "Delete every run that ended, with its result and history? It cannot be undone. [y/N] "
    for answer in (b"n\n", b"", b"whatever\n"):
        refused = await purge("--older-than", "0", stdin=answer)
        assert refused.stderr.decode() == (
            f"{question}{answer.decode().strip()}\n"
            "trioworker: nothing was deleted: not confirmed (--yes purges without asking)\n"
        )
        assert (refused.returncode, refused.stdout) == (1, b"")
    assert await left() == set(ids.values())

    failed = await purge("--older-than", "0", "--state", "failed", "--yes")
    assert failed.stdout == b"deleted 1 run that ended FAILED\n", failed.stderr
    added = await purge("--task-key", "tools.add", "--older-than", "0s", stdin=b"y\n")
    assert added.stdout == b"deleted 2 runs of tools.add that ended\n", added.stderr
    assert added.stderr.decode().startswith("Delete every run of tools.add that ended, with its result")
    assert await left() == {ids["shout"]}  # a run that has not ended is never touched

    for args, error in [
        (["--state", "running"], "argument --state: runs do not end in RUNNING"),
        (["--older-than", "7x"], "argument --older-than: '7x' is not a duration"),
    ]:
        bad = await purge("--older-than", "0", "--yes", *args)
        assert bad.returncode == 2 and error in bad.stderr.decode(), bad.stderr


async def test_the_new_calls_of_both_clients(trioworker_server: RunningServer) -> None:
    """find_task_runs, read_task_runs(newest_first=), retry, task_workers and purge, async and
    blocking (in a thread), against the same server."""
    created = await create_alike()
    async with TaskRunClient() as client:
        await client.cancel(ALIKE[0])
        retried = await client.retry(ALIKE[0])
        found = [run.id for run in await client.find_task_runs("0b7c7c36-8d3a")]
        newest = [run.id for run in await client.read_task_runs(newest_first=True)]
        workers = await client.task_workers("k")

    def blocking() -> tuple[object, ...]:
        with SyncTaskRunClient(trioworker_server.api_url) as sync:
            again = sync.retry(ALIKE[0])
            return (
                again.id,
                [run.id for run in sync.find_task_runs("0b7c7c36-8d3a")],
                [run.id for run in sync.read_task_runs(newest_first=True)],
                sync.task_workers("k"),
                sync.purge(0, task_key="k", state=StateType.CANCELLED),
            )

    again, sync_found, sync_newest, sync_workers, purged = await trio.to_thread.run_sync(blocking)
    assert found == sync_found == ALIKE[:2]
    assert newest == [retried.id, *reversed([run.id for run in created])]
    assert sync_newest == [again, *newest]
    assert workers == sync_workers == []
    assert purged == 1
    async with TaskRunClient() as client:
        assert await client.purge(0) == 0  # the retries are scheduled: not ended, never purged
        assert {run.id for run in await client.read_task_runs()} == {retried.id, again, *ALIKE[1:]}


async def test_run_data_is_shown_as_text_not_markup_nor_terminal_controls(cli: Cli) -> None:
    """Keys, names, messages, parameters and tracebacks are a task's or a submitter's text:
    ``[/]`` (rich's markup) neither crashes nor vanishes, and no control character (ESC,
    C1, a bidi override) reaches the terminal raw."""
    hostile = "[red]x[/] [/]\x1b[2J\x9b\u202eevil\x07"
    async with TaskRunClient() as client:
        run = await client.create_task_run(
            TaskRunCreate(task_key=f"k[/]{hostile}", name=f"name {hostile}", parameters={"p": hostile})
        )
        failed = State(
            type=StateType.FAILED,
            name=f"Failed {hostile}",
            message=f"message {hostile}",
            data={"traceback": f"Traceback {hostile}"},
        )
        await client.set_state(run.id, failed, force=True)
        other = await client.create_task_run(TaskRunCreate(task_key=f"k2{hostile}", name="n"))
    table, shown, cancelled, not_cancelled = await run_all(
        cli, ["runs"], ["run", short(run.id)], ["cancel", str(other.id)], ["cancel", str(run.id)]
    )
    escaped = "[red]x[/] [/]\\x1b[2J\\x9b\\u202eevil\\x07"
    for result in (table, shown, cancelled):
        out = result.stdout.decode()
        assert result.returncode == 0, result.stderr.decode()
        assert escaped in out, out
    for result in (table, shown, cancelled, not_cancelled):
        for raw in ("\x1b", "\x9b", "\u202e", "\x07"):
            assert raw not in result.stdout.decode() + result.stderr.decode()
    out = shown.stdout.decode()
    for text in (f"k[/]{escaped}", f"name {escaped}", f"message {escaped}", f"Traceback {escaped}"):
        assert text in out, (text, out)
    assert f"k2{escaped}" in one_error_line(not_cancelled) or f"k[/]{escaped}" in one_error_line(
        not_cancelled
    )


async def test_cancelling_a_cancelled_run_is_an_error_as_for_any_ended_run(cli: Cli) -> None:
    async with TaskRunClient() as client:
        run = await client.create_task_run(TaskRunCreate(task_key="k"))
        await client.cancel(run.id)
    again = await cli("cancel", str(run.id))
    assert one_error_line(again) == (
        f"trioworker: cannot cancel run {run.id} (k): "
        "the run is already CANCELLED; it cannot become CANCELLED"
    )
    assert again.stdout == b""
