"""A PostgreSQL server for the tests, and a fresh schema in it for each test.

Where the server comes from, in order:

1. ``TRIOWORKER_TEST_POSTGRES_URL`` (e.g. ``postgresql://postgres@127.0.0.1:5432/postgres``):
   a server that is already running; the tests create a database of their own in it and
   drop it at the end;
2. else a throwaway cluster: ``initdb`` and ``pg_ctl`` (from ``/usr/lib/postgresql/*/bin``
   or the ``PATH``) in a temporary directory, on a free port, for the session (run as the
   ``postgres`` user when the tests run as root, which initdb refuses);
3. else the PostgreSQL tests are skipped, with the reason, unless
   ``TRIOWORKER_REQUIRE_POSTGRES=1`` (CI sets it): then they fail.

Each test gets a schema of its own (``CREATE SCHEMA``, chosen by the URL's
``options=-csearch_path=...``): measured here, 0.5 ms to create and 0.4 ms to drop, against
26 ms + 10 ms for a database of its own.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import attrs
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

URL_VARIABLE: Final = "TRIOWORKER_TEST_POSTGRES_URL"
REQUIRE_VARIABLE: Final = "TRIOWORKER_REQUIRE_POSTGRES"


def url_of(info: dict[str, object]) -> str:
    """A ``postgresql://`` URL of libpq connection parameters (a socket directory as host
    goes into the query)."""
    params = {k: str(v) for k, v in info.items() if v is not None}
    user = urllib.parse.quote(params.pop("user", ""), safe="")
    password = params.pop("password", None)
    host = params.pop("host", "")
    if host.startswith("/"):
        params["host"], host = host, ""
    port = params.pop("port", "")
    dbname = urllib.parse.quote(params.pop("dbname", ""), safe="")
    auth = f"{user}:{urllib.parse.quote(password, safe='')}@" if password is not None else f"{user}@"
    netloc = f"{auth}{host}" + (f":{port}" if port else "")
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    return f"postgresql://{netloc}/{dbname}{query}"


def with_params(url: str, **changes: str) -> str:
    """``url`` with some connection parameters changed (``dbname``, ``options``...)."""
    return url_of({**conninfo_to_dict(url), **changes})


def binaries() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: the newest Debian cluster's, else the PATH's."""
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
    )
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("initdb")
    return None if found is None or shutil.which("pg_ctl") is None else Path(found).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: With ``throwaway_cluster(passwords=True)``: the role that must give its password.
PASSWORD_ROLE: Final = ("trioworker_login", "right")


@attrs.define(eq=False)
class Cluster:
    """A throwaway cluster (:func:`throwaway_cluster`) that runs: its URL, and ``pg_ctl`` to
    stop it, start it again or restart it, as an operator would (each call blocks until done:
    run it in a thread from Trio)."""

    #: The URL of the superuser ``postgres`` (database ``postgres``).
    url: str
    _pg_ctl: Callable[..., None]
    _options: str

    def start(self) -> None:
        """Start it (again), on the same port; returns once it accepts connections."""
        self._pg_ctl("-o", self._options, "-w", "start")

    def stop(self) -> None:
        """Stop it ("fast": every session ends at once, what it had not committed rolled back)."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """Stop it ("fast") and start it again; returns once it accepts connections."""
        self._pg_ctl("-m", "fast", "-o", self._options, "-w", "restart")


@contextlib.contextmanager
def throwaway_cluster(bin_dir: Path, *, passwords: bool = False) -> Iterator[Cluster]:
    """A PostgreSQL cluster in a temporary directory, trusting local logins, for the life
    of the block. Tuned for tests (fsync off: a crash loses the cluster, which is thrown
    away anyway).

    Args:
        passwords: the role :data:`PASSWORD_ROLE` exists and must log in with its password
            (scram-sha-256) over TCP.
    """
    user = None
    if os.geteuid() == 0:  # initdb refuses root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root, and there is no 'postgres' user to run initdb as") from None
    base = Path(tempfile.mkdtemp(prefix="trioworker-pg-"))
    data = base / "data"
    if user is not None:
        os.chown(base, user.pw_uid, user.pw_gid)
    port = _free_port()

    def run(*command: str | Path) -> None:
        subprocess.run(
            [str(part) for part in command],
            check=True,
            capture_output=True,
            cwd=base,
            timeout=120,
            user=None if user is None else user.pw_uid,
            group=None if user is None else user.pw_gid,
            extra_groups=None if user is None else [],
        )

    def pg_ctl(*args: str | Path) -> None:
        run(bin_dir / "pg_ctl", "-D", data, "-l", base / "log", *args)

    try:
        run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        if passwords:
            role = PASSWORD_ROLE[0]
            hba = data / "pg_hba.conf"
            hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        cluster = Cluster(f"postgresql://postgres@127.0.0.1:{port}/postgres", pg_ctl, options)
        cluster.start()
        try:
            if passwords:
                with psycopg.connect(cluster.url, autocommit=True) as admin:
                    admin.execute(f"CREATE ROLE {PASSWORD_ROLE[0]} LOGIN PASSWORD '{PASSWORD_ROLE[1]}'")
            yield cluster
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):  # a test left it stopped
                pg_ctl("-m", "immediate", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def session_database() -> Iterator[str]:
    """A database of this test session's own: the URL of it, or raises
    :class:`Unavailable` saying why there is none."""
    with contextlib.ExitStack() as stack:
        server = os.environ.get(URL_VARIABLE)
        if not server:
            bin_dir = binaries()
            if bin_dir is None:
                raise Unavailable(
                    f"no PostgreSQL for the tests: set {URL_VARIABLE}, or install PostgreSQL "
                    "(initdb and pg_ctl) so that the tests start a cluster of their own"
                )
            try:
                server = stack.enter_context(throwaway_cluster(bin_dir)).url
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                detail = (getattr(exc, "stderr", b"") or b"").decode(errors="replace")
                why = f"cannot start a PostgreSQL cluster with {bin_dir}: {exc} {detail}"
                raise Unavailable(why) from None
        name = f"trioworker_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        try:
            with psycopg.connect(server, autocommit=True, connect_timeout=10) as admin:
                admin.execute(f'CREATE DATABASE "{name}"')
        except psycopg.Error as exc:
            raise Unavailable(f"cannot create a test database on {URL_VARIABLE}: {exc}") from None
        try:
            yield with_params(server, dbname=name)
        finally:
            with psycopg.connect(server, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Unavailable(Exception):
    """There is no PostgreSQL to test with (the message says why)."""


def unavailable(reason: str) -> None:
    """Skip the test, or fail it when PostgreSQL is required (``TRIOWORKER_REQUIRE_POSTGRES=1``)."""
    if os.environ.get(REQUIRE_VARIABLE) == "1":
        pytest.fail(f"{REQUIRE_VARIABLE}=1, but {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def fresh_schema(database: str) -> Iterator[str]:
    """A new, empty schema in ``database`` for the life of the block: a URL whose
    connections use it."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {name}")
    try:
        yield with_params(database, options=f"-csearch_path={name}")
    finally:
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {name} CASCADE")
