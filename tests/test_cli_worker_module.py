"""`trioworker worker --module MODULE` (every task of a module) and `--timeout SECONDS`:
load_module_tasks, and the command as a user runs it, in a subprocess against a real server."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
import trio

from trioworker.cli import parse_args
from trioworker.entrypoints import EntryPointError, load_module_tasks
from trioworker.server import RunningServer

from .test_cli_worker import (
    ROOT,
    TASKS_FILE,
    TASKS_MODULE,
    imports,
    start_worker,
    within,
    worker_command,
    worker_env,
    write,
)

__all__ = ["imports"]  # a fixture, used by name

MANY_SOURCE = """
from trioworker.tasks import task
from cli_mod_shared import shared

@task(key="m.first")
def first() -> int:
    return 1

def plain() -> int:
    return 0

@task(key="m.second")
async def second() -> int:
    return 2

again = first  # the same task under two names: served once
"""

SHARED_SOURCE = """
from trioworker.tasks import task

@task(key="m.shared")
def shared() -> int:
    return 3
"""


def test_a_module_gives_every_task_it_holds_once_in_order(imports: Path) -> None:
    write(imports / "cli_mod_shared.py", SHARED_SOURCE)
    write(imports / "cli_mod_many.py", MANY_SOURCE)
    sys.path.insert(0, str(imports))
    # Imported tasks are the module's attributes too; each task once, in namespace order.
    assert [t.key for t in load_module_tasks("cli_mod_many")] == ["m.shared", "m.first", "m.second"]


def test_a_file_gives_its_tasks(imports: Path) -> None:
    path = write(imports / "cli_file_tasks.py", SHARED_SOURCE)
    assert [t.key for t in load_module_tasks(str(path))] == ["m.shared"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "expected a module, package.module or path/to/file.py, got ''"),
        ("pkg.mod:say", "expected a module, package.module or path/to/file.py, got 'pkg.mod:say'"),
        ("no_such_module_xyz", "cannot import module 'no_such_module_xyz': ModuleNotFoundError"),
        ("tests.fixtures_cli", "module 'tests.fixtures_cli' holds no task: none of its module-level"),
        ("missing/tasks.py", "file 'missing/tasks.py' does not exist"),
    ],
)
def test_a_module_that_gives_no_task_is_one_sentence(spec: str, message: str) -> None:
    with pytest.raises(EntryPointError) as caught:
        load_module_tasks(spec)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_the_module_and_timeout_options() -> None:
    args = parse_args(["worker", "--module", "a.b", "--module", "c.py", "--timeout", "90"])
    assert (args.tasks, args.modules, args.timeout) == ([], ["a.b", "c.py"], 90.0)
    args = parse_args(["worker", "a:b"])
    assert (args.modules, args.timeout) == (None, None)


def test_the_module_and_timeout_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIOWORKER_MODULE", "a.b, c.py")
    monkeypatch.setenv("TRIOWORKER_TIMEOUT", "2.5")
    args = parse_args(["worker"])
    assert (args.modules, args.timeout) == (["a.b", "c.py"], 2.5)
    assert args.from_environment == {"modules": "TRIOWORKER_MODULE", "timeout": "TRIOWORKER_TIMEOUT"}
    assert parse_args(["worker", "--module", "x"]).modules == ["x"]  # the command line wins


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        pytest.param(
            [f"{TASKS_MODULE}:echo", "--module", TASKS_MODULE],
            {},
            f"name the tasks as MODULE:TASK or with --module, not both (got {TASKS_MODULE}:echo and "
            f"--module {TASKS_MODULE})",
            id="both",
        ),
        pytest.param(
            [f"{TASKS_MODULE}:echo"],
            {"TRIOWORKER_MODULE": TASKS_MODULE},
            "name the tasks as MODULE:TASK or with TRIOWORKER_MODULE, not both "
            f"(got {TASKS_MODULE}:echo and TRIOWORKER_MODULE={TASKS_MODULE})",
            id="both-from-the-environment",
        ),
        pytest.param(
            [], {}, "no tasks to serve: name them as MODULE:TASK ... or with --module MODULE", id="none"
        ),
        pytest.param(
            ["--module", "no_such_module_xyz"],
            {},
            "cannot import module 'no_such_module_xyz': ModuleNotFoundError: "
            "No module named 'no_such_module_xyz'",
            id="unimportable",
        ),
        pytest.param(
            ["--module", TASKS_MODULE, "--module", "tests.fixtures_cli"],
            {},
            "module 'tests.fixtures_cli' holds no task: none of its module-level names is a @trioworker.task",
            id="no-tasks",
        ),
    ],
)
async def test_module_errors_are_one_line_and_exit_code_1(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = await trio.run_process(
        worker_command(*args), capture_stderr=True, check=False, cwd=ROOT, env=worker_env(**env)
    )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert stderr == f"trioworker: {message}\n"


@pytest.mark.parametrize("from_environment", [False, True], ids=["options", "variables"])
async def test_a_worker_serves_a_modules_tasks_until_its_timeout(
    trioworker_server: RunningServer, api: httpx.AsyncClient, from_environment: bool
) -> None:
    # Queued first: the worker takes them as soon as it subscribes, well before its timeout.
    body = [{"task_key": "cli.echo", "parameters": {"message": f"m{i}"}} for i in range(3)]
    response = await api.post("/task_runs/batch", json=body)
    assert response.status_code == 201, response.text
    ids = [run["id"] for run in response.json()]
    env = worker_env(TRIOWORKER_API_URL=trioworker_server.api_url)
    args = ["--module", TASKS_MODULE, "--timeout", "3"]
    if from_environment:
        env.update(TRIOWORKER_MODULE=str(TASKS_FILE), TRIOWORKER_TIMEOUT="3")
        args = []
    async with trio.open_nursery() as nursery:
        process, output = await start_worker(nursery, args, env)
        await output.wait_for(
            r"Subscribing to runs of task\(s\): cli\.echo \| cli\.slow_sync \| cli\.slow_async\n"
        )
        with within(20, output):
            assert await process.wait() == 0  # by itself, once the time ran out
        await output.wait_for(r"worker \S+: its timeout of 3 s ran out")
    response = await api.post("/task_runs/wait", json={"ids": ids, "timeout": 5, "all": True})
    ended = {run["id"]: run["state"] for run in response.json()["ended"]}
    assert [ended[i]["data"] for i in ids] == ["m0", "m1", "m2"], output.text
    assert "Traceback" not in output.text
