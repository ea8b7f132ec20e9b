"""`trioworker server` as a user runs it: a real subprocess, stopped by a signal."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from trioworker.cli import build_parser


async def read_until(stream: trio.abc.ReceiveStream, pattern: str) -> tuple[re.Match[str], str]:
    seen = ""
    with trio.fail_after(30):
        while (match := re.search(pattern, seen)) is None:
            chunk = await stream.receive_some()
            if not chunk:
                raise AssertionError(f"process ended before printing {pattern!r}:\n{seen}")
            seen += chunk.decode()
    return match, seen


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_server_serves_and_stops_cleanly_on_signals(tmp_path: Path, sig: signal.Signals) -> None:
    db = tmp_path / "cli.db"
    command = [sys.executable, "-m", "trioworker.cli", "server", "--port", "0", "--db", str(db)]
    async with trio.open_nursery() as nursery:
        run = partial(trio.run_process, command, stderr=subprocess.PIPE, check=False)
        process = await nursery.start(run)
        assert process.stderr is not None
        match, _ = await read_until(process.stderr, r"listening on (http://\S+)")
        async with httpx.AsyncClient(base_url=match.group(1) + "/api") as api:
            assert (await api.post("/task_runs", json={"task_key": "k"})).status_code == 201
        process.send_signal(sig)
        await read_until(process.stderr, r"server stopped")
        with trio.fail_after(10):
            assert await process.wait() == 0
    assert db.exists()


def test_server_options() -> None:
    args = build_parser().parse_args(
        ["server", "--host", "0.0.0.0", "--port", "5000", "--db", "x.db", "--api-key", "k"]
    )
    assert (args.host, args.port, str(args.db), args.api_key) == ("0.0.0.0", 5000, "x.db", "k")


async def test_server_reports_an_unusable_database_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = await trio.run_process(
        [sys.executable, "-m", "trioworker.cli", "server", "--port", "0", "--db", str(blocker / "x.db")],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.decode().strip().splitlines()[-1].startswith("trioworker: ")
