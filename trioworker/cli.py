"""The ``trioworker`` command: ``server``, ``worker``, ``demo`` and the tools that talk to a
server (``submit``, ``runs``, ``run``) or to a worker's status server (``status``).

Only this module and :mod:`trioworker.demo` import rich (lazily: ``trioworker server``
and ``trioworker worker`` never load it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from trioworker import __version__
from trioworker.settings import DEFAULT_HOST, DEFAULT_PORT, Settings

if TYPE_CHECKING:
    from rich.console import Console

    from trioworker.models import JSON, StateType, TaskRun
    from trioworker.tasks import Task

log = logging.getLogger("trioworker")


class CommandError(Exception):
    """A user error: printed as one line, exit code 1."""


def _configure_logging(verbose: bool, level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else level,
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


def _load_tasks(specs: Sequence[str]) -> list[Task[..., Any]]:
    """Load every entry point; two different tasks with one key are an error."""
    from trioworker.entrypoints import EntryPointError, load_task

    # The console script's sys.path starts with its own directory, not the working one:
    # put the working directory first so that `trioworker worker mytasks:say` finds mytasks.
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
    loaded: dict[str, tuple[str, Task[..., Any]]] = {}
    for spec in specs:
        try:
            task = load_task(spec)
        except EntryPointError as exc:
            log.debug("loading %s failed", spec, exc_info=exc.__cause__ or exc)
            raise CommandError(str(exc)) from None
        seen = loaded.setdefault(task.key, (spec, task))
        if seen[1] is not task:
            raise CommandError(
                f"{seen[0]!r} and {spec!r} are different tasks with the same key {task.key!r}: "
                "give one of them another key with @task(key=...)"
            )
    return [task for _, task in loaded.values()]


def _check_api_url(api_url: str, source: str) -> None:
    """Raise CommandError for a URL the worker could never connect to."""
    from trioworker.subscription import websocket_url

    try:
        websocket_url(api_url)  # the check TaskWorker.start() makes
        parts = urllib.parse.urlsplit(api_url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number in range)
    except ValueError as exc:
        raise CommandError(f"unusable API URL from {source}: {exc}") from None
    if not parts.hostname:
        raise CommandError(f"unusable API URL from {source}: no host in {api_url!r}")


async def _run_worker(args: argparse.Namespace) -> None:
    from trioworker.errors import SubscriptionRefused
    from trioworker.worker import serve

    tasks = _load_tasks(args.tasks)
    api_url = (args.api_url or Settings.from_env().api_url).rstrip("/")
    _check_api_url(api_url, "--api-url" if args.api_url else "TRIOWORKER_API_URL")
    try:
        await serve(
            *tasks,
            limit=args.limit,
            status_server_port=args.status_port,
            api_url=api_url,
            api_key=args.api_key,
            shutdown_grace_seconds=args.grace,
            allow_pickle=args.allow_pickle,
        )
    except Exception as exc:
        leaf = _single_leaf(exc)
        if isinstance(leaf, SubscriptionRefused):
            raise CommandError(f"{leaf} (check --api-key or TRIOWORKER_API_KEY)") from None
        raise


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 0 and 65535, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _add_worker_command(commands: Any) -> None:
    from trioworker.worker import DEFAULT_SHUTDOWN_GRACE_SECONDS

    worker = commands.add_parser(
        "worker",
        help="run tasks: subscribe to their runs and execute them",
        description=(
            "Subscribe to the server's runs of the given tasks and run them, at most --limit at\n"
            "once: async tasks in Trio, sync tasks in threads. A failing run never stops the worker.\n"
            "\n"
            "SIGINT (Ctrl-C) and SIGTERM stop it cleanly: it takes no new runs, gives the runs in\n"
            "flight --grace seconds to finish, cancels the rest and hands them back to the queue\n"
            "(SCHEDULED again, for another worker), then exits with code 0."
        ),
        epilog=(
            "examples:\n"
            "  trioworker worker myapp.tasks:send_email myapp.tasks:resize_image\n"
            "  trioworker worker ./tasks.py:say --limit 4 --api-url http://queue.internal:4300/api\n"
            "\n"
            "An unreachable server is retried with backoff. A bad entry point, an unusable API URL\n"
            "or a refused API key stops the worker at once with one line on stderr, exit code 1."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    worker.add_argument(
        "tasks",
        nargs="+",
        metavar="MODULE:TASK",
        help="a task made with @task, as package.module:name (imported with the current directory "
        "on sys.path) or path/to/file.py:name (loaded from the file as a module named after it, "
        "its directory put on sys.path so it can import its siblings)",
    )
    limits = worker.add_mutually_exclusive_group()
    limits.add_argument(
        "--limit",
        type=_positive_int,
        default=10,
        metavar="N",
        help="run at most N runs at once (default 10)",
    )
    limits.add_argument(
        "--no-limit",
        dest="limit",
        action="store_const",
        const=None,
        default=argparse.SUPPRESS,
        help="no limit on runs at once (sync tasks still share at most 100 threads)",
    )
    worker.add_argument(
        "--status-port",
        type=_port,
        default=None,
        metavar="P",
        help="serve /status, /health and /metrics on this port (0: any free port; default: none)",
    )
    worker.add_argument(
        "--api-url",
        default=None,
        metavar="URL",
        help="the server's API root (default $TRIOWORKER_API_URL, else "
        f"http://{DEFAULT_HOST}:{DEFAULT_PORT}/api)",
    )
    worker.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="the API key to send to the server (default $TRIOWORKER_API_KEY)",
    )
    worker.add_argument(
        "--grace",
        type=_seconds,
        default=DEFAULT_SHUTDOWN_GRACE_SECONDS,
        metavar="SECONDS",
        help="when stopping, how long runs in flight may finish before they are cancelled and "
        f"handed back to the queue (default {DEFAULT_SHUTDOWN_GRACE_SECONDS:g})",
    )
    worker.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept runs whose parameters are pickled; unpickling runs arbitrary code, so only "
        "use it if you trust everyone who can submit runs",
    )
    worker.set_defaults(handler=_run_worker)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioworker", description="Background task runs for Trio: server, workers and tools."
    )
    parser.add_argument("--version", action="version", version=f"trioworker {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.set_defaults(log_level=logging.INFO)
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
    _add_worker_command(commands)
    _add_demo_command(commands)
    _add_tool_commands(commands)
    return parser


def _single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups, else ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.log_level)
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
