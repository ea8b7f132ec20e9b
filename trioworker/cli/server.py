"""``trioworker server``: the REST API and the subscription websocket over the durable queue
(a SQLite file, or a PostgreSQL database).

The server is imported only when the command runs (``trioworker worker`` never loads it).
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any, Final

import trio

from trioworker.cli._common import (
    CommandError,
    add_log_format_option,
    duration,
    log,
    port,
    positive_duration,
    positive_int,
)
from trioworker.cli._environment import from_environment, variable_of
from trioworker.settings import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_REPLICA_TIMEOUT_SECONDS, Settings

#: The variable of ``--db``.
DB_VARIABLE: Final = variable_of("--db")


async def shutdown_on_signals(shutdown: trio.Event, *, task_status: trio.TaskStatus[None]) -> None:
    """Set ``shutdown`` at the first SIGINT or SIGTERM (started once the handlers are in place)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s: stopping", signal.Signals(signum).name)
            shutdown.set()
            return


async def run_server(args: argparse.Namespace) -> None:
    """Serve until SIGINT or SIGTERM; CommandError for an unusable, unreachable or busy database."""
    from trioworker.server import ServerConfig, serve_server
    from trioworker.server.store import StoreError, check_database

    settings = Settings.from_env()
    if (args.certfile is None) != (args.keyfile is None):
        given, missing = ("certfile", "keyfile") if args.keyfile is None else ("keyfile", "certfile")
        source = args.from_environment.get(given, f"--{given}")
        raise CommandError(f"{source} needs --{missing} (or {variable_of('--' + missing)}): TLS takes both")
    if args.db is None:  # trioworker's own folder, made on first use (a given --db's folder is not)
        try:
            settings.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(
                f"cannot make the folder {settings.home} (TRIOWORKER_HOME): {exc.strerror}"
            ) from None
    try:
        db_path = check_database(settings.db_path if args.db is None else args.db)
    except ValueError as exc:
        raise CommandError(f"unusable {args.from_environment.get('db', '--db')}: {exc}") from None
    config = ServerConfig(
        db_path=db_path,
        host=args.host,
        port=args.port,
        api_key=args.api_key or settings.api_key,
        max_deliveries=args.max_deliveries,
        max_body_bytes=args.max_body_bytes,
        retention=args.retention,
        replica_timeout=args.replica_timeout,
        max_queued=args.max_queued,
        certfile=args.certfile,
        keyfile=args.keyfile,
        allowed_origins=tuple(args.allowed_origins or ()),
    )
    shutdown = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(shutdown_on_signals, shutdown)

            async def serve(*, task_status: trio.TaskStatus[object]) -> None:
                await serve_server(config, shutdown=shutdown, task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(serve)
            await warn_when_exposed(config.host, config.api_key)
    except* StoreError as group:  # the database is in use, unreachable, unreadable, or of a newer trioworker
        raise CommandError(str(group.exceptions[0])) from None
    log.info("server stopped")


async def warn_when_exposed(host: str, api_key: str | None) -> None:
    """Once the server listens: warn when it does, without a key, on an address other
    machines may reach (every interface, or any address that is not a loopback one)."""
    from trioworker.server.guard import Exposure, exposure

    reach = await exposure(host)
    if reach is not Exposure.LOOPBACK and api_key is None:
        where = (
            "every interface" if reach is Exposure.EVERY_INTERFACE else "an address other machines may reach"
        )
        log.warning(
            "listening on %s (--host %s) without an API key: anyone who can reach this "
            "machine can read, submit, cancel and delete runs; set --api-key or TRIOWORKER_API_KEY",
            where,
            host,
        )


def add_server_command(commands: Any) -> None:
    """Add ``server`` to ``commands`` (the parser's subparsers)."""
    server = commands.add_parser(
        "server",
        help="serve the task-run API and queue",
        description="Serve the REST API and the subscription websocket over a durable queue in a "
        "SQLite file or a PostgreSQL database. Stops cleanly on Ctrl-C and SIGTERM.",
    )
    server.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    server.add_argument(
        "--port", type=port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)"
    )
    server.add_argument(
        "--db",
        default=None,
        help=f"SQLite file (default now {effective_database()}; ':memory:' keeps nothing), or a "
        "sqlite:// URL (sqlite:///relative.db, sqlite:////absolute.db); one server at a time may use a "
        "file. Or a PostgreSQL database: postgresql://USER[:PASSWORD]@HOST:PORT/DB (its tables are "
        "created on start)",
    )
    server.add_argument(
        "--api-key", default=None, help="require this key of clients (default $TRIOWORKER_API_KEY)"
    )
    server.add_argument(
        "--max-deliveries",
        type=positive_int,
        default=5,
        help="a run delivered this many times without finishing becomes CRASHED (default 5)",
    )
    server.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=16 * 1024 * 1024,
        help="largest request body or websocket message accepted (default 16 MiB)",
    )
    server.add_argument(
        "--retention",
        type=duration,
        default="7d",
        metavar="DURATION",
        help="delete runs (with their results and history) this long after they ended: seconds, "
        "or a number with a unit (s, m, h, d, w), e.g. 12h; 0 keeps every run (default 7d)",
    )
    server.add_argument(
        "--replica-timeout",
        type=positive_duration,
        default=f"{DEFAULT_REPLICA_TIMEOUT_SECONDS:g}",
        metavar="DURATION",
        help="on PostgreSQL, which several servers may share: how long this server may go without "
        "a heartbeat before the others hand back the runs it held (and it closes its sockets); "
        f"default {DEFAULT_REPLICA_TIMEOUT_SECONDS:g} s",
    )
    server.add_argument(
        "--max-queued",
        type=positive_int,
        default=None,
        metavar="N",
        help="at most N runs of one task key wait for a worker; a create beyond that answers 429 with "
        "Retry-After, and clients wait and send it again (default: no limit)",
    )
    server.add_argument(
        "--certfile",
        default=None,
        metavar="PEM",
        help="serve over TLS (https:// and wss://) with this certificate, or certificate chain, "
        "in PEM (with --keyfile)",
    )
    server.add_argument(
        "--keyfile", default=None, metavar="PEM", help="the private key of --certfile, in PEM (unencrypted)"
    )
    server.add_argument(
        "--allowed-origins",
        type=origins,
        default=None,
        metavar="ORIGINS",
        help="web pages of these origins (http(s)://host[:port], separated by commas) may change "
        "runs and open websockets; pages of the server's own address always may (default none)",
    )
    add_log_format_option(server)
    from_environment(server)
    server.set_defaults(handler=run_server)


def origins(text: str) -> list[str]:
    """An argparse type: origins separated by commas, each ``http(s)://host[:port]``."""
    from trioworker.server.guard import normalize_origin

    try:
        return [normalize_origin(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def effective_database() -> str:
    """The database ``trioworker server`` opens without ``--db``, and where that comes from."""
    named = os.environ.get(DB_VARIABLE)
    if named:
        return f"{without_password(named)}, from ${DB_VARIABLE}"
    return f"{Settings.from_env().db_path}, that is $TRIOWORKER_HOME/trioworker.db"


def without_password(db: str) -> str:
    """``db`` as it may be shown: a URL's password (``USER:PASSWORD@``) left out, and its
    parameters (``?...``, which may hold one) shortened to ``?...``; a file path as given."""
    scheme, sep, rest = db.partition("://")
    if not sep:
        return db
    rest, query, _ = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return f"{scheme}{sep}{user}{at}{host}{slash}{path}{'?...' if query else ''}"
