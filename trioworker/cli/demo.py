"""``trioworker demo``: the command. The demo itself (a server, a worker and a mix of runs
in this process) is :mod:`trioworker.cli.demo_runner`, imported only when the command runs,
since it imports the server and rich; its tasks are :mod:`trioworker.cli.demo_tasks`.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Final

from trioworker._util import only_exception
from trioworker.cli._common import CommandError, count, port, positive_int, seconds, stdout_console
from trioworker.settings import DEFAULT_PORT, Settings


async def run_demo_command(args: argparse.Namespace) -> None:
    """Run the demo (until SIGINT or SIGTERM with --keep-running); CommandError for a port in
    use or runs that did not end within --timeout."""
    from trioworker.cli.demo_runner import DemoConfig, DemoError, run_demo

    settings = Settings.from_env()
    config = DemoConfig(
        home=settings.home,
        runs=args.runs,
        port=args.port,
        keep_running=args.keep_running,
        limit=args.limit,
        timeout=args.timeout,
        api_key=settings.api_key,
    )
    try:
        await run_demo(config, stdout_console())
    except Exception as exc:
        leaf = only_exception(exc)
        if isinstance(leaf, DemoError):
            raise CommandError(str(leaf)) from None
        raise


#: ``trioworker demo``'s defaults: runs of the map, the worker's limit, seconds to wait.
DEMO_RUNS: Final = 300
DEMO_LIMIT: Final = 50
DEMO_TIMEOUT: Final = 60.0


def add_demo_command(commands: Any) -> None:
    """Add ``demo`` to ``commands`` (the parser's subparsers)."""
    demo = commands.add_parser(
        "demo",
        help="see trioworker work: a server, a worker and a mix of runs, in one process",
        description=(
            "Start a server (on a fresh $TRIOWORKER_HOME/demo.db) and a worker in this process,\n"
            "submit a mix of runs of the example tasks in trioworker.cli.demo_tasks and show\n"
            "them finish: a sync and an async task, one that fails once and succeeds on its\n"
            "retry, one that fails for good, one delayed by a second, one that waits for\n"
            "another's result, and a map of --runs runs. Then print a table of what happened,\n"
            "and the server's and the worker's URLs.\n"
            "\n"
            "With --keep-running, the server and the worker stay up so that you can submit\n"
            "runs from another shell (the commands to do so are printed) until Ctrl-C or\n"
            "SIGTERM, which stop both cleanly (exit code 0)."
        ),
        epilog=(
            "examples:\n"
            "  trioworker demo\n"
            "  trioworker demo --runs 5000 --limit 200\n"
            "  trioworker demo --keep-running --port 4300\n"
            "\n"
            "The database demo.db is deleted when a demo starts; your own\n"
            "$TRIOWORKER_HOME/trioworker.db is never touched."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--runs",
        type=count,
        default=DEMO_RUNS,
        metavar="N",
        help=f"how many runs the map submits (default {DEMO_RUNS})",
    )
    demo.add_argument(
        "--port",
        type=port,
        default=None,
        metavar="P",
        help=f"serve the API on this port (default: a free one; the usual one is {DEFAULT_PORT})",
    )
    demo.add_argument(
        "--limit",
        type=positive_int,
        default=DEMO_LIMIT,
        metavar="N",
        help=f"the worker runs at most N runs at once (default {DEMO_LIMIT})",
    )
    demo.add_argument(
        "--timeout",
        type=seconds,
        default=DEMO_TIMEOUT,
        metavar="SECONDS",
        help=f"give up if the runs have not all ended by then (default {DEMO_TIMEOUT:g})",
    )
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the server and the worker up after the demo, until Ctrl-C or SIGTERM",
    )
    demo.set_defaults(handler=run_demo_command, log_level=logging.WARNING)
