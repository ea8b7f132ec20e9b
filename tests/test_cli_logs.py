"""What a worker and a server log, as a user runs them: a line per run at INFO, and JSON lines
with ``--log-format json`` (real subprocesses; the test's server, or a server subprocess)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trioworker.server import RunningServer

from .test_cli_worker import Output, start_worker, within, worker_env

LOG_TASKS = """
from trioworker import task

@task(key="logs.ok")
def ok(n: int) -> int:
    return n

@task(key="logs.boom")
async def boom() -> None:
    raise RuntimeError("boom")

@task(key="logs.flaky", retries=1, retry_delay_seconds=0)
def flaky() -> None:
    raise ValueError("not yet")
"""

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


async def run_tasks(
    server: RunningServer, api: httpx.AsyncClient, tmp_path: Path, *options: str
) -> tuple[dict[str, str], Output]:
    """A worker subprocess runs ok(1), boom() and flaky() (failed twice) and stops; the runs'
    ids by name, and what it printed."""
    (tmp_path / "log_tasks.py").write_text(LOG_TASKS)
    tasks = [f"{tmp_path}/log_tasks.py:{name}" for name in ("ok", "boom", "flaky")]
    async with trio.open_nursery() as nursery:
        process, output = await start_worker(
            nursery, [*tasks, *options], worker_env(TRIOWORKER_API_URL=server.api_url)
        )
        await output.wait_for(r"Subscribing to runs of task\(s\)")
        creates = [
            {"task_key": "logs.ok", "parameters": {"n": 1}},
            {"task_key": "logs.boom"},
            {"task_key": "logs.flaky"},
        ]
        created = (await api.post("/task_runs/batch", json=creates)).json()
        ids = dict(zip(("ok", "boom", "flaky"), (run["id"] for run in created), strict=True))
        waited = await api.post("/task_runs/wait", json={"ids": list(ids.values()), "all": True}, timeout=30)
        assert waited.json()["pending"] == [], output.text
        for run_id in ids.values():  # each run's last line is logged once its report is answered
            await output.wait_for(rf"{run_id}.*(COMPLETED|FAILED)")
        process.send_signal(signal.SIGTERM)
        with within(10, output):
            assert await process.wait() == 0
    return ids, output


async def test_a_worker_logs_a_line_per_run(
    trioworker_server: RunningServer, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    ids, output = await run_tasks(trioworker_server, api, tmp_path)
    lines = re.findall(r"INFO +trioworker\.worker\.engine: (run .*)", output.text)
    pattern = rf"run ({UUID}) of (\S+): ([A-Z]+) in \d+\.\d{{3}} s \(attempt (\d)\)(?:: (.*))?"
    seen = [re.fullmatch(pattern, line) for line in lines]
    assert all(seen), lines
    by_run = sorted((m.group(1), m.group(3), m.group(4), m.group(5)) for m in seen if m)
    assert by_run == sorted(
        [
            (ids["ok"], "COMPLETED", "1", None),
            (ids["boom"], "FAILED", "1", "RuntimeError: boom"),
            (ids["flaky"], "RETRYING", "1", "retry 1 of 1 in 0 s after ValueError: not yet"),
            (ids["flaky"], "FAILED", "2", "ValueError: not yet"),
        ]
    )


async def test_a_worker_logs_json_lines(
    trioworker_server: RunningServer, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    ids, output = await run_tasks(trioworker_server, api, tmp_path, "--log-format", "json")
    records = [json.loads(line) for line in output.text.splitlines()]  # every line is one object
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert datetime.fromisoformat(record["time"]).utcoffset() is not None
    assert any(r["message"].startswith("Subscribing to runs of task(s)") for r in records)
    runs = [r for r in records if "outcome" in r]
    fields = sorted((r["run_id"], r["task_key"], r["outcome"], r["attempt"], r.get("error")) for r in runs)
    assert fields == sorted(
        [
            (ids["ok"], "logs.ok", "COMPLETED", 1, None),
            (ids["boom"], "logs.boom", "FAILED", 1, "RuntimeError: boom"),
            (ids["flaky"], "logs.flaky", "RETRYING", 1, "retry 1 of 1 in 0 s after ValueError: not yet"),
            (ids["flaky"], "logs.flaky", "FAILED", 2, "ValueError: not yet"),
        ]
    )
    for record in runs:
        assert (record["level"], record["logger"]) == ("INFO", "trioworker.worker.engine")
        assert record["message"].startswith(f"run {record['run_id']} of {record['task_key']}: ")
        assert isinstance(record["duration_seconds"], float) and 0 <= record["duration_seconds"] < 20


async def test_a_server_logs_json_lines(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "trioworker", "server", "--port", "0", "--db", ":memory:"]
    async with trio.open_nursery() as nursery:
        run = partial(
            trio.run_process, [*command, "--log-format", "json"], stderr=subprocess.PIPE, check=False
        )
        process: trio.Process = await nursery.start(run)
        assert process.stderr is not None
        output = Output(process.stderr)
        nursery.start_soon(output.pump)
        await output.wait_for(r"listening on http://")
        process.send_signal(signal.SIGTERM)
        with within(10, output):
            assert await process.wait() == 0
        await output.wait_for("server stopped")
    records: list[dict[str, Any]] = [json.loads(line) for line in output.text.splitlines()]
    assert [(r["level"], r["logger"]) for r in records if r["message"] == "server stopped"] == [
        ("INFO", "trioworker")
    ]
    assert all(set(r) >= {"time", "level", "logger", "message"} for r in records)


@pytest.mark.parametrize("command", ["server", "worker"])
def test_log_format_is_text_or_json(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from trioworker.cli import parse_args

    with pytest.raises(SystemExit) as exited:
        parse_args(
            [command, "x:y", "--log-format", "xml"]
            if command == "worker"
            else [command, "--log-format", "xml"]
        )
    assert exited.value.code == 2
    assert "argument --log-format: invalid choice: 'xml'" in capsys.readouterr().err


async def test_the_errors_that_stop_a_command_are_json_lines_when_asked(tmp_path: Path) -> None:
    cases = [
        # An error at start (the database), given by the option or by its variable.
        (["server", "--db", f"{tmp_path}/missing/q.db", "--log-format", "json"], {}, 1),
        (["server", "--db", f"{tmp_path}/missing/q.db"], {"TRIOWORKER_LOG_FORMAT": "json"}, 1),
        # A bad variable, found while the command line is read.
        (["server", "--log-format=json"], {"TRIOWORKER_PORT": "http"}, 2),
        # A worker's entry point that cannot be imported.
        (["worker", "no_such_module_here:task", "--log-format", "json"], {}, 1),
    ]
    messages = [
        f"cannot open the database {tmp_path}/missing/q.db: the folder {tmp_path}/missing does not exist",
        f"cannot open the database {tmp_path}/missing/q.db: the folder {tmp_path}/missing does not exist",
        "TRIOWORKER_PORT: expected a port number, got 'http'",
        "cannot import",
    ]
    for (args, env, code), message in zip(cases, messages, strict=True):
        environment = {k: v for k, v in os.environ.items() if not k.startswith("TRIOWORKER_")}
        with trio.fail_after(30):
            done = await trio.run_process(
                [sys.executable, "-m", "trioworker", *args],
                capture_stderr=True,
                check=False,
                cwd=tmp_path,
                env={**environment, **env},
            )
        [line] = done.stderr.decode().splitlines()
        record = json.loads(line)
        assert (done.returncode, record["level"], record["logger"]) == (code, "ERROR", "trioworker"), line
        assert record["message"].startswith(message), line
        assert datetime.fromisoformat(record["time"]).tzinfo is not None
    # Without it, the same error is the plain line.
    done = await trio.run_process(
        [sys.executable, "-m", "trioworker", "server", "--db", f"{tmp_path}/missing/q.db"],
        capture_stderr=True,
        check=False,
        env=environment,
    )
    assert done.stderr.decode() == f"trioworker: {messages[0]}\n"
