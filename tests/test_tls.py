"""TLS end to end, and the clients' connection settings (trioworker.connection).

A certificate authority and the server's certificate are made in the test (``trustme``).
Real servers over ``https://``/``wss://``, real workers and clients, in-process and as the
commands a user runs: certificates checked against a CA bundle, a wrong CA refused with a
clear error, no check at all with a warning, and extra headers seen by the server on every
request and websocket handshake.
"""

from __future__ import annotations

import io
import json
import logging
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import trio
import trustme
from hypercorn.typing import Framework
from rich.console import Console

import trioworker
from trioworker._http import CertificateError, serve_app
from trioworker.cli._progress import WaitDisplay, follow_run
from trioworker.client.rest import SyncTaskRunClient, TaskRunClient
from trioworker.connection import connection_options, tls_failure
from trioworker.errors import ServerUnavailable
from trioworker.server import RunningServer, ServerConfig, serve_server
from trioworker.server.app import create_app
from trioworker.server.queue import Dispatcher
from trioworker.server.service import TaskRunService
from trioworker.server.store import open_store
from trioworker.tasks import task
from trioworker.testing import ServerControl
from trioworker.worker.task_worker import TaskWorker

from .test_cli import read_until
from .test_cli_tools import run_trioworker


@task(key="tls.greet")
async def greet(name: str) -> str:
    return f"hello {name}"


@attrs.frozen
class TlsFiles:
    """PEM files: the CA, the server's certificate chain and key, and another CA."""

    ca: Path
    certfile: Path
    keyfile: Path
    other_ca: Path


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    authority = trustme.CA()
    server = authority.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "other.pem")
    authority.cert_pem.write_to_path(str(files.ca))
    server.private_key_pem.write_to_path(str(files.keyfile))
    for blob in server.cert_chain_pems:
        blob.write_to_path(str(files.certfile), append=True)
    trustme.CA().cert_pem.write_to_path(str(files.other_ca))
    return files


@pytest.fixture
async def https_server(trioworker_server_control: ServerControl, tls: TlsFiles) -> RunningServer:
    return await trioworker_server_control.start(certfile=tls.certfile, keyfile=tls.keyfile)


class Logged(logging.Handler):
    """Sets an event when a record whose message holds ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = trio.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.messages.append(message)
            self.seen.set()


async def test_a_worker_and_a_client_complete_runs_over_https_and_wss(
    https_server: RunningServer, tls: TlsFiles
) -> None:
    assert https_server.url.startswith("https://127.0.0.1:")
    async with (
        TaskWorker(greet, api_url=https_server.api_url, ca_bundle=tls.ca) as worker,
        trioworker.connect(https_server.api_url, ca_bundle=str(tls.ca)) as client,
    ):
        assert client.channel is not None and client.channel.usable  # the wss:// channel is open
        assert worker.connected  # subscribed over wss://
        futures = [await greet.delay("tls"), *(await greet.map(["a", "b"]))]
        assert [await f.result(timeout=10) for f in futures] == ["hello tls", "hello a", "hello b"]
        [listed] = await client.task_workers("tls.greet")
        assert listed["client_id"] == worker.client_id
    assert worker.finished_task_runs == {"tls.greet": 3}


async def test_the_ca_bundle_from_the_environment_serves_every_client(
    https_server: RunningServer, tls: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIOWORKER_API_URL", https_server.api_url)
    monkeypatch.setenv("TRIOWORKER_API_CA_BUNDLE", str(tls.ca))
    async with TaskWorker(greet):
        future = await greet.delay("env")  # a short-lived client of its own, over https
        assert await future.result(timeout=10) == "hello env"

        def blocking() -> str:
            return greet.sync.delay("sync").result(timeout=10)

        assert await trio.to_thread.run_sync(blocking) == "hello sync"


async def test_a_wrong_ca_is_refused_with_a_clear_error(https_server: RunningServer, tls: TlsFiles) -> None:
    refused = (
        "its TLS certificate was not accepted (unable to get local issuer certificate): give the CA "
        "that signed it (ca_bundle=, TRIOWORKER_API_CA_BUNDLE), or skip the check (TRIOWORKER_API_INSECURE=1)"
    )
    for bundle in (tls.other_ca, None):  # another CA, and the system's trust store
        async with TaskRunClient(https_server.api_url, ca_bundle=bundle) as client:
            with pytest.raises(ServerUnavailable) as caught:
                await client.health()
        assert str(caught.value) == f"cannot reach the trioworker server at {https_server.api_url}: {refused}"
        with (
            SyncTaskRunClient(https_server.api_url, ca_bundle=bundle) as sync_client,
            pytest.raises(ServerUnavailable, match="its TLS certificate was not accepted"),
        ):
            await trio.to_thread.run_sync(sync_client.health)

    # A worker keeps trying (as for any server it cannot reach), and says why.
    logged = Logged(refused)
    logger = logging.getLogger("trioworker.worker.subscription")
    logger.addHandler(logged)
    try:
        worker = TaskWorker(greet, api_url=https_server.api_url, ca_bundle=tls.other_ca)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.start)
            with trio.fail_after(10):
                await logged.seen.wait()
            assert not worker.connected
            worker.stop()
    finally:
        logger.removeHandler(logged)
    assert logged.messages[0].startswith(f"subscription lost ({refused}); reconnecting in ")


async def test_insecure_skips_the_check(https_server: RunningServer) -> None:
    async with (
        TaskWorker(greet, api_url=https_server.api_url, insecure=True),
        trioworker.connect(https_server.api_url, insecure=True) as client,
    ):
        assert client.channel is not None and client.channel.usable
        assert await (await greet.delay("anyone")).result(timeout=10) == "hello anyone"


async def test_http_spoken_to_a_tls_server_and_tls_to_a_plain_one_are_named(
    https_server: RunningServer, tls: TlsFiles, nursery: trio.Nursery
) -> None:
    plain: RunningServer = await nursery.start(serve_server, ServerConfig(port=0))
    plain_as_tls = plain.api_url.replace("http://", "https://")
    async with TaskRunClient(plain_as_tls, ca_bundle=tls.ca) as client:
        with pytest.raises(ServerUnavailable) as caught:
            await client.health()
    assert "the TLS handshake failed (" in str(caught.value)
    assert "does it serve https:// on that port?" in str(caught.value)
    tls_as_plain = https_server.api_url.replace("https://", "http://")
    async with TaskRunClient(tls_as_plain) as client:
        with pytest.raises(ServerUnavailable):
            await client.health()


# -- headers, seen by the server


#: An ASGI application: ``await app(scope, receive, send)``.
Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


@attrs.define(eq=False)
class Recorder:
    """An ASGI middleware that records the headers of every request and websocket handshake."""

    app: Asgi
    seen: list[tuple[str, str, dict[str, str]]] = attrs.field(factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
            self.seen.append((scope["type"], scope["path"], headers))
        await self.app(scope, receive, send)


@asynccontextmanager
async def recorded_server(
    tls: TlsFiles, tmp_path: Path, api_key: str | None = None
) -> AsyncIterator[tuple[str, Recorder]]:
    """A real server over TLS (its parts put together as serve_server does) behind a
    recorder: ``(API URL, recorder)``; with ``api_key``, the server requires that key."""
    async with open_store(tmp_path / "recorded.db") as store, trio.open_nursery() as nursery:
        dispatcher = Dispatcher()
        service = TaskRunService(store, dispatcher)
        await nursery.start(dispatcher.release_delayed_runs)
        recorder = Recorder(cast(Asgi, create_app(service, api_key=api_key)))
        serve = partial(
            serve_app,
            cast(Framework, recorder),
            "127.0.0.1",
            0,
            certfile=str(tls.certfile),
            keyfile=str(tls.keyfile),
        )
        url: str = await nursery.start(serve)
        yield f"{url}/api", recorder
        nursery.cancel_scope.cancel()


@pytest.fixture
async def recorded(tls: TlsFiles, tmp_path: Path) -> AsyncIterator[tuple[str, Recorder]]:
    async with recorded_server(tls, tmp_path) as served:
        yield served


async def test_extra_headers_arrive_on_every_request_and_handshake(
    recorded: tuple[str, Recorder], tls: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    api_url, recorder = recorded
    monkeypatch.setenv("TRIOWORKER_API_HEADERS", json.dumps({"X-Tenant": "blue", "X-Trace": "t-1"}))
    async with (
        TaskWorker(greet, api_url=api_url, ca_bundle=tls.ca),
        trioworker.connect(api_url, api_key="k", ca_bundle=tls.ca) as client,
    ):
        assert await (await greet.delay("headers")).result(timeout=10) == "hello headers"
        await client.health()
        async with TaskRunClient(
            api_url, ca_bundle=tls.ca, headers={"X-Tenant": "red", "authorization": "not the key's"}
        ) as explicit:
            await explicit.read_task_runs()
    kinds = {(kind, path) for kind, path, _ in recorder.seen}
    assert ("websocket", "/api/task_runs/subscriptions/scheduled") in kinds
    assert ("websocket", "/api/task_runs/channel") in kinds
    assert ("http", "/api/health") in kinds
    *from_environment, (_, last_path, last) = recorder.seen
    for kind, path, headers in from_environment:
        assert (headers.get("x-tenant"), headers.get("x-trace")) == ("blue", "t-1"), (kind, path)
    assert (last_path, last["x-tenant"], "x-trace" in last) == ("/api/task_runs", "red", False)
    assert last["authorization"] == "not the key's"  # no key: a header of that name is sent as given
    health = [headers for kind, path, headers in recorder.seen if path == "/api/health"]
    assert health[-1]["authorization"] == "Bearer k"  # the key's header wins


@attrs.define(eq=False)
class ShownDisplay(WaitDisplay):
    """``submit --wait``'s display, with an event set once it showed the run COMPLETED."""

    completed: trio.Event = attrs.field(factory=trio.Event)

    def show(self, *, state: str | None = None, workers: int | None = None) -> None:
        super().show(state=state, workers=workers)
        if self.state == "COMPLETED":
            self.completed.set()


async def test_the_api_key_wins_over_an_authorization_header_on_requests_and_handshakes(
    tls: TlsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A gateway's header of the same name, spelled in another case, in the variable: the key
    # the server requires wins on every request and every handshake, and everything works.
    monkeypatch.setenv("TRIOWORKER_API_HEADERS", json.dumps({"AUTHORIZATION": "Bearer gateway", "X-T": "1"}))
    async with recorded_server(tls, tmp_path, api_key="right") as (api_url, recorder):
        async with (
            TaskWorker(greet, api_url=api_url, api_key="right", ca_bundle=tls.ca),
            trioworker.connect(api_url, api_key="right", ca_bundle=tls.ca) as client,
        ):
            assert client.channel is not None and client.channel.usable  # its auth passed
            future = await greet.delay("key")
            assert await future.result(timeout=10) == "hello key"
            display = ShownDisplay(future.task_run_id, greet.key, Console(file=io.StringIO()))
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(follow_run, client, future.task_run_id, display)
                    await display.completed.wait()  # shown once the live feed's auth passed
                    nursery.cancel_scope.cancel()
        async with TaskRunClient(api_url, ca_bundle=tls.ca) as keyless:  # no key: the header as given
            with pytest.raises(trioworker.ApiError, match=r"^401: missing or wrong API key"):
                await keyless.read_task_runs()
    paths = {(kind, path) for kind, path, _ in recorder.seen}
    for socket_path in ("subscriptions/scheduled", "channel"):
        assert ("websocket", f"/api/task_runs/{socket_path}") in paths
    assert ("websocket", "/api/events") in paths
    *with_key, (_, _, keyless_headers) = recorder.seen
    assert len({kind for kind, _, _ in with_key}) == 2  # requests and handshakes alike
    for kind, path, headers in with_key:
        assert (headers["authorization"], headers["x-t"]) == ("Bearer right", "1"), (kind, path)
    assert keyless_headers["authorization"] == "Bearer gateway"


# -- the settings, checked


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"TRIOWORKER_API_HEADERS": "{bad"},
            'TRIOWORKER_API_HEADERS: expected a JSON object such as {"X-Tenant": "blue"}, got \'{bad\' '
            "(Expecting property name enclosed in double quotes at character 1)",
        ),
        (
            {"TRIOWORKER_API_HEADERS": '["X-Tenant"]'},
            'TRIOWORKER_API_HEADERS: expected a JSON object such as {"X-Tenant": "blue"}, got a JSON list',
        ),
        (
            {"TRIOWORKER_API_HEADERS": '{"X Tenant": "a"}'},
            "TRIOWORKER_API_HEADERS: 'X Tenant' is not a header name",
        ),
        (
            {"TRIOWORKER_API_HEADERS": '{"X-Count": 3}'},
            "TRIOWORKER_API_HEADERS: the value of 'X-Count' must be a string",
        ),
        (
            {"TRIOWORKER_API_HEADERS": '{"X-A": "a\\r\\nX-B: b"}'},
            "TRIOWORKER_API_HEADERS: the value of 'X-A' may hold printable ASCII only (no line breaks)",
        ),
        (
            {"TRIOWORKER_API_INSECURE": "maybe"},
            "TRIOWORKER_API_INSECURE: expected 1, true, yes, on (or 0, false",
        ),
        (
            {"TRIOWORKER_API_CA_BUNDLE": "/no/such/ca.pem"},
            "TRIOWORKER_API_CA_BUNDLE: cannot read the CA bundle",
        ),
    ],
)
def test_unusable_settings_are_one_line_naming_them(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as caught:
        connection_options()
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_settings_given_in_code_win_and_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIOWORKER_API_HEADERS", "{bad")
    options = connection_options(headers={"X-A": "1"}, insecure=False)
    assert options.headers == (("X-A", "1"),) and not options.insecure
    assert options.http_headers("key") == {
        "X-A": "1",
        "Content-Type": "application/json",
        "Authorization": "Bearer key",
    }
    assert options.websocket_headers("key") == [(b"X-A", b"1"), (b"Authorization", b"Bearer key")]
    assert options.websocket_headers(None) == [(b"X-A", b"1")]
    mixed = connection_options(headers={"authorization": "Basic x", "content-TYPE": "text/plain"})
    assert mixed.http_headers("key") == {"Authorization": "Bearer key", "Content-Type": "application/json"}
    assert mixed.http_headers(None) == {"authorization": "Basic x", "Content-Type": "application/json"}
    assert mixed.websocket_headers("key") == [
        (b"content-TYPE", b"text/plain"),
        (b"Authorization", b"Bearer key"),
    ]
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("no certificate here\n")
    with pytest.raises(ValueError, match=r"^ca_bundle: cannot read the CA bundle '.*not\.pem': "):
        connection_options(ca_bundle=not_pem, headers={})
    with pytest.raises(ValueError, match=r"^headers: 'a:b' is not a header name"):
        connection_options(headers={"a:b": "c"})


def test_tls_failure_names_only_tls_failures() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "Hostname mismatch, certificate is not valid for 'x'."
    try:
        try:
            raise verify
        except ssl.SSLError as exc:
            raise OSError("wrapped") from exc
    except OSError as outer:
        described = tls_failure(outer)
    assert described is not None
    assert described.startswith("its TLS certificate was not accepted (Hostname mismatch, certificate is")
    assert tls_failure(ConnectionRefusedError(111, "Connection refused")) is None


# -- the commands


def command_env(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOWORKER_")}
    return {**env, **changes}


async def test_the_commands_use_the_ca_bundle_or_say_why_they_cannot(
    https_server: RunningServer, tls: TlsFiles
) -> None:
    url = https_server.api_url
    ok = await run_trioworker(
        "runs", "--json", env=command_env(TRIOWORKER_API_URL=url, TRIOWORKER_API_CA_BUNDLE=str(tls.ca))
    )
    assert (ok.returncode, json.loads(ok.stdout)) == (0, []), ok.stderr
    wrong = await run_trioworker(
        "runs", env=command_env(TRIOWORKER_API_URL=url, TRIOWORKER_API_CA_BUNDLE=str(tls.other_ca))
    )
    assert wrong.returncode == 1
    assert wrong.stderr.decode() == (
        f"trioworker: cannot reach the trioworker server at {url}: its TLS certificate was not accepted "
        "(unable to get local issuer certificate): give the CA that signed it (ca_bundle=, "
        "TRIOWORKER_API_CA_BUNDLE), or skip the check (TRIOWORKER_API_INSECURE=1)\n"
    )
    insecure = await run_trioworker(
        "workers", env=command_env(TRIOWORKER_API_URL=url, TRIOWORKER_API_INSECURE="1")
    )
    assert insecure.returncode == 0, insecure.stderr
    assert "No worker is connected at" in insecure.stdout.decode()
    [warning] = insecure.stderr.decode().splitlines()
    assert "TLS certificates of servers are not checked (TRIOWORKER_API_INSECURE)" in warning
    bad = await run_trioworker("runs", env=command_env(TRIOWORKER_API_URL=url, TRIOWORKER_API_HEADERS="{bad"))
    assert bad.returncode == 1
    assert bad.stderr.decode().startswith("trioworker: TRIOWORKER_API_HEADERS: expected a JSON object")
    assert len(bad.stderr.decode().splitlines()) == 1


async def test_a_server_and_a_worker_started_as_commands_over_tls(tls: TlsFiles, tmp_path: Path) -> None:
    server_env = command_env(
        TRIOWORKER_CERTFILE=str(tls.certfile), TRIOWORKER_HOME=str(tmp_path), TRIOWORKER_PORT="0"
    )
    tasks = tmp_path / "tls_tasks.py"
    tasks.write_text(
        "from trioworker import task\n\n"
        "@task(key='tls.shout')\ndef shout(text: str) -> str:\n    return text.upper()\n"
    )
    async with trio.open_nursery() as nursery:
        server: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-m", "trioworker", "server", "--keyfile", str(tls.keyfile)],
                stderr=subprocess.PIPE,
                env=server_env,
                check=False,
            )
        )
        assert server.stderr is not None
        match, _ = await read_until(server.stderr, r"listening on (https://\S+)")
        url = match.group(1)
        worker_env = command_env(TRIOWORKER_API_URL=url, TRIOWORKER_API_CA_BUNDLE=str(tls.ca))
        worker: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-m", "trioworker", "worker", f"{tasks}:shout", "--timeout", "20"],
                stderr=subprocess.PIPE,
                env=worker_env,
                check=False,
                cwd=tmp_path,
            )
        )
        assert worker.stderr is not None
        await read_until(worker.stderr, r"subscribed to tls\.shout")
        submitted = await run_trioworker(
            "submit", f"{tasks}:shout", "tls", "--wait", "--timeout", "20", env=worker_env
        )
        assert submitted.returncode == 0, submitted.stderr
        assert json.loads(submitted.stdout) == "TLS"
        for process in (worker, server):
            process.terminate()
            with trio.fail_after(15):
                assert await process.wait() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--certfile", "cert.pem"], "--certfile needs --keyfile (or TRIOWORKER_KEYFILE): TLS takes both"),
        (["--keyfile", "key.pem"], "--keyfile needs --certfile (or TRIOWORKER_CERTFILE): TLS takes both"),
        (
            ["--certfile", "missing.pem", "--keyfile", "key.pem"],
            "cannot use --certfile 'missing.pem' with --keyfile 'key.pem' for TLS: No such file or directory",
        ),
        (
            ["--certfile", "key.pem", "--keyfile", "key.pem"],
            "cannot use --certfile 'key.pem' with --keyfile 'key.pem' for TLS: ",
        ),
    ],
)
async def test_a_server_without_a_usable_certificate_says_so_in_one_line(
    tls: TlsFiles, args: list[str], message: str
) -> None:
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "trioworker", "server", "--port", "0", "--db", ":memory:", *args],
            capture_stderr=True,
            check=False,
            cwd=tls.ca.parent,
            env=command_env(),
        )
    assert result.returncode == 1
    [line] = result.stderr.decode().splitlines()
    assert line.startswith(f"trioworker: {message}")


def test_a_server_config_takes_both_files_or_neither() -> None:
    with pytest.raises(ValueError, match="certfile and keyfile go together"):
        ServerConfig(certfile="cert.pem")
    with pytest.raises(CertificateError, match=r"cannot use certfile 'nope\.pem' with keyfile 'nope\.pem'"):
        from trioworker._http import check_certificate

        check_certificate("nope.pem", "nope.pem")
