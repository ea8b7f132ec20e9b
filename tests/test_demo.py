"""`trioworker demo` as a new user runs it: a subprocess, with TRIOWORKER_HOME in tmp_path."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from trioworker.cli.demo_tasks import add
from trioworker.client.rest import connect

KINDS = (
    "sync task",
    "async task",
    "fails once, retried",
    "fails for good",
    "delayed 1 s",
    "waits for another",
)
#: A row of the results table: kind, runs, state(s), example.
ROW = re.compile(r"^\s*(?P<kind>\S.*?)\s{2,}(?P<runs>\d+)\s{2,}(?P<state>[A-Z]+)\s{2,}(?P<example>.*?)\s*$")


def demo_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "TRIOWORKER_HOME": str(home), "COLUMNS": "200"}
    for name in ("TRIOWORKER_API_URL", "TRIOWORKER_API_KEY"):
        env.pop(name, None)
    return env


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trioworker", "demo", *args]


def rows(out: str) -> dict[str, re.Match[str]]:
    return {m["kind"]: m for line in out.splitlines() if (m := ROW.match(line))}


async def test_demo_runs_a_mix_of_runs_and_prints_a_table(tmp_path: Path) -> None:
    stale = tmp_path / "demo.db"
    stale.write_text("not a database: the demo starts from a fresh file")
    with trio.fail_after(30):
        result = await trio.run_process(
            demo_command("--runs", "50"),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=demo_env(tmp_path),
        )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err
    assert err == ""
    table = rows(out)
    assert set(table) == {*KINDS, "map of 50"}, out
    states = {kind: match["state"] for kind, match in table.items()}
    assert states == {**dict.fromkeys(table, "COMPLETED"), "fails for good": "FAILED"}
    assert "ZeroDivisionError" in table["fails for good"]["example"]
    assert "add(2, 3) → 5" in table["sync task"]["example"]
    assert "square(add(2, 3)) → 25" in table["waits for another"]["example"]
    assert "attempt 2" in table["fails once, retried"]["example"]
    assert "square(49) → 2401" in table["map of 50"]["example"]
    counts = {kind: int(match["runs"]) for kind, match in table.items()}
    assert counts == {**dict.fromkeys(KINDS, 1), "map of 50": 50}
    total = sum(counts.values())
    assert re.search(rf"^{total} runs in \d+\.\d s: {total - 1} COMPLETED, 1 FAILED$", out, re.M), out
    assert re.search(rf"Runs .* {total}/{total} ", out)  # the progress line, at its end
    assert re.search(r"^Server:\s+http://127\.0\.0\.1:\d+\s", out, re.M)
    assert re.search(r"^Worker:\s+http://127\.0\.0\.1:\d+/status$", out, re.M)
    assert stale.stat().st_size > 0 and stale.read_bytes().startswith(b"SQLite format 3")


async def read_until(stream: trio.abc.ReceiveStream, pattern: str, seen: list[str]) -> re.Match[str]:
    """Read into ``seen`` until what was read matches ``pattern``."""
    with trio.fail_after(30):
        while (match := re.search(pattern, "".join(seen), re.M)) is None:
            chunk = await stream.receive_some()
            if not chunk:
                raise AssertionError(f"the demo ended before printing {pattern!r}:\n{''.join(seen)}")
            seen.append(chunk.decode())
    return match


async def read_rest(stream: trio.abc.ReceiveStream, seen: list[str]) -> str:
    with trio.fail_after(30):
        while chunk := await stream.receive_some():
            seen.append(chunk.decode())
    return "".join(seen)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_keep_running_serves_until_a_signal_then_exits_cleanly(
    tmp_path: Path, sig: signal.Signals
) -> None:
    demo_output: list[str] = []
    start = partial(
        trio.run_process,
        demo_command("--runs", "5", "--keep-running"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        check=False,
        env=demo_env(tmp_path),
    )
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(start)
        assert process.stdout is not None and process.stderr is not None
        api_url = (await read_until(process.stdout, r"TRIOWORKER_API_URL=(\S+)$", demo_output)).group(1)
        await read_until(process.stdout, r"trioworker status http://\S+$", demo_output)
        # The server and the worker are still up: a run submitted now runs.
        async with connect(api_url):
            future = await add.delay(20, 22)
            assert await future.result(timeout=20) == 42
        process.send_signal(sig)
        out = await read_rest(process.stdout, demo_output)
        with trio.fail_after(30):
            assert await process.wait() == 0
        err = (await process.stderr.receive_some()).decode()
    assert "Stopped: the worker and the server shut down cleanly." in out
    assert err == ""


async def test_a_signal_during_the_demo_stops_it_cleanly(tmp_path: Path) -> None:
    demo_output: list[str] = []
    start = partial(
        trio.run_process,
        demo_command("--runs", "5"),
        stdout=subprocess.PIPE,
        check=False,
        env=demo_env(tmp_path),
    )
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(start)
        assert process.stdout is not None
        # The runs were submitted; the delayed one cannot end for another second.
        await read_until(process.stdout, r"^Submitted \d+ runs", demo_output)
        process.send_signal(signal.SIGINT)
        out = await read_rest(process.stdout, demo_output)
        with trio.fail_after(30):
            assert await process.wait() == 0
    assert "Stopped: the worker and the server shut down cleanly." in out
    assert "Runs by kind" not in out


async def test_a_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with trio.fail_after(30):
            result = await trio.run_process(
                demo_command("--port", str(port)),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=demo_env(tmp_path),
            )
    assert result.returncode == 1
    assert result.stderr.decode() == (
        f"trioworker: cannot serve on 127.0.0.1:{port}: Address already in use "
        "(leave out --port to use a free one)\n"
    )


def test_the_demo_tasks_keep_their_first_documented_path() -> None:
    from trioworker.entrypoints import load_task

    assert load_task("trioworker.demo_tasks:add") is add
    assert load_task("trioworker.cli.demo_tasks:add") is add
