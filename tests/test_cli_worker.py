"""`trioworker worker`: entry points (load_task) and the command as a user runs it, in a subprocess."""

from __future__ import annotations

import codecs
import importlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from trioworker.cli import build_parser
from trioworker.entrypoints import EntryPointError, load_task
from trioworker.server import RunningServer
from trioworker.tasks import Task
from trioworker.testing import ServerControl

ROOT = Path(__file__).resolve().parents[1]
TASKS_FILE = Path(__file__).resolve().parent / "fixtures_cli" / "cli_tasks.py"
TASKS_MODULE = "tests.fixtures_cli.cli_tasks"

# -- load_task


@pytest.fixture
def imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory for task files; what load_task adds to sys.path and sys.modules is undone."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def write(path: Path, source: str) -> Path:
    path.write_text(source)
    importlib.invalidate_caches()
    return path


TASKS_SOURCE = """
from trioworker.tasks import task

@task(key="t.say")
def say(text: str) -> str:
    return text

def plain(text: str) -> str:
    return text

number = 3
"""


@pytest.mark.parametrize("spec", ["x", "a:b:c", ":say", "module:", "", "path/to/file.py"])
def test_load_task_rejects_a_spec_without_one_colon(spec: str) -> None:
    with pytest.raises(EntryPointError) as caught:
        load_task(spec)
    assert str(caught.value) == f"expected MODULE:TASK or path/to/file.py:TASK, got {spec!r}"


def test_entry_point_error_is_a_value_error() -> None:
    assert issubclass(EntryPointError, ValueError)


def test_load_task_from_a_module(imports: Path) -> None:
    write(imports / "cli_mod_ok.py", TASKS_SOURCE)
    sys.path.insert(0, str(imports))
    found = load_task("cli_mod_ok:say")
    assert isinstance(found, Task)
    assert found.key == "t.say"
    assert found("hi") == "hi"


def test_load_task_from_a_dotted_module() -> None:
    found = load_task(f"{TASKS_MODULE}:echo")
    assert found.key == "cli.echo"
    assert found("ab", times=2) == "abab"


def test_load_task_from_a_file(imports: Path) -> None:
    path = write(imports / "cli_file_ok.py", TASKS_SOURCE)
    found = load_task(f"{path}:say")
    assert found.key == "t.say"
    module = sys.modules["cli_file_ok"]  # named after the file
    assert module.say is found
    assert str(imports) in sys.path
    assert load_task(f"{path}:say") is found  # loaded once, however often it is named


def test_load_task_from_a_file_importing_a_sibling(imports: Path) -> None:
    write(imports / "cli_sibling_helper.py", "def shout(text: str) -> str:\n    return text.upper()\n")
    path = write(
        imports / "cli_sibling_tasks.py",
        "from cli_sibling_helper import shout\nfrom trioworker.tasks import task\n\n"
        "@task\ndef loud(text: str) -> str:\n    return shout(text)\n",
    )
    found = load_task(f"{path}:loud")
    assert found("hi") == "HI"
    assert found.key == "cli_sibling_tasks.loud"  # module.qualname, the module named after the file


def test_load_task_from_a_relative_file_path(imports: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(imports / "cli_relative.py", TASKS_SOURCE)
    monkeypatch.chdir(imports)
    assert load_task("cli_relative.py:say").key == "t.say"


def test_load_task_reports_a_module_that_cannot_be_imported() -> None:
    with pytest.raises(EntryPointError) as caught:
        load_task("cli_no_such_module:say")
    assert str(caught.value) == "cannot import module 'cli_no_such_module': " + (
        "ModuleNotFoundError: No module named 'cli_no_such_module'"
    )


def test_load_task_reports_a_module_that_fails_on_import(imports: Path) -> None:
    write(imports / "cli_mod_broken.py", "raise RuntimeError('boom at import')\n")
    sys.path.insert(0, str(imports))
    with pytest.raises(EntryPointError) as caught:
        load_task("cli_mod_broken:say")
    assert str(caught.value) == "cannot import module 'cli_mod_broken': RuntimeError: boom at import"
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_load_task_reports_a_file_that_fails_on_import(imports: Path) -> None:
    path = write(imports / "cli_file_broken.py", "def broken(:\n")
    with pytest.raises(EntryPointError, match=r"^cannot import '.*cli_file_broken\.py': SyntaxError: "):
        load_task(f"{path}:say")
    assert "cli_file_broken" not in sys.modules  # a later fixed file can be loaded


def test_load_task_reports_a_missing_file(imports: Path) -> None:
    path = imports / "cli_missing.py"
    with pytest.raises(EntryPointError) as caught:
        load_task(f"{path}:say")
    assert str(caught.value) == f"file {str(path)!r} does not exist"


def test_load_task_reports_a_directory_given_as_file(imports: Path) -> None:
    (imports / "pkg").mkdir()
    with pytest.raises(EntryPointError, match=r"is not a file$"):
        load_task(f"{imports / 'pkg'}:say")


def test_load_task_refuses_a_file_shadowing_an_imported_module(imports: Path) -> None:
    path = write(imports / "json.py", TASKS_SOURCE)
    with pytest.raises(EntryPointError, match="a different module of that name is already imported"):
        load_task(f"{path}:say")


def test_load_task_reports_a_missing_name(imports: Path) -> None:
    write(imports / "cli_mod_names.py", TASKS_SOURCE)
    sys.path.insert(0, str(imports))
    with pytest.raises(EntryPointError) as caught:
        load_task("cli_mod_names:nope")
    assert str(caught.value) == "module 'cli_mod_names' has no attribute 'nope'"


def test_load_task_reports_a_missing_name_in_a_file(imports: Path) -> None:
    path = write(imports / "cli_file_names.py", TASKS_SOURCE)
    with pytest.raises(EntryPointError) as caught:
        load_task(f"{path}:nope")
    assert str(caught.value) == f"file {str(path)!r} has no attribute 'nope'"


@pytest.mark.parametrize("name", ["plain", "number"])
def test_load_task_refuses_what_is_not_a_task(imports: Path, name: str) -> None:
    write(imports / "cli_mod_plain.py", TASKS_SOURCE)
    sys.path.insert(0, str(imports))
    with pytest.raises(EntryPointError) as caught:
        load_task(f"cli_mod_plain:{name}")
    assert str(caught.value) == f"'cli_mod_plain:{name}' is not a task: decorate it with @trioworker.task"


# -- the parser


def test_worker_options() -> None:
    parser = build_parser()
    args = parser.parse_args(["worker", "a:b", "c.py:d"])
    assert args.tasks == ["a:b", "c.py:d"]
    assert (args.limit, args.status_port, args.api_url, args.api_key) == (10, None, None, None)
    assert (args.grace, args.allow_pickle) == (30.0, False)
    assert parser.parse_args(["worker", "a:b", "--no-limit"]).limit is None
    args = parser.parse_args(
        [
            *["worker", "a:b", "--limit", "3", "--status-port", "0", "--api-url", "http://h:1/api"],
            *["--api-key", "k", "--grace", "1.5", "--allow-pickle"],
        ]
    )
    assert (args.limit, args.status_port, args.api_url, args.api_key) == (3, 0, "http://h:1/api", "k")
    assert (args.grace, args.allow_pickle) == (1.5, True)


@pytest.mark.parametrize(
    "argv",
    [
        ["a:b", "--limit", "0"],
        ["a:b", "--limit", "x"],
        ["a:b", "--limit", "2", "--no-limit"],
        ["a:b", "--grace", "-1"],
        ["a:b", "--grace", "nan"],
        ["a:b", "--status-port", "70000"],
        ["a:b", "--timeout", "-1"],
    ],
)
def test_worker_rejects_bad_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["worker", *argv])
    assert caught.value.code == 2
    assert "trioworker worker: error:" in capsys.readouterr().err


# -- the command in a subprocess


def worker_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trioworker", "worker", *args]


def worker_env(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRIOWORKER_API_URL", "TRIOWORKER_API_KEY")}
    env.update(changes)
    return env


#: Seconds to wait for a line from a worker (far more than it ever needs).
OUTPUT_TIMEOUT = 20


class Output:
    """Everything a subprocess wrote on one stream so far, read in the background."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.text = ""
        self.closed = False
        self._changed = trio.Event()

    async def pump(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async with self.stream:
            while chunk := await self.stream.receive_some():
                self.text += decoder.decode(chunk)
                self._changed.set()
                self._changed = trio.Event()
        self.text += decoder.decode(b"", final=True)
        self.closed = True
        self._changed.set()

    async def wait_for(self, pattern: str) -> re.Match[str]:
        with within(OUTPUT_TIMEOUT, self):
            while (match := re.search(pattern, self.text)) is None:
                if self.closed:
                    raise AssertionError(f"the process ended before printing {pattern!r}:\n{self.text}")
                await self._changed.wait()
        return match


async def kill_at_once(process: trio.Process) -> None:
    """When a test fails with its worker still running: SIGKILL, not trio's SIGTERM-then-wait."""
    process.kill()


async def start_worker(
    nursery: trio.Nursery, args: list[str], env: dict[str, str]
) -> tuple[trio.Process, Output]:
    run = partial(
        trio.run_process,
        worker_command(*args),
        stderr=subprocess.PIPE,
        check=False,
        cwd=ROOT,
        env=env,
        deliver_cancel=kill_at_once,
    )
    process: trio.Process = await nursery.start(run)
    assert process.stderr is not None
    output = Output(process.stderr)
    nursery.start_soon(output.pump)
    return process, output


@contextmanager
def within(seconds: float, output: Output) -> Iterator[None]:
    """Fail the test after ``seconds``, showing what the worker printed."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise AssertionError(
            f"still waiting after {seconds:g} s; the worker printed:\n{output.text}"
        ) from None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda sig: sig.name)
async def test_worker_runs_tasks_and_stops_on_signals(
    trioworker_server: RunningServer, api: httpx.AsyncClient, sig: signal.Signals
) -> None:
    env = worker_env(TRIOWORKER_API_URL=trioworker_server.api_url)
    async with trio.open_nursery() as nursery:
        args = [f"{TASKS_FILE}:echo", "--limit", "2", "--status-port", "0"]
        process, output = await start_worker(nursery, args, env)
        await output.wait_for(r"Subscribing to runs of task\(s\): cli\.echo\n")
        status_url = (await output.wait_for(r"status server listening on (http://\S+)")).group(1)
        body = [{"task_key": "cli.echo", "parameters": {"message": f"m{i}", "times": 2}} for i in range(6)]
        response = await api.post("/task_runs/batch", json=body)
        assert response.status_code == 201, response.text
        ids = [run["id"] for run in response.json()]
        response = await api.post(
            "/task_runs/wait", json={"ids": ids, "timeout": 20, "all": True}, timeout=30
        )
        waited = response.json()
        assert (waited["missing"], waited["pending"]) == ([], []), output.text
        runs = {run["id"]: run for run in waited["ended"]}
        for i, run_id in enumerate(ids):
            state = runs[run_id]["state"]
            assert state["type"] == "COMPLETED", state
            assert state["data"] == f"m{i}m{i}"
        status = (await api.get(f"{status_url}/status")).json()
        assert (status["limit"], status["tasks"]) == (2, ["cli.echo"])  # the options arrived

        process.send_signal(sig)
        with within(10, output):
            assert await process.wait() == 0
        await output.wait_for(f"received {sig.name}")
        await output.wait_for(r"worker \S+ stopped")
    assert "Traceback" not in output.text


async def test_worker_hands_back_runs_still_running_after_the_grace_period(
    trioworker_server: RunningServer, api: httpx.AsyncClient
) -> None:
    env = worker_env(TRIOWORKER_API_URL=trioworker_server.api_url)
    # One worker serves a sync task (a thread that checks for cancellation) and an async one.
    args = [f"{TASKS_MODULE}:slow_sync", f"{TASKS_FILE}:slow_async", "--grace", "1"]
    created = await api.post(
        "/task_runs/batch", json=[{"task_key": "cli.slow_sync"}, {"task_key": "cli.slow_async"}]
    )
    ids = [run["id"] for run in created.json()]
    async with trio.open_nursery() as nursery:
        process, output = await start_worker(nursery, args, env)
        await output.wait_for("cli.slow_sync started")
        await output.wait_for("cli.slow_async started")
        for run_id in ids:
            # The worker starts a run while RUNNING is on its way: it may not be applied yet.
            state = (await api.get(f"/task_runs/{run_id}")).json()["state"]["type"]
            assert state in ("PENDING", "RUNNING")

        process.send_signal(signal.SIGTERM)
        signalled = trio.current_time()
        with within(1 + 8, output):
            assert await process.wait() == 0
        assert trio.current_time() - signalled >= 1.0  # the runs had their grace period
        await output.wait_for(r"handing back 2 unfinished run\(s\)")
    for run_id in ids:
        state = (await api.get(f"/task_runs/{run_id}")).json()["state"]
        assert (state["type"], state["name"]) == ("SCHEDULED", "Redelivered"), state
    assert "Traceback" not in output.text


async def test_worker_stops_on_sigterm_while_the_server_is_unreachable(refused_port: int) -> None:
    env = worker_env(TRIOWORKER_API_URL=f"http://127.0.0.1:{refused_port}/api")
    async with trio.open_nursery() as nursery:
        process, output = await start_worker(nursery, [f"{TASKS_FILE}:echo"], env)
        await output.wait_for(r"subscription lost .*; reconnecting")
        process.send_signal(signal.SIGTERM)
        await output.wait_for("received SIGTERM")
        code = None
        with trio.move_on_after(3):
            code = await process.wait()
        nursery.cancel_scope.cancel()  # kills the worker if it is still running
    assert code == 0, output.text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["tasks_without_colon"], "expected MODULE:TASK or path/to/file.py:TASK", id="spec"),
        pytest.param(
            ["cli_no_such_module:echo"],
            "cannot import module 'cli_no_such_module': ModuleNotFoundError: No module named",
            id="module",
        ),
        pytest.param(
            [f"{TASKS_MODULE}:nope"], f"module '{TASKS_MODULE}' has no attribute 'nope'", id="attribute"
        ),
        pytest.param([f"{TASKS_FILE}:nope"], "has no attribute 'nope'", id="file-attribute"),
        pytest.param([f"{TASKS_FILE.parent / 'missing.py'}:echo"], "does not exist", id="file"),
        pytest.param([f"{TASKS_MODULE}:not_a_task"], "is not a task: decorate it with", id="not-a-task"),
        pytest.param(
            [f"{TASKS_MODULE}:echo", "--api-url", "ftp://example.com/api"],
            "unusable API URL from --api-url: the API URL must start with http:// or https://",
            id="url",
        ),
        pytest.param(
            [f"{TASKS_MODULE}:echo", "--api-url", "http://example.com:port/api"],
            "unusable API URL from --api-url",
            id="url-port",
        ),
    ],
)
async def test_worker_reports_a_user_error_in_one_line(args: list[str], message: str) -> None:
    result = await trio.run_process(
        worker_command(*args), capture_stderr=True, check=False, cwd=ROOT, env=worker_env()
    )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("trioworker: ")
    assert message in stderr


async def test_worker_reports_an_unusable_url_from_the_environment() -> None:
    env = worker_env(TRIOWORKER_API_URL="localhost:4300/api")
    result = await trio.run_process(
        worker_command(f"{TASKS_FILE}:echo"), capture_stderr=True, check=False, env=env
    )
    assert result.returncode == 1
    assert result.stderr.decode().startswith("trioworker: unusable API URL from TRIOWORKER_API_URL: ")


async def test_worker_reports_a_refused_api_key_in_one_line(
    trioworker_server_control: ServerControl,
) -> None:
    server = await trioworker_server_control.start(api_key="right")
    env = worker_env(TRIOWORKER_API_URL=server.api_url, TRIOWORKER_API_KEY="wrong")
    with trio.fail_after(20):
        result = await trio.run_process(
            worker_command(f"{TASKS_FILE}:echo"), capture_stderr=True, check=False, env=env
        )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"trioworker: the server at {server.api_url} refused the subscription: "), last
    assert "check --api-key or TRIOWORKER_API_KEY" in last


KILLABLE_SOURCE = """
import os, sys, time
from pathlib import Path
from trioworker.tasks import task

@task(key="t.once_stuck")
def once_stuck(marker: str) -> str:
    first = not Path(marker).exists()
    Path(marker).write_text("seen")
    if first:
        print("stuck now", file=sys.stderr, flush=True)
        while True:  # the first worker never finishes: it is killed
            time.sleep(0.05)
    return f"finished by {os.getpid()}"
"""


async def test_a_worker_killed_with_sigkill_loses_nothing(
    tmp_path: Path, api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    tasks_file = write(tmp_path / "killable.py", KILLABLE_SOURCE)
    marker = tmp_path / "marker"
    created = await api.post(
        "/task_runs", json={"task_key": "t.once_stuck", "parameters": {"marker": str(marker)}}
    )
    run_id = created.json()["id"]
    env = worker_env(TRIOWORKER_API_URL=trioworker_server.api_url)
    async with trio.open_nursery() as nursery:
        process, output = await start_worker(nursery, [f"{tasks_file}:once_stuck"], env)
        await output.wait_for("stuck now")
        process.kill()  # SIGKILL: no chance to hand anything back
        with within(OUTPUT_TIMEOUT, output):
            assert await process.wait() == -signal.SIGKILL
        second, second_output = await start_worker(nursery, [f"{tasks_file}:once_stuck"], env)
        response = await api.post(
            "/task_runs/wait", json={"ids": [run_id], "timeout": OUTPUT_TIMEOUT, "all": True}, timeout=30
        )
        [run] = response.json()["ended"]
        assert run["state"]["type"] == "COMPLETED"
        assert run["state"]["data"] == f"finished by {second.pid}"
        second.send_signal(signal.SIGTERM)
        with within(OUTPUT_TIMEOUT, second_output):
            assert await second.wait() == 0
    history = [(h["type"], h["name"]) for h in (await api.get(f"/task_runs/{run_id}/history")).json()]
    assert ("SCHEDULED", "Redelivered") in history
    assert run["delivery_count"] == 2


async def test_runs_in_a_killed_workers_prefetch_buffer_are_not_lost(
    tmp_path: Path, api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    tasks_file = write(tmp_path / "killable.py", KILLABLE_SOURCE)
    marker = str(tmp_path / "marker")  # shared: only the first run to start gets stuck
    created = await api.post(
        "/task_runs/batch", json=[{"task_key": "t.once_stuck", "parameters": {"marker": marker}}] * 4
    )
    ids = [run["id"] for run in created.json()]
    env = worker_env(TRIOWORKER_API_URL=trioworker_server.api_url)
    spec = f"{tasks_file}:once_stuck"
    async with trio.open_nursery() as nursery:
        # One slot and three places in the buffer: all four runs go to this worker.
        process, output = await start_worker(nursery, [spec, "--limit", "1", "--prefetch", "3"], env)
        await output.wait_for("stuck now")
        assert (await api.get("/health")).json()["ready"] == 0
        process.kill()
        with within(OUTPUT_TIMEOUT, output):
            assert await process.wait() == -signal.SIGKILL
        second, second_output = await start_worker(nursery, [spec], env)
        response = await api.post(
            "/task_runs/wait", json={"ids": ids, "timeout": OUTPUT_TIMEOUT, "all": True}, timeout=30
        )
        runs = response.json()["ended"]
        assert sorted(run["id"] for run in runs) == sorted(ids)
        assert {run["state"]["data"] for run in runs} == {f"finished by {second.pid}"}
        assert {run["delivery_count"] for run in runs} == {2}
        second.send_signal(signal.SIGTERM)
        with within(OUTPUT_TIMEOUT, second_output):
            assert await second.wait() == 0
