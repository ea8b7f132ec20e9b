"""`trioworker server` as a user runs it: a real subprocess, stopped by a signal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from trioworker._version import __version__
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
    command = [sys.executable, "-m", "trioworker", "server", "--port", "0", "--db", str(db)]
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
    assert (args.host, args.port, args.db, args.api_key) == ("0.0.0.0", 5000, "x.db", "k")
    # Kept as given: a Path would fold "postgresql://h/db" into "postgresql:/h/db".
    assert build_parser().parse_args(["server", "--db", "sqlite:////a/b.db"]).db == "sqlite:////a/b.db"


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["worker", "--help"], [], ["nope"]])
def test_python_m_trioworker_is_the_trioworker_command(args: list[str]) -> None:
    script = Path(sys.executable).parent / "trioworker"  # the console script of pyproject
    as_module = subprocess.run(
        [sys.executable, "-m", "trioworker", *args], capture_output=True, text=True, timeout=60, check=False
    )
    as_script = subprocess.run([script, *args], capture_output=True, text=True, timeout=60, check=False)
    assert (as_module.returncode, as_module.stdout, as_module.stderr) == (
        as_script.returncode,
        as_script.stdout,
        as_script.stderr,
    )
    if args == ["--version"]:
        assert (as_module.returncode, as_module.stdout) == (0, f"trioworker {__version__}\n")
    elif args[-1:] == ["--help"]:
        assert as_module.returncode == 0
        assert as_module.stdout.startswith(f"usage: trioworker {' '.join(args[:-1])}".rstrip())
    else:  # argparse's usage error, under the same program name
        assert as_module.returncode == 2
        assert as_module.stderr.startswith("usage: trioworker ")


def server_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trioworker", "server", "--port", "0", *args]


async def start_server(nursery: trio.Nursery, cwd: Path, *args: str) -> tuple[trio.Process, str]:
    """A ``trioworker server`` subprocess, once it listens; and the URL it printed."""
    run = partial(trio.run_process, server_command(*args), stderr=subprocess.PIPE, check=False, cwd=cwd)
    process: trio.Process = await nursery.start(run)
    assert process.stderr is not None
    match, _ = await read_until(process.stderr, r"listening on (http://\S+)")
    return process, match.group(1)


async def refused(cwd: Path, *args: str) -> str:
    """Run ``trioworker server`` expecting it to refuse to start: its one line on stderr."""
    with trio.fail_after(30):
        result = await trio.run_process(server_command(*args), capture_stderr=True, check=False, cwd=cwd)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert len(stderr.splitlines()) == 1, stderr
    return stderr.strip()


async def test_a_second_server_on_the_same_file_refuses_to_start(tmp_path: Path) -> None:
    db = tmp_path / "data" / "queue.db"
    db.parent.mkdir()
    async with trio.open_nursery() as nursery:
        first, url = await start_server(nursery, tmp_path, "--db", "sqlite:///data/queue.db")
        assert db.exists()  # sqlite:///relative is relative to the working directory
        async with httpx.AsyncClient(base_url=url + "/api") as api:
            created = await api.post("/task_runs", json={"task_key": "k"})
            assert created.status_code == 201
            for spelling in [str(db), "sqlite:///data/queue.db", f"sqlite:///{db}", "data/../data/queue.db"]:
                line = await refused(tmp_path, "--db", spelling)
                assert line == (
                    f"trioworker: the database {db} is in use by another trioworker server; "
                    "stop that server first, or use another database"
                )
            link = tmp_path / "link.db"
            link.symlink_to(db)
            assert f"the database {db} is in use" in await refused(tmp_path, "--db", str(link))
            # The lock is on the file, not its name: a hard link is the same file.
            hard = tmp_path / "hard.db"
            await trio.to_thread.run_sync(os.link, db, hard)
            assert f"the database {hard} is in use" in await refused(tmp_path, "--db", str(hard))
            # SQLite reads file: as a URI; refused before anything is created.
            for uri in ["file:data/queue.db", "file:./data/queue.db?mode=rwc", "FILE:data/queue.db"]:
                assert "unsupported database URL scheme 'file'" in await refused(tmp_path, "--db", uri)
            left = sorted(await trio.to_thread.run_sync(os.listdir, tmp_path))
            assert left == ["data", "hard.db", "link.db"]  # no stray "file:." folder
            # The first server lost nothing and still serves.
            assert (await api.get(f"/task_runs/{created.json()['id']}")).status_code == 200

        # Killed outright, the kernel dropped its lock: a server starts on the file again.
        first.kill()
        with trio.fail_after(10):
            assert await first.wait() == -signal.SIGKILL
        second, url = await start_server(nursery, tmp_path, "--db", str(db))
        async with httpx.AsyncClient(base_url=url) as api:  # the printed URL is the API's too
            run = await api.get(f"/api/task_runs/{created.json()['id']}")
            assert (run.status_code, run.json()["task_key"]) == (200, "k")
        second.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await second.wait() == 0


@pytest.mark.parametrize(
    ("db", "message"),
    [
        (
            "postgresql://queue:s3cret@db.example/queue?bogus=1",
            'cannot read the PostgreSQL URL: invalid URI query parameter: "bogus"',
        ),
        (
            "postgres://queue:s3%cret@db.example/queue",
            'cannot read the PostgreSQL URL: invalid percent-encoded token: "..."',
        ),
        ("mysql://db.example/queue", "unsupported database URL scheme 'mysql'; supported: "),
        ("file:///tmp/queue.db", "unsupported database URL scheme 'file'; supported: "),
        ("file:queue.db", "unsupported database URL scheme 'file'; supported: "),
        ("file:./queue.db?mode=rwc", "unsupported database URL scheme 'file'; supported: "),
        ("sqlite://db.example/queue.db", "a sqlite:// URL has no host: write sqlite:///relative/path.db"),
        ("sqlite:///queue.db?mode=ro", "a sqlite:// URL takes no query or fragment"),
        ("", "the database is empty; give a SQLite file path"),
    ],
)
async def test_an_unsupported_db_is_refused_in_one_line(tmp_path: Path, db: str, message: str) -> None:
    line = await refused(tmp_path, "--db", db)
    assert line.startswith(f"trioworker: unusable --db: {message}")
    if "supported: " in message:
        assert line.endswith(
            "supported: a SQLite file path, ':memory:', a sqlite:// URL "
            "(sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite:// for memory), "
            "or a PostgreSQL URL (postgresql://USER@HOST:PORT/DB)"
        )
    assert "s3cret" not in line and "s3%cret" not in line
    assert await trio.to_thread.run_sync(os.listdir, tmp_path) == []  # no folder "postgresql:", no file


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("bogus.invalid", "--host 'bogus.invalid' does not resolve: "),
        ("192.0.2.1", "the server cannot listen on --host '192.0.2.1' with --port 0: "),
    ],
)
async def test_a_bad_host_is_named_in_one_line(tmp_path: Path, host: str, message: str) -> None:
    line = await refused(tmp_path, "--host", host, "--db", ":memory:")
    assert line.startswith(f"trioworker: {message}")


async def test_a_port_in_use_is_named_in_one_line(tmp_path: Path) -> None:
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        line = await refused(tmp_path, "--host", "127.0.0.1", "--port", str(port), "--db", ":memory:")
    setting = f"--host '127.0.0.1' with --port {port}"
    assert line == f"trioworker: the server cannot listen on {setting}: Address already in use"


async def test_a_database_the_server_cannot_open_is_named_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "not-sqlite.db").write_text("this is not a SQLite database, and is long enough to show it")
    (tmp_path / "folder.db").mkdir()
    cases = {
        "file/x.db": f"{tmp_path}/file is a file, not a folder",
        "file/deeper/x.db": f"{tmp_path}/file is a file, not a folder",
        "not-sqlite.db": "file is not a database",
        "folder.db": "Is a directory",
        "sqlite:///not-sqlite.db": "file is not a database",
        "missing/folder/x.db": f"the folder {tmp_path}/missing/folder does not exist",
        "sqlite:///missing/x.db": f"the folder {tmp_path}/missing does not exist",
    }
    for db, reason in cases.items():
        named = tmp_path / db.removeprefix("sqlite:///")
        line = await refused(tmp_path, "--db", db)
        assert line == f"trioworker: cannot open the database {named}: {reason}", line
    assert (tmp_path / "not-sqlite.db").read_text().startswith("this is not")  # left as it was
    assert not (tmp_path / "missing").exists()  # no folder made for a typo


async def test_the_default_database_folder_is_made_on_first_use(tmp_path: Path) -> None:
    home = tmp_path / "fresh" / "home"
    command = [*server_command(), "--host", "127.0.0.1"]
    env = {**os.environ, "TRIOWORKER_HOME": str(home)}
    env.pop("TRIOWORKER_DB", None)
    async with trio.open_nursery() as nursery:
        run = partial(trio.run_process, command, stderr=subprocess.PIPE, check=False, cwd=tmp_path, env=env)
        process: trio.Process = await nursery.start(run)
        assert process.stderr is not None
        await read_until(process.stderr, r"listening on http://")
        assert (home / "trioworker.db").is_file()
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
    (tmp_path / "blocked").write_text("")
    env["TRIOWORKER_HOME"] = str(tmp_path / "blocked" / "home")
    with trio.fail_after(30):
        result = await trio.run_process(command, capture_stderr=True, check=False, cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert result.stderr.decode() == (
        f"trioworker: cannot make the folder {tmp_path}/blocked/home (TRIOWORKER_HOME): Not a directory\n"
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "0", "0.0", "::0", "0:0:0:0:0:0:0:0"])
async def test_a_server_on_every_interface_without_an_api_key_is_warned_about(
    tmp_path: Path, host: str
) -> None:
    warning = (
        f"listening on every interface (--host {host}) without an API key: anyone who can reach "
        "this machine can read, submit, cancel and delete runs; set --api-key or TRIOWORKER_API_KEY"
    )
    for args, warned in [((), True), (("--api-key", "k"), False)]:
        command = server_command("--host", host, "--db", ":memory:", *args)
        async with trio.open_nursery() as nursery:
            run = partial(trio.run_process, command, stderr=subprocess.PIPE, check=False, cwd=tmp_path)
            process: trio.Process = await nursery.start(run)
            assert process.stderr is not None
            _, seen = await read_until(process.stderr, r"listening on http://")
            process.send_signal(signal.SIGTERM)
            _, rest = await read_until(process.stderr, r"server stopped")
            with trio.fail_after(10):
                assert await process.wait() == 0
        assert (warning in seen + rest) is warned, seen + rest


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--port", "70000"),
        ("--port", "65536"),
        ("--port", "-1"),
        ("--port", "http"),
        ("--max-deliveries", "0"),
        ("--max-body-bytes", "-1"),
        ("--max-body-bytes", "0"),
    ],
)
async def test_a_number_out_of_range_is_a_usage_error(tmp_path: Path, option: str, value: str) -> None:
    with trio.fail_after(30):
        result = await trio.run_process(
            server_command(option, value, "--db", ":memory:"), capture_stderr=True, check=False, cwd=tmp_path
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr  # argparse's usage error, as for every other option
    assert "Traceback" not in stderr
    assert f"argument {option}: " in stderr.splitlines()[-1]
