"""`trioworker submit --wait` shows the run's state while it waits, and says when no worker
is subscribed to its task key: a real subprocess, its stderr read as it writes it, with the
test's server and a worker started while it waits."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

from trioworker.server import RunningServer
from trioworker.tasks import task
from trioworker.worker.task_worker import TaskWorker

from .test_cli import read_until

HOLD_SOURCE = """
from trioworker import task

@task(key="tools.hold")
async def hold() -> str:
    raise AssertionError("the test's worker runs it")
"""


async def test_submit_wait_shows_states_and_the_missing_worker(
    trioworker_server: RunningServer, trioworker_worker: Callable[..., TaskWorker], tmp_path: Path
) -> None:
    await shows_the_wait(trioworker_server, trioworker_worker, tmp_path, interactive=False)


async def test_submit_wait_at_a_terminal_redraws_one_line(
    trioworker_server: RunningServer, trioworker_worker: Callable[..., TaskWorker], tmp_path: Path
) -> None:
    await shows_the_wait(trioworker_server, trioworker_worker, tmp_path, interactive=True)


async def shows_the_wait(
    server: RunningServer, make_worker: Callable[..., TaskWorker], tmp_path: Path, *, interactive: bool
) -> None:
    release = trio.Event()

    @task(key="tools.hold")
    async def hold() -> str:
        await release.wait()
        return "held"

    (tmp_path / "hold_tasks.py").write_text(HOLD_SOURCE)
    env = {**os.environ, "TRIOWORKER_API_URL": server.api_url, "COLUMNS": "200"}
    env.pop("TRIOWORKER_API_KEY", None)
    if interactive:  # rich takes stderr for an interactive terminal
        env.update(TTY_INTERACTIVE="1", TTY_COMPATIBLE="1")
    command = [sys.executable, "-m", "trioworker", "submit", f"{tmp_path}/hold_tasks.py:hold", "--wait"]
    run = partial(
        trio.run_process, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False, env=env
    )
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(run)
        assert process.stderr is not None and process.stdout is not None
        match, seen = await read_until(process.stderr, r"submitted run ([0-9a-f]{8})")
        short = match.group(1)
        if interactive:
            waiting = rf"run {short} of tools.hold: SCHEDULED \(no worker is subscribed to tools.hold"
            running = rf"run {short} of tools.hold: RUNNING"
        else:  # a line per change, in the order they happened
            none = "no worker is subscribed to tools.hold: the run waits until one is\n"
            waiting = rf"{none}(.*\n)*run {short}: SCHEDULED\n"
            came = "a worker subscribed to tools.hold\n"
            running = rf"{came}(.*\n)*run {short}: RUNNING\n|run {short}: RUNNING\n(.*\n)*{came}"
        _, more = await read_until(process.stderr, waiting)
        seen += more
        async with make_worker(hold):
            _, more = await read_until(process.stderr, running)
            seen += more
            release.set()
            with trio.fail_after(20):
                assert await process.wait() == 0
        seen += (await read_to_the_end(process.stderr)).decode()
        assert await read_to_the_end(process.stdout) == b'"held"\n'
    if interactive:
        assert "\x1b[2K" in seen  # the line is redrawn in place
        assert not re.search(rf"^run {short}: ", seen, re.M)  # and never printed as lines
    else:
        assert seen.endswith(f"run {short}: COMPLETED\n"), seen
        assert "\x1b" not in seen


async def read_to_the_end(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some():
            data += chunk
    return data
