"""Every option of `trioworker server` and `trioworker worker` from its `TRIOWORKER_*`
variable: the rule, the command line winning, bad values in one line; and real processes
started from the environment alone."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from trioworker.cli import build_parser, parse_args
from trioworker.cli._common import CommandError
from trioworker.cli._environment import variable_of
from trioworker.server import RunningServer

from .test_cli import read_until
from .test_cli_worker import TASKS_FILE, start_worker, within, worker_env


@pytest.fixture(autouse=True)
def _no_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests set the variables they mean, and only those."""
    for name in list(os.environ):
        if name.startswith("TRIOWORKER_") and name not in ("TRIOWORKER_API_URL", "TRIOWORKER_HOME"):
            monkeypatch.delenv(name)


def test_the_variable_of_an_option() -> None:
    assert variable_of("--max-deliveries") == "TRIOWORKER_MAX_DELIVERIES"
    assert variable_of("--no-limit") == "TRIOWORKER_NO_LIMIT"
    assert variable_of("--api-url") == "TRIOWORKER_API_URL"


SERVER_ENV = {
    "TRIOWORKER_HOST": "0.0.0.0",
    "TRIOWORKER_PORT": "5001",
    "TRIOWORKER_DB": "/tmp/x.db",
    "TRIOWORKER_MAX_DELIVERIES": "3",
    "TRIOWORKER_MAX_BODY_BYTES": "1024",
    "TRIOWORKER_RETENTION": "12h",
    "TRIOWORKER_REPLICA_TIMEOUT": "30s",
    "TRIOWORKER_ALLOWED_ORIGINS": "https://Ops.example.com/, http://localhost:8080",
    "TRIOWORKER_LOG_FORMAT": "json",
    "TRIOWORKER_MAX_QUEUED": "1000",
    "TRIOWORKER_CERTFILE": "/etc/tls/cert.pem",
    "TRIOWORKER_KEYFILE": "/etc/tls/key.pem",
}
SERVER_VALUES = {
    "host": "0.0.0.0",
    "port": 5001,
    "db": "/tmp/x.db",
    "max_deliveries": 3,
    "max_body_bytes": 1024,
    "retention": 12 * 3600.0,
    "replica_timeout": 30.0,
    "allowed_origins": ["https://ops.example.com", "http://localhost:8080"],
    "log_format": "json",
    "max_queued": 1000,
    "certfile": "/etc/tls/cert.pem",
    "keyfile": "/etc/tls/key.pem",
}
WORKER_ENV = {
    "TRIOWORKER_LIMIT": "4",
    "TRIOWORKER_PREFETCH": "2",
    "TRIOWORKER_STATUS_PORT": "0",
    "TRIOWORKER_STATUS_HOST": "::1",
    "TRIOWORKER_GRACE": "1.5",
    "TRIOWORKER_ALLOW_PICKLE": "yes",
    "TRIOWORKER_LOG_FORMAT": "json",
    "TRIOWORKER_TIMEOUT": "90",
    "TRIOWORKER_MODULE": "app.tasks,other.tasks",
}
WORKER_VALUES = {
    "limit": 4,
    "prefetch": 2,
    "status_port": 0,
    "status_host": "::1",
    "grace": 1.5,
    "allow_pickle": True,
    "log_format": "json",
    "timeout": 90.0,
    "modules": ["app.tasks", "other.tasks"],
}


def values(args: object, names: dict[str, object]) -> dict[str, object]:
    return {name: getattr(args, name) for name in names}


def test_every_option_comes_from_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults_server = values(parse_args(["server"]), SERVER_VALUES)
    defaults_worker = values(parse_args(["worker", "a:b"]), WORKER_VALUES)
    assert defaults_server == {
        "host": "127.0.0.1",
        "port": 4300,
        "db": None,
        "max_deliveries": 5,
        "max_body_bytes": 16 * 1024 * 1024,
        "retention": 7 * 24 * 3600.0,  # its default is given as text, "7d"
        "replica_timeout": 15.0,
        "allowed_origins": None,
        "log_format": "text",
        "max_queued": None,
        "certfile": None,
        "keyfile": None,
    }
    assert defaults_worker == {
        "limit": 10,
        "prefetch": 0,
        "status_port": None,
        "status_host": "127.0.0.1",
        "grace": 30.0,
        "allow_pickle": False,
        "log_format": "text",
        "timeout": None,
        "modules": None,
    }
    for name, value in {**SERVER_ENV, **WORKER_ENV}.items():
        monkeypatch.setenv(name, value)
    server = parse_args(["server"])
    assert values(server, SERVER_VALUES) == SERVER_VALUES
    assert server.from_environment["db"] == "TRIOWORKER_DB"
    assert values(parse_args(["worker", "a:b"]), WORKER_VALUES) == WORKER_VALUES
    # Every option of both commands is covered above (but the client's two, read elsewhere).
    commands = {name: parser for name, parser in _commands().items() if name in ("server", "worker")}
    dests = {a.dest for p in commands.values() for a in p._actions if a.option_strings and a.dest != "help"}
    assert dests == set(SERVER_VALUES) | set(WORKER_VALUES) | {"api_url", "api_key"}


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def test_the_command_line_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**SERVER_ENV, **WORKER_ENV}.items():
        monkeypatch.setenv(name, value)
    server = parse_args(["server", "--port", "0", "--log-format", "text", "--db", ":memory:"])
    assert (server.port, server.log_format, server.db, server.max_deliveries) == (0, "text", ":memory:", 3)
    assert "db" not in server.from_environment
    worker = parse_args(["worker", "a:b", "--limit", "7", "--grace", "0"])
    assert (worker.limit, worker.grace, worker.prefetch) == (7, 0.0, 2)
    assert parse_args(["worker", "a:b", "--no-limit"]).limit is None
    monkeypatch.setenv("TRIOWORKER_NO_LIMIT", "1")
    monkeypatch.delenv("TRIOWORKER_LIMIT")
    assert parse_args(["worker", "a:b"]).limit is None
    assert parse_args(["worker", "a:b", "--limit", "2"]).limit == 2


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TRIOWORKER_ALLOW_PICKLE": "0"}, {"allow_pickle": False}),
        ({"TRIOWORKER_ALLOW_PICKLE": "off"}, {"allow_pickle": False}),
        ({"TRIOWORKER_ALLOW_PICKLE": "TRUE"}, {"allow_pickle": True}),
        ({"TRIOWORKER_NO_LIMIT": "no", "TRIOWORKER_LIMIT": "3"}, {"limit": 3}),
        ({"TRIOWORKER_NO_LIMIT": "on"}, {"limit": None}),
        ({"TRIOWORKER_LIMIT": "", "TRIOWORKER_GRACE": ""}, {"limit": 10, "grace": 30.0}),  # empty: unset
    ],
)
def test_flags_and_empty_variables(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: dict[str, object]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert values(parse_args(["worker", "a:b"]), expected) == expected


@pytest.mark.parametrize(
    ("command", "env", "line"),
    [
        ("server", {"TRIOWORKER_PORT": "http"}, "TRIOWORKER_PORT: expected a port number, got 'http'"),
        ("server", {"TRIOWORKER_PORT": "70000"}, "TRIOWORKER_PORT: a port is between 0 and 65535, got 70000"),
        (
            "server",
            {"TRIOWORKER_MAX_DELIVERIES": "0"},
            "TRIOWORKER_MAX_DELIVERIES: must be at least 1, got 0",
        ),
        (
            "server",
            {"TRIOWORKER_LOG_FORMAT": "xml"},
            "TRIOWORKER_LOG_FORMAT: expected one of text, json, got 'xml'",
        ),
        (
            "worker",
            {"TRIOWORKER_ALLOW_PICKLE": "maybe"},
            "TRIOWORKER_ALLOW_PICKLE: expected 1, true, yes, on (or 0, false, no, off), got 'maybe'",
        ),
        (
            "worker",
            {"TRIOWORKER_GRACE": "-1"},
            "TRIOWORKER_GRACE: must be a finite number >= 0, got -1",
        ),
        (
            "worker",
            {"TRIOWORKER_LIMIT": "3", "TRIOWORKER_NO_LIMIT": "1"},
            "TRIOWORKER_LIMIT and TRIOWORKER_NO_LIMIT are both set; "
            "they set the same thing: unset one of them",
        ),
    ],
)
def test_a_bad_variable_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, command: str, env: dict[str, str], line: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(CommandError) as raised:
        parse_args([command, "a:b"] if command == "worker" else [command])
    assert str(raised.value) == line
    parse_args(["runs"])  # other commands do not read them


async def test_a_bad_variable_stops_the_command_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "TRIOWORKER_PORT": "http"}
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "trioworker", "server"],
            env=env,
            capture_stderr=True,
            check=False,
            cwd=tmp_path,
        )
    assert result.returncode == 2
    assert result.stderr.decode() == "trioworker: TRIOWORKER_PORT: expected a port number, got 'http'\n"


async def test_help_shows_the_database_the_server_opens(tmp_path: Path) -> None:
    async def help_text(**env: str) -> str:
        with trio.fail_after(30):
            result = await trio.run_process(
                [sys.executable, "-m", "trioworker", "server", "--help"],
                env={**os.environ, **env, "COLUMNS": "300"},
                capture_stdout=True,
                check=True,
            )
        return result.stdout.decode()

    home, named = await help_text(TRIOWORKER_HOME=str(tmp_path)), await help_text(TRIOWORKER_DB="/srv/q.db")
    postgres = await help_text(TRIOWORKER_DB="postgresql://tw:s3cret@db.example:5432/q?password=s3cret")
    assert f"(default now {tmp_path}/trioworker.db, that is $TRIOWORKER_HOME/trioworker.db;" in home
    assert "(default now /srv/q.db, from $TRIOWORKER_DB;" in named
    assert "(default now postgresql://tw@db.example:5432/q?..., from $TRIOWORKER_DB;" in postgres
    assert "s3cret" not in postgres
    assert "[env: TRIOWORKER_MAX_DELIVERIES]" in home


async def test_a_server_and_a_worker_from_the_environment_alone(
    tmp_path: Path, trioworker_server: RunningServer
) -> None:
    db = tmp_path / "from-env.db"
    env = {**os.environ, "TRIOWORKER_PORT": "0", "TRIOWORKER_DB": str(db), "TRIOWORKER_LOG_FORMAT": "json"}
    async with trio.open_nursery() as nursery:
        run = partial(
            trio.run_process,
            [sys.executable, "-m", "trioworker", "server"],
            stderr=subprocess.PIPE,
            env=env,
            check=False,
        )
        process: trio.Process = await nursery.start(run)
        assert process.stderr is not None
        _, seen = await read_until(process.stderr, r"listening on http://")
        assert json.loads(seen.splitlines()[0])["level"] == "INFO"  # json lines
        assert db.exists()
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0

        worker_vars = worker_env(
            TRIOWORKER_API_URL=trioworker_server.api_url,
            TRIOWORKER_LIMIT="3",
            TRIOWORKER_STATUS_PORT="0",
            TRIOWORKER_PREFETCH="1",
        )
        worker, output = await start_worker(nursery, [f"{TASKS_FILE}:echo", "--prefetch", "2"], worker_vars)
        status_url = (await output.wait_for(r"status server listening on (http://\S+)")).group(1)
        async with httpx.AsyncClient() as http:
            status = (await http.get(f"{status_url}/status")).json()
        assert (status["limit"], status["prefetch"]) == (3, 2)  # --prefetch wins over its variable
        worker.send_signal(signal.SIGTERM)
        with within(10, output):
            assert await worker.wait() == 0
