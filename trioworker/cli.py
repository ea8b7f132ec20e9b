"""The ``trioworker`` command: ``server`` (and more subcommands as they land)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from trioworker import __version__
from trioworker.settings import DEFAULT_HOST, DEFAULT_PORT, Settings

log = logging.getLogger("trioworker")


class CommandError(Exception):
    """A user error: printed as one line, exit code 1."""


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


async def _shutdown_on_signals(shutdown: trio.Event, *, task_status: trio.TaskStatus[None]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s: stopping", signal.Signals(signum).name)
            shutdown.set()
            return


async def _run_server(args: argparse.Namespace) -> None:
    from trioworker.server import ServerConfig, serve_server

    settings = Settings.from_env()
    db_path = args.db or settings.db_path
    config = ServerConfig(
        db_path=db_path,
        host=args.host,
        port=args.port,
        api_key=args.api_key or settings.api_key,
        max_deliveries=args.max_deliveries,
        max_body_bytes=args.max_body_bytes,
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(_shutdown_on_signals, shutdown)
        await serve_server(config, shutdown=shutdown)
        nursery.cancel_scope.cancel()
    log.info("server stopped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioworker", description="Background task runs for Trio: server, workers and tools."
    )
    parser.add_argument("--version", action="version", version=f"trioworker {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    server = commands.add_parser(
        "server",
        help="serve the task-run API and queue",
        description="Serve the REST API and the subscription websocket over a durable SQLite queue. "
        "Stops cleanly on Ctrl-C and SIGTERM.",
    )
    server.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    server.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)"
    )
    server.add_argument(
        "--db",
        type=Path,
        default=None,
        help="SQLite file (default $TRIOWORKER_HOME/trioworker.db, that is ~/.trioworker/trioworker.db; "
        "':memory:' keeps nothing)",
    )
    server.add_argument(
        "--api-key", default=None, help="require this key of clients (default $TRIOWORKER_API_KEY)"
    )
    server.add_argument(
        "--max-deliveries",
        type=int,
        default=5,
        help="a run delivered this many times without finishing becomes CRASHED (default 5)",
    )
    server.add_argument(
        "--max-body-bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="largest request body or websocket message accepted (default 16 MiB)",
    )
    server.set_defaults(handler=_run_server)
    return parser


def _single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups, else ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        trio.run(args.handler, args)
    except BaseException as exc:  # re-raised below unless it is a user error
        leaf = _single_leaf(exc)
        if isinstance(leaf, CommandError | OSError):
            print(f"trioworker: {leaf}", file=sys.stderr)
            raise SystemExit(1) from None
        if isinstance(leaf, KeyboardInterrupt):
            raise SystemExit(130) from None
        raise


if __name__ == "__main__":
    main()
