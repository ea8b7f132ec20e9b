"""``trioworker worker``: load tasks from their entry points and run them; the process keeps
the stop's promise even when runs ignore cancellation.

The worker is imported only when the command runs, and this module never imports the server.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import TYPE_CHECKING, Any, Final

import trio

from trioworker._util import only_exception
from trioworker.cli._common import (
    CommandError,
    add_api_options,
    add_log_format_option,
    api_roots_of,
    log,
    port,
    positive_int,
    seconds,
    whole_number,
)
from trioworker.cli._environment import from_environment
from trioworker.cli._tasks import load_tasks
from trioworker.settings import DEFAULT_SHUTDOWN_GRACE_SECONDS, DEFAULT_STATUS_HOST, MAX_PREFETCH

if TYPE_CHECKING:
    from trioworker.worker.task_worker import TaskWorker


#: Seconds a stopping ``trioworker worker`` waits past its grace period for runs that ignore
#: cancellation before it exits anyway (a stop without grace: its second to hand runs back).
STOP_MARGIN: Final = 5.0
#: The exit code of a worker process that gave up on runs that ignored cancellation.
EXIT_RUNS_IGNORED_STOP: Final = 3


async def _exit_when_runs_ignore_the_stop(worker: TaskWorker) -> None:
    """The process keeps the stop's promise: when the worker's stop deadline (plus
    :data:`STOP_MARGIN` after a graceful stop) is over and runs still execute (async code
    that ignores cancellation), log them and end the process. The server hands their
    leases back when the connection drops."""
    while True:
        margin = 0.0 if math.isinf(worker.stop_deadline) or worker.stopped_without_grace else STOP_MARGIN
        with trio.move_on_at(worker.stop_deadline + margin):
            await worker.stop_deadline_changed()
            continue
        runs = worker.unfinished_runs()
        if not runs:  # the worker is handing back or quitting: it returns soon by itself
            await worker.stop_deadline_changed()
            continue
        log.critical(
            "runs ignore cancellation after the stop; exiting without them (the server hands them back): %s",
            ", ".join(runs),
        )
        logging.shutdown()  # flushes every handler
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_RUNS_IGNORED_STOP)


def _named_tasks(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The entry points and the ``--module`` modules of the command line: one or the
    other; CommandError (one line) for both or neither."""
    specs, modules = list(args.tasks), list(args.modules or ())
    if specs and modules:
        variable = args.from_environment.get("modules")
        source = variable or "--module"
        given = f"{variable}={','.join(modules)}" if variable else " ".join(f"--module {m}" for m in modules)
        raise CommandError(
            f"name the tasks as MODULE:TASK or with {source}, not both (got {' '.join(specs)} and {given})"
        )
    if not specs and not modules:
        raise CommandError("no tasks to serve: name them as MODULE:TASK ... or with --module MODULE")
    return specs, modules


async def run_worker(args: argparse.Namespace) -> None:
    """Run the tasks until SIGINT or SIGTERM (or ``--timeout``); CommandError for a bad entry
    point or module, an unusable API URL or a refused API key."""
    from trioworker.errors import SubscriptionRefused
    from trioworker.worker.task_worker import TaskWorker, serve_worker

    tasks = load_tasks(*_named_tasks(args))
    api_urls = api_roots_of(args)
    try:
        worker = TaskWorker(
            *tasks,
            limit=args.limit,
            status_server_port=args.status_port,
            status_server_host=args.status_host,
            api_url=api_urls,
            api_key=args.api_key,
            shutdown_grace_seconds=args.grace,
            allow_pickle=args.allow_pickle,
            prefetch=args.prefetch,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_exit_when_runs_ignore_the_stop, worker)
            await serve_worker(worker, timeout=args.timeout)
            nursery.cancel_scope.cancel()
    except Exception as exc:
        leaf = only_exception(exc)
        if isinstance(leaf, SubscriptionRefused):
            raise CommandError(f"{leaf} (check --api-key or TRIOWORKER_API_KEY)") from None
        raise


def add_worker_command(commands: Any) -> None:
    """Add ``worker`` to ``commands`` (the parser's subparsers)."""
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
            "  trioworker worker --module myapp.tasks --timeout 3600\n"
            "  trioworker worker ./tasks.py:say --limit 4 --api-url http://queue.internal:4300/api\n"
            "\n"
            "An unreachable server is retried with backoff. A bad entry point or module, an unusable\n"
            "API URL or a refused API key stops the worker at once with one line on stderr, exit code 1."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    worker.add_argument(
        "tasks",
        nargs="*",
        metavar="MODULE:TASK",
        help="a task made with @task, as package.module:name (imported with the current directory "
        "on sys.path) or path/to/file.py:name (loaded from the file as a module named after it, "
        "its directory put on sys.path so it can import its siblings)",
    )
    worker.add_argument(
        "--module",
        dest="modules",
        action="append",
        default=None,
        metavar="MODULE",
        help="serve every task of this module (package.module or path/to/file.py: its "
        "module-level names that are tasks); repeatable; instead of MODULE:TASK arguments",
    )
    limits = worker.add_mutually_exclusive_group()
    limits.add_argument(
        "--limit",
        type=positive_int,
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
        "--prefetch",
        type=whole_number(0, MAX_PREFETCH),
        default=0,
        metavar="N",
        help="let the server send up to N runs ahead into this worker's buffer, so a freed slot "
        "starts its next run at once (for short runs; taken back if another worker has a free "
        "slot; default 0)",
    )
    worker.add_argument(
        "--status-port",
        type=port,
        default=None,
        metavar="P",
        help="serve /status, /health and /metrics on this port (0: any free port; default: none)",
    )
    worker.add_argument(
        "--status-host",
        default=DEFAULT_STATUS_HOST,
        metavar="HOST",
        help=f"the address the status server listens on (default {DEFAULT_STATUS_HOST}: this machine "
        "only; 0.0.0.0: every interface, for a probe on another host)",
    )
    add_api_options(worker)
    worker.add_argument(
        "--grace",
        type=seconds,
        default=DEFAULT_SHUTDOWN_GRACE_SECONDS,
        metavar="SECONDS",
        help="when stopping, how long runs in flight may finish before they are cancelled and "
        f"handed back to the queue (default {DEFAULT_SHUTDOWN_GRACE_SECONDS:g})",
    )
    worker.add_argument(
        "--timeout",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help="serve for at most SECONDS, then stop as SIGTERM stops it (--grace included) and exit "
        "with code 0 (default: until stopped)",
    )
    worker.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept runs whose parameters are pickled; unpickling runs arbitrary code, so only "
        "use it if you trust everyone who can submit runs",
    )
    add_log_format_option(worker)
    from_environment(worker)
    worker.set_defaults(handler=run_worker)
