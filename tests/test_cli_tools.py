"""`trioworker submit`, `runs`, `run` and `status` as a user runs them: real subprocesses
talking to the test's in-process server (which keeps serving while the test awaits them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from trioworker.cli import parse_args
from trioworker.cli._common import CommandError
from trioworker.cli.runs import parse_task_arguments
from trioworker.client.futures import TaskRunFuture, wait_all
from trioworker.client.rest import TaskRunClient
from trioworker.models import StateType, TaskRun, TaskRunCreate, converter
from trioworker.server import RunningServer
from trioworker.tasks import task
from trioworker.testing import ServerControl
from trioworker.worker.task_worker import TaskWorker

#: The tasks as the subprocesses load them (from a file). The worker of the test serves
#: the twins below: the same keys and signatures.
TASKS_SOURCE = """
from trioworker import task

@task(key="tools.add")
def add(a: int, b: int = 0) -> int:
    return a + b

@task(key="tools.shout")
async def shout(text: str, times: int = 1) -> str:
    return (text.upper() + "!") * times

@task(key="tools.fail")
def fail(message: str) -> None:
    raise RuntimeError(message)
"""


@task(key="tools.add")
def add(a: int, b: int = 0) -> int:
    return a + b


@task(key="tools.shout")
async def shout(text: str, times: int = 1) -> str:
    return (text.upper() + "!") * times


@task(key="tools.fail")
def fail(message: str) -> None:
    raise RuntimeError(message)


UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"

Cli = Callable[..., Awaitable["subprocess.CompletedProcess[bytes]"]]


@pytest.fixture
def tasks_file(tmp_path: Path) -> Path:
    path = tmp_path / "tools_tasks.py"
    path.write_text(TASKS_SOURCE)
    return path


async def run_trioworker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """``trioworker ARGS`` in a subprocess with ``env``, its output captured."""
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "trioworker", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )


def make_cli(api_url: str) -> Cli:
    """``await cli("runs", "--limit", "5")``: the command in a subprocess, output captured."""
    env = {**os.environ, "TRIOWORKER_API_URL": api_url, "COLUMNS": "200"}
    env.pop("TRIOWORKER_API_KEY", None)

    async def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return await run_trioworker(*args, env=env)

    return run


@pytest.fixture
def cli(trioworker_server: RunningServer) -> Cli:
    return make_cli(trioworker_server.api_url)


async def run_all(cli: Cli, *commands: list[str]) -> list[subprocess.CompletedProcess[bytes]]:
    """Run the commands at once (each a subprocess); their results in order."""
    results: dict[int, subprocess.CompletedProcess[bytes]] = {}

    async def run_one(index: int, args: list[str]) -> None:
        results[index] = await cli(*args)

    async with trio.open_nursery() as nursery:
        for index, args in enumerate(commands):
            nursery.start_soon(run_one, index, args)
    return [results[index] for index in range(len(commands))]


#: What ``submit --wait`` prints on stderr (not at a terminal) while it waits.
PROGRESS_LINE = (
    r"run [0-9a-f]{8}: [A-Z]+( \(\w+\))?|no worker is subscribed to \S+: the run waits until one is"
)


def waited_lines(stderr: str) -> list[str]:
    """The lines ``submit --wait`` printed on stderr after the one that names the run it
    submitted and the states it showed while it waited (checked)."""
    lines = stderr.strip().splitlines()
    assert re.fullmatch(rf"submitted run {UUID_PATTERN} of \S+", lines.pop(0)), stderr
    while lines and re.fullmatch(PROGRESS_LINE, lines[0]):
        lines.pop(0)
    return lines


def one_error_line(result: subprocess.CompletedProcess[bytes], *, submitted: bool = False) -> str:
    """The command failed with exit code 1 and one line ``trioworker: ...`` on stderr.

    ``submitted``: ``submit --wait`` said which run it submitted first (on its own line),
    and which states it saw while it waited.
    """
    stderr = result.stderr.decode()
    assert result.returncode == 1, (result.returncode, stderr)
    lines = waited_lines(stderr) if submitted else stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trioworker: "), stderr
    return lines[0]


async def all_runs() -> list[Any]:
    async with TaskRunClient() as client:
        return await client.read_task_runs(limit=1000)


# -- parsing ARGS (in-process: no server needed)


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["[1, 2]"], ([1, 2], {})),
        (['{"a": 1, "b": [2]}'], ([], {"a": 1, "b": [2]})),
        (["1", "b=2"], ([1], {"b": 2})),
        (["text=hi there", "times=3"], ([], {"text": "hi there", "times": 3})),
        (['text="3"', "flag=true", "none=null"], ([], {"text": "3", "flag": True, "none": None})),
        (["hello", "-5", "2.5"], (["hello", -5, 2.5], {})),
        (["x=[1, 2]", "y={}"], ([], {"x": [1, 2], "y": {}})),
        (["a=b=c", "not a key=1"], (["not a key=1"], {"a": "b=c"})),
        ([], ([], {})),
    ],
)
def test_task_arguments_are_json_or_strings(items: list[str], expected: tuple[Any, Any]) -> None:
    assert parse_task_arguments(items) == expected


def test_submit_options_may_come_between_the_arguments() -> None:
    args = parse_args(["submit", "m:t", "1", "--wait", "b=2", "--timeout", "5", "-3"])
    assert (args.task, args.arguments, args.wait, args.timeout) == ("m:t", ["1", "b=2", "-3"], True, 5.0)
    with pytest.raises(SystemExit) as exited:
        parse_args(["submit", "m:t", "1", "--bogus"])
    assert exited.value.code == 2


@pytest.mark.parametrize(
    "command", ["submit", "runs", "run", "cancel", "retry", "delete", "purge", "status", "demo"]
)
def test_help_has_a_description_and_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: trioworker {command}" in text
    assert "examples:" in text and f"trioworker {command}" in text.split("examples:")[1]


# -- submit


async def test_submit_prints_the_run_id_for_json_arguments(cli: Cli, tasks_file: Path) -> None:
    commands = {
        "array": [f"{tasks_file}:add", "[2, 3]"],
        "object": [f"{tasks_file}:add", '{"a": 7}'],
        "key=value": [f"{tasks_file}:shout", "text=hi", "times=2"],
        "mixed": [f"{tasks_file}:add", "4", "b=5"],
    }
    results = await run_all(cli, *(["submit", *args] for args in commands.values()))
    ids = {}
    for name, result in zip(commands, results, strict=True):
        assert result.returncode == 0, result.stderr.decode()
        assert result.stderr == b""
        ids[name] = uuid.UUID(result.stdout.decode().strip())  # stdout is the id, nothing else
    runs = {run.id: run for run in await all_runs()}
    assert runs[ids["array"]].parameters == {"a": 2, "b": 3}
    assert runs[ids["object"]].parameters == {"a": 7, "b": 0}  # defaults filled in
    assert runs[ids["key=value"]].parameters == {"text": "hi", "times": 2}
    assert runs[ids["key=value"]].task_key == "tools.shout"
    assert runs[ids["mixed"]].parameters == {"a": 4, "b": 5}
    assert all(run.state.type is StateType.SCHEDULED for run in runs.values())


async def test_submit_wait_prints_the_result_as_json(
    cli: Cli, tasks_file: Path, trioworker_worker: Callable[..., TaskWorker]
) -> None:
    async with trioworker_worker(add, shout, fail):
        added = await cli("submit", f"{tasks_file}:add", "2", "3", "--wait")
        shouted = await cli("submit", "--wait", "--timeout", "20", f"{tasks_file}:shout", "text=hi")
        failed = await cli("submit", f"{tasks_file}:fail", "boom", "--wait")
    assert added.returncode == 0, added.stderr.decode()
    assert added.stdout.decode() == "5\n"
    assert waited_lines(added.stderr.decode()) == []
    assert added.stderr.decode().splitlines()[-1].endswith(": COMPLETED")
    assert shouted.returncode == 0, shouted.stderr.decode()
    assert shouted.stdout.decode() == '"HI!"\n'
    line = one_error_line(failed, submitted=True)
    assert re.fullmatch(rf"trioworker: run {UUID_PATTERN} ended FAILED: RuntimeError: boom", line)
    assert failed.stdout == b""


async def test_submit_wait_with_a_timeout_gives_up_but_leaves_the_run(cli: Cli, tasks_file: Path) -> None:
    result = await cli("submit", f"{tasks_file}:add", "1", "--timeout", "0.2")  # no worker
    line = one_error_line(result, submitted=True)
    assert re.fullmatch(
        rf"trioworker: run {UUID_PATTERN} has not ended after 0.2 s \(it is SCHEDULED\)", line
    )
    assert [run.state.type for run in await all_runs()] == [StateType.SCHEDULED]


async def test_submit_errors_are_one_line_and_submit_nothing(cli: Cli, tasks_file: Path) -> None:
    cases = {
        "cannot submit add: got an unexpected keyword argument 'c'": [f"{tasks_file}:add", "1", "c=2"],
        "cannot submit add: missing a required argument: 'a'": [f"{tasks_file}:add"],
        "ARGS: not valid JSON: '[1, 2'": [f"{tasks_file}:add", "[1, 2"],
    }
    results = await run_all(cli, *(["submit", *args] for args in cases.values()))
    for expected, result in zip(cases, results, strict=True):
        assert one_error_line(result).startswith(f"trioworker: {expected}")
        assert result.stdout == b""
    assert await all_runs() == []


ECHO = "tests.fixtures_cli.cli_tasks:echo"  # echo(message: str, times: int = 1)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([ECHO, "hi", "2", "3"], "cannot submit echo: too many positional arguments"),
        ([ECHO, "[1, 2, 3]"], "cannot submit echo: too many positional arguments"),
        ([ECHO, "hi", "message=ho"], "cannot submit echo: multiple values for argument 'message'"),
        ([ECHO, "times=1", "times=2"], "argument 'times' is given twice"),
        ([ECHO, "message={oops"], "argument 'message': not valid JSON"),
        ([ECHO, "[1", "2"], "argument 1: not valid JSON"),
        ([f"{ECHO[:-5]}:nope", "1"], "module 'tests.fixtures_cli.cli_tasks' has no attribute 'nope'"),
        ([f"{ECHO[:-5]}:not_a_task"], "is not a task"),
        (["no_colon"], "expected MODULE:TASK"),
    ],
)
def test_submit_checks_arguments_before_sending_anything(
    args: list[str], expected: str, monkeypatch: pytest.MonkeyPatch, refused_port: int
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # what loading the task adds is undone
    # Nothing listens there: an error about the arguments comes before any request.
    parsed = parse_args(["submit", "--api-url", f"http://127.0.0.1:{refused_port}/api", *args])
    with pytest.raises(CommandError) as raised:
        trio.run(parsed.handler, parsed)
    assert expected in str(raised.value)
    assert "\n" not in str(raised.value)


async def test_commands_report_an_unreachable_server_in_one_line(
    cli: Cli, tasks_file: Path, refused_port: int
) -> None:
    api_url = f"http://127.0.0.1:{refused_port}/api"
    for result in await run_all(
        cli,
        ["submit", f"{tasks_file}:add", "1", "2", "--api-url", api_url],
        ["runs", "--api-url", api_url],
        ["run", str(uuid.uuid4()), "--api-url", api_url],
        ["run", "0b7c7c36", "--api-url", api_url],
        ["cancel", "0b7c7c36", "--api-url", api_url],
        ["retry", str(uuid.uuid4()), "--api-url", api_url],
        ["delete", "0b7c", "--api-url", api_url],
        ["purge", "--older-than", "7d", "--yes", "--api-url", api_url],
    ):
        line = one_error_line(result)
        assert line.startswith(f"trioworker: cannot reach the trioworker server at {api_url}"), line


async def test_a_refused_api_key_is_one_line(
    trioworker_server_control: ServerControl, tasks_file: Path
) -> None:
    server = await trioworker_server_control.start(api_key="sekrit")
    cli = make_cli(server.api_url)
    line = one_error_line(await cli("runs"))
    assert line.startswith("trioworker: the server refused the request: 401 "), line
    assert line.endswith("(check --api-key or TRIOWORKER_API_KEY)")
    assert one_error_line(await cli("submit", f"{tasks_file}:add", "1", "--api-key", "wrong")) == line
    submitted = await cli("submit", f"{tasks_file}:add", "1", "--api-key", "sekrit")
    assert submitted.returncode == 0, submitted.stderr.decode()
    listed = await cli("runs", "--api-key", "sekrit")
    assert short_ids_in(listed.stdout.decode()) == [short(uuid.UUID(submitted.stdout.decode().strip()))]


# -- runs and run


async def finished_runs(trioworker_worker: Callable[..., TaskWorker]) -> dict[str, uuid.UUID]:
    """Two completed runs of add, one failed run of fail, one scheduled run of shout."""
    async with trioworker_worker(add, fail):
        futures: dict[str, TaskRunFuture[Any]] = {
            "add1": await add.delay(2, 3),
            "add2": await add.delay(1),
            "fail": await fail.delay("boom"),
        }
        await wait_all(futures.values(), timeout=20)
    ids = {name: future.task_run_id for name, future in futures.items()}
    ids["shout"] = (await shout.delay("later")).task_run_id
    return ids


def ids_in(text: str) -> list[uuid.UUID]:
    return [uuid.UUID(match) for match in re.findall(UUID_PATTERN, text)]


def short(run_id: uuid.UUID) -> str:
    """A run id as the tables show it."""
    return str(run_id)[:8]


def short_ids_in(table: str) -> list[str]:
    """The ids in the rows of a table, in order."""
    return re.findall(r"^│ ([0-9a-f]{8}) ", table, re.M)


async def test_runs_lists_runs_newest_first_with_filters(
    cli: Cli, trioworker_worker: Callable[..., TaskWorker]
) -> None:
    ids = await finished_runs(trioworker_worker)
    everything, by_task, by_state, both, page, as_json, filtered_json = await run_all(
        cli,
        ["runs"],
        ["runs", "--task", "tools.add"],
        ["runs", "--state", "failed"],
        ["runs", "--task", "tools.add", "--state", "FAILED"],
        ["runs", "--limit", "2", "--offset", "1"],
        ["runs", "--json"],
        ["runs", "--json", "--task", "tools.add", "--limit", "1"],
    )
    assert everything.returncode == 0, everything.stderr.decode()
    out = everything.stdout.decode()
    newest_first = [ids["shout"], ids["fail"], ids["add2"], ids["add1"]]
    assert short_ids_in(out) == [short(i) for i in newest_first]
    assert ids_in(out) == []  # whole ids only in --json
    assert "newest first" in out
    for heading in ("id", "task key", "name", "state", "created", "updated"):
        assert heading in out
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^│ ([0-9a-f]{8}) .*", out, re.M)}
    assert "tools.add" in rows[short(ids["add1"])] and "COMPLETED" in rows[short(ids["add1"])]
    assert "tools.fail" in rows[short(ids["fail"])] and "FAILED" in rows[short(ids["fail"])]
    assert "SCHEDULED" in rows[short(ids["shout"])]
    assert "4 runs" in out

    assert short_ids_in(by_task.stdout.decode()) == [short(ids["add2"]), short(ids["add1"])]
    assert short_ids_in(by_state.stdout.decode()) == [short(ids["fail"])]
    assert short_ids_in(both.stdout.decode()) == [] and "No runs match." in both.stdout.decode()
    assert short_ids_in(page.stdout.decode()) == [short(ids["fail"]), short(ids["add2"])]
    assert "more with --offset 3" in page.stdout.decode()
    assert all(result.returncode == 0 for result in (by_task, by_state, both, page))

    assert as_json.returncode == 0, as_json.stderr.decode()
    listed = json.loads(as_json.stdout)
    assert [uuid.UUID(run["id"]) for run in listed] == newest_first
    async with TaskRunClient() as client:
        assert converter.structure(listed[2], TaskRun) == await client.read_task_run(ids["add2"])
    assert [run["id"] for run in json.loads(filtered_json.stdout)] == [str(ids["add2"])]


def history_of(out: str) -> list[str]:
    return re.findall(r"\b(SCHEDULED|PENDING|RUNNING|COMPLETED|FAILED)\b", out.split("History")[1])


async def test_run_shows_fields_history_and_result_or_traceback(
    cli: Cli, trioworker_worker: Callable[..., TaskWorker]
) -> None:
    ids = await finished_runs(trioworker_worker)
    completed, failed, scheduled = await run_all(
        cli, ["run", str(ids["add1"])], ["run", str(ids["fail"])], ["run", str(ids["shout"])]
    )
    assert completed.returncode == 0, completed.stderr.decode()
    out = completed.stdout.decode()
    assert str(ids["add1"]) in out and "tools.add" in out
    assert re.search(r"state\s+COMPLETED", out)
    assert '{"a": 2, "b": 3}' in out
    assert history_of(out.split("Result")[0]) == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]
    assert re.search(r"Result\n5\n", out)

    assert failed.returncode == 0, failed.stderr.decode()
    out = failed.stdout.decode()
    assert re.search(r"state\s+FAILED", out)
    assert history_of(out.split("Traceback")[0])[:4] == ["SCHEDULED", "PENDING", "RUNNING", "FAILED"]
    assert "RuntimeError: boom" in out
    assert "Traceback (most recent call last)" in out and "raise RuntimeError(message)" in out

    assert scheduled.returncode == 0, scheduled.stderr.decode()
    assert history_of(scheduled.stdout.decode().split("Not ended yet")[0]) == ["SCHEDULED"]
    assert "Not ended yet: SCHEDULED." in scheduled.stdout.decode()


async def test_run_of_an_unknown_id_is_one_line(cli: Cli) -> None:
    unknown = uuid.uuid4()
    missing, malformed, no_start = await run_all(
        cli, ["run", str(unknown)], ["run", "not-an-id"], ["run", "0b7c7c36"]
    )
    assert one_error_line(missing) == f"trioworker: no task run {unknown}"
    assert one_error_line(malformed) == (
        "trioworker: no task run 'not-an-id': "
        "a run id is hex digits (and dashes), as `trioworker runs` shows it"
    )
    assert one_error_line(no_start) == "trioworker: no task run has an id that starts with '0b7c7c36'"


# -- status


async def test_status_reads_a_real_workers_status_server(cli: Cli, trioworker_server: RunningServer) -> None:
    worker = TaskWorker(
        add, shout, api_url=trioworker_server.api_url, status_server_port=0, limit=3, prefetch=2
    )
    async with worker:
        await (await add.delay(1, 1)).result(timeout=20)
        assert worker.status_url is not None
        full = await cli("status", worker.status_url)
        bare = await cli("status", worker.status_url.removeprefix("http://") + "/status")
    assert full.returncode == 0, full.stderr.decode()
    out = full.stdout.decode()
    assert worker.client_id in out
    assert re.search(r"status\s+running", out)
    assert re.search(r"runs now\s+0 running, 3 free of 3, up to 2 more sent ahead", out)
    assert re.search(r"tools\.add\s*│\s*1\s*│\s*0", out)
    assert re.search(r"tools\.shout\s*│\s*0\s*│\s*0", out)
    assert bare.returncode == 0 and worker.client_id in bare.stdout.decode()


async def test_status_of_an_unreachable_worker_is_one_line(cli: Cli, refused_port: int) -> None:
    url = f"http://127.0.0.1:{refused_port}"
    line = one_error_line(await cli("status", url))
    assert line.startswith(f"trioworker: cannot reach a worker's status server at {url}/status")


BIG_SOURCE = """
from trioworker import task

@task(key="tools.big")
async def big(n: int) -> list[int]:
    raise AssertionError("the test's worker runs it")
"""


@task(key="tools.big")
async def big(n: int) -> list[int]:
    return list(range(n))


async def first_bytes_then_close(args: list[str], env: dict[str, str]) -> tuple[bytes, int, str]:
    """``trioworker ARGS`` whose reader (as ``| head -c 20`` is) reads 20 bytes of its stdout
    and leaves: those bytes, its exit code and what it said on stderr."""
    command = [sys.executable, "-m", "trioworker", *args]
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        assert process.stdout is not None and process.stderr is not None
        got = b""
        while len(got) < 20:
            got += await process.stdout.receive_some(20 - len(got))
        await process.stdout.aclose()
        stderr = b""
        while chunk := await process.stderr.receive_some():
            stderr += chunk
        return got, await process.wait(), stderr.decode()


async def test_a_reader_that_leaves_early_ends_a_command_quietly(
    trioworker_server: RunningServer, tmp_path: Path
) -> None:
    env = {**os.environ, "TRIOWORKER_API_URL": trioworker_server.api_url}
    env.pop("TRIOWORKER_API_KEY", None)
    # Unbuffered, Python's stdout writes a long text in one call that a pipe may take only
    # part of, and says nothing of the rest: buffered, as a user's shell has it, the rest
    # meets the closed pipe.
    env.pop("PYTHONUNBUFFERED", None)
    async with TaskRunClient(trioworker_server.api_url) as client:
        await client.create_task_runs(
            [TaskRunCreate(task_key="tools.many", parameters={"n": n}) for n in range(1000)]
        )
    # `trioworker runs --json --limit 1000 | head -c 20`: far more than a pipe holds.
    got, code, stderr = await first_bytes_then_close(["runs", "--json", "--limit", "1000"], env)
    assert (got.startswith(b"["), code, stderr) == (True, 141, "")
    # `trioworker submit --wait ... | head -c 20`, with a result far larger than a pipe holds.
    (tmp_path / "big_tasks.py").write_text(BIG_SOURCE)
    async with TaskWorker(big, api_url=trioworker_server.api_url):
        got, code, stderr = await first_bytes_then_close(
            ["submit", "--wait", f"{tmp_path}/big_tasks.py:big", "200000"], env
        )
    assert (got.startswith(b"[0, 1, 2"), code) == (True, 141), stderr
    assert "Traceback" not in stderr and "Broken pipe" not in stderr and "trioworker:" not in stderr
