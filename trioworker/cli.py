"""The ``trioworker`` command: ``server``, ``worker``, ``demo`` and the tools that talk to a
server (``submit``, ``runs``, ``run``) or to a worker's status server (``status``).

Only this module and :mod:`trioworker.demo` import rich (lazily: ``trioworker server``
and ``trioworker worker`` never load it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from trioworker._util import only_exception
from trioworker._version import __version__
from trioworker.settings import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_STATUS_HOST,
    MAX_PREFETCH,
    Settings,
    api_root,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from trioworker.models import JSON, StateType, TaskRun
    from trioworker.tasks import Task
    from trioworker.worker.task_worker import TaskWorker

log = logging.getLogger("trioworker")

T = TypeVar("T")


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
    from trioworker.server.store import StoreError, database_path

    settings = Settings.from_env()
    try:
        db_path = database_path(settings.db_path if args.db is None else args.db)
    except ValueError as exc:
        raise CommandError(f"unusable --db: {exc}") from None
    config = ServerConfig(
        db_path=db_path,
        host=args.host,
        port=args.port,
        api_key=args.api_key or settings.api_key,
        max_deliveries=args.max_deliveries,
        max_body_bytes=args.max_body_bytes,
    )
    shutdown = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_shutdown_on_signals, shutdown)
            await serve_server(config, shutdown=shutdown)
            nursery.cancel_scope.cancel()
    except* StoreError as group:  # the database is in use, or of a newer trioworker
        raise CommandError(str(group.exceptions[0])) from None
    log.info("server stopped")


def _load_tasks(specs: Sequence[str]) -> list[Task[..., Any]]:
    """Load every entry point; two different tasks with one key are an error."""
    from trioworker.worker.entrypoints import EntryPointError, load_task

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


def _api_root(args: argparse.Namespace) -> str:
    """The API root of ``--api-url``, else of ``TRIOWORKER_API_URL``; CommandError if unusable."""
    api_url = args.api_url or Settings.from_env().api_url
    try:
        return api_root(api_url)
    except ValueError as exc:
        source = "--api-url" if args.api_url else "TRIOWORKER_API_URL"
        raise CommandError(f"unusable API URL from {source}: {exc}") from None


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


async def _run_worker(args: argparse.Namespace) -> None:
    from trioworker.errors import SubscriptionRefused
    from trioworker.worker.task_worker import TaskWorker, serve_worker

    tasks = _load_tasks(args.tasks)
    api_url = _api_root(args)
    try:
        worker = TaskWorker(
            *tasks,
            limit=args.limit,
            status_server_port=args.status_port,
            status_server_host=args.status_host,
            api_url=api_url,
            api_key=args.api_key,
            shutdown_grace_seconds=args.grace,
            allow_pickle=args.allow_pickle,
            prefetch=args.prefetch,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_exit_when_runs_ignore_the_stop, worker)
            await serve_worker(worker)
            nursery.cancel_scope.cancel()
    except Exception as exc:
        leaf = only_exception(exc)
        if isinstance(leaf, SubscriptionRefused):
            raise CommandError(f"{leaf} (check --api-key or TRIOWORKER_API_KEY)") from None
        raise


def _whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from ``minimum`` (to ``maximum``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


_positive_int = _whole_number(1)
_count = _whole_number(0)


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
    from trioworker.worker.task_worker import DEFAULT_SHUTDOWN_GRACE_SECONDS

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
        "--prefetch",
        type=_whole_number(0, MAX_PREFETCH),
        default=0,
        metavar="N",
        help="let the server send up to N runs ahead into this worker's buffer, so a freed slot "
        "starts its next run at once (for short runs; taken back if another worker has a free "
        "slot; default 0)",
    )
    worker.add_argument(
        "--status-port",
        type=_port,
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
    _add_api_options(worker)
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


# --------------------------------------------------------------------------- rich output


def _console() -> Console:
    """A rich console on stdout; piped output is not wrapped at 80 columns (one row per line)."""
    from rich.console import Console

    width = None
    if not sys.stdout.isatty() and not os.environ.get("COLUMNS"):
        width = PIPED_WIDTH
    return Console(width=width)


#: Columns of rich output that goes to a pipe or a file (COLUMNS overrides it).
PIPED_WIDTH: Final = 200


# --------------------------------------------------------------------------- demo


async def _run_demo(args: argparse.Namespace) -> None:
    from trioworker.demo import DemoConfig, DemoError, run_demo

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
        await run_demo(config, _console())
    except Exception as exc:
        leaf = only_exception(exc)
        if isinstance(leaf, DemoError):
            raise CommandError(str(leaf)) from None
        raise


#: ``trioworker demo``'s defaults: runs of the map, the worker's limit, seconds to wait.
DEMO_RUNS: Final = 300
DEMO_LIMIT: Final = 50
DEMO_TIMEOUT: Final = 60.0


def _add_demo_command(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="see trioworker work: a server, a worker and a mix of runs, in one process",
        description=(
            "Start a server (on a fresh $TRIOWORKER_HOME/demo.db) and a worker in this process,\n"
            "submit a mix of runs of the example tasks in trioworker.demo_tasks and show them\n"
            "finish: a sync and an async task, one that fails once and succeeds on its retry,\n"
            "one that fails for good, one delayed by a second, one that waits for another's\n"
            "result, and a map of --runs runs. Then print a table of what happened, and the\n"
            "server's and the worker's URLs.\n"
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
        type=_count,
        default=DEMO_RUNS,
        metavar="N",
        help=f"how many runs the map submits (default {DEMO_RUNS})",
    )
    demo.add_argument(
        "--port",
        type=_port,
        default=None,
        metavar="P",
        help=f"serve the API on this port (default: a free one; the usual one is {DEFAULT_PORT})",
    )
    demo.add_argument(
        "--limit",
        type=_positive_int,
        default=DEMO_LIMIT,
        metavar="N",
        help=f"the worker runs at most N runs at once (default {DEMO_LIMIT})",
    )
    demo.add_argument(
        "--timeout",
        type=_seconds,
        default=DEMO_TIMEOUT,
        metavar="SECONDS",
        help=f"give up if the runs have not all ended by then (default {DEMO_TIMEOUT:g})",
    )
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the server and the worker up after the demo, until Ctrl-C or SIGTERM",
    )
    demo.set_defaults(handler=_run_demo, log_level=logging.WARNING)


# --------------------------------------------------------------------------- talking to a server


def _api(args: argparse.Namespace) -> tuple[str, str | None]:
    """The API URL and key of the command line, else of the environment; checked."""
    return _api_root(args), args.api_key or Settings.from_env().api_key


@contextmanager
def _api_errors(api_url: str) -> Iterator[None]:
    """The client's errors as one line each."""
    from trioworker.errors import ApiError, NotFound, ServerUnavailable

    try:
        yield
    except ServerUnavailable as exc:
        cause = exc.__cause__
        reason = f": {cause}" if cause is not None and str(cause) else ""
        raise CommandError(
            f"cannot reach the trioworker server at {api_url}{reason} "
            "(is it running? set --api-url or TRIOWORKER_API_URL)"
        ) from None
    except NotFound as exc:
        raise CommandError(exc.detail) from None
    except ApiError as exc:
        hint = " (check --api-key or TRIOWORKER_API_KEY)" if exc.status_code == 401 else ""
        raise CommandError(f"the server refused the request: {exc.status_code} {exc.detail}{hint}") from None


def _add_api_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-url",
        default=None,
        metavar="URL",
        help="the server, as `trioworker server` prints it (http://HOST:PORT) or with /api "
        f"(default $TRIOWORKER_API_URL, else http://{DEFAULT_HOST}:{DEFAULT_PORT}/api)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="the API key to send to the server (default $TRIOWORKER_API_KEY)",
    )


def _json_text(value: JSON) -> str:
    return json.dumps(value, ensure_ascii=False, default=repr)


def _local_time(when: datetime) -> str:
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


_STATE_STYLES: Final = {
    "COMPLETED": "green",
    "FAILED": "red",
    "CRASHED": "red",
    "CANCELLED": "magenta",
    "RUNNING": "cyan",
    "PENDING": "blue",
    "SCHEDULED": "yellow",
}


def _state_text(type_: StateType, name: str) -> Text:
    """``COMPLETED``, or ``SCHEDULED (AwaitingRetry)`` when the name says more than the type."""
    from rich.text import Text

    text = Text(type_.value, style=_STATE_STYLES.get(type_.value, ""))
    if name.replace(" ", "").upper() != type_.value:
        text.append(f" ({name})")
    return text


# -- submit


def _parse_value(text: str, where: str) -> JSON:
    """JSON when it parses (``3``, ``true``, ``"3"``, ``[1, 2]``), else the string itself."""
    import orjson

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if text.lstrip().startswith(("[", "{")):
            raise CommandError(f"{where}: not valid JSON: {text!r} ({exc})") from None
        return text


def parse_task_arguments(items: Sequence[str]) -> tuple[list[JSON], dict[str, JSON]]:
    """The ``(args, kwargs)`` that ARGS of ``trioworker submit`` stand for.

    One JSON array is the positional arguments, one JSON object the keyword arguments;
    otherwise each item is ``key=value`` (a keyword argument) or a positional value, each
    value parsed as JSON when it parses and taken as a string when it does not.
    """
    if len(items) == 1 and items[0].lstrip().startswith(("[", "{")):
        value = _parse_value(items[0], "ARGS")
        if isinstance(value, list):
            return value, {}
        if isinstance(value, dict):
            return [], value
    args: list[JSON] = []
    kwargs: dict[str, JSON] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if sep and key.isidentifier():
            if key in kwargs:
                raise CommandError(f"argument {key!r} is given twice")
            kwargs[key] = _parse_value(text, f"argument {key!r}")
        else:
            args.append(_parse_value(item, f"argument {len(args) + 1}"))
    return args, kwargs


async def _run_submit(args: argparse.Namespace) -> None:
    from trioworker.client.futures import result_of
    from trioworker.client.rest import connect
    from trioworker.errors import ParameterError, ResultDecodeError
    from trioworker.models import StateType
    from trioworker.serializers import read_arguments

    api_url, api_key = _api(args)
    (task,) = _load_tasks([args.task])
    call_args, call_kwargs = parse_task_arguments(args.arguments)
    if task.serializer == "json":  # read as the annotations say, as the worker will
        try:
            call_args, call_kwargs = read_arguments(task.fn, call_args, call_kwargs)
        except (TypeError, ParameterError) as exc:
            raise CommandError(f"cannot submit {task.name}: {exc}") from None
    wait = args.wait or args.timeout is not None
    with _api_errors(api_url):
        async with connect(api_url, api_key):
            try:
                future = await task.apply_async(call_args, call_kwargs)
            except TypeError as exc:  # the arguments do not fit the signature
                raise CommandError(f"cannot submit {task.name}: {exc}") from None
            if not wait:
                print(future.task_run_id, flush=True)
                return
            print(f"submitted run {future.task_run_id} of {task.key}", file=sys.stderr, flush=True)
            run = await future.wait(args.timeout)
    if run is None or not run.state.is_terminal:
        state = "unknown" if run is None else run.state.type.value
        waited = "yet" if args.timeout is None else f"after {args.timeout:g} s"
        raise CommandError(f"run {future.task_run_id} has not ended {waited} (it is {state})")
    if run.state.type is not StateType.COMPLETED:
        why = f": {run.state.message}" if run.state.message else ""
        raise CommandError(f"run {run.id} ended {run.state.type.value}{why}")
    try:
        value = run.state.data if run.serializer == "json" else result_of(run, task)
    except ResultDecodeError as exc:
        raise CommandError(str(exc)) from None
    print(_json_text(value), flush=True)


# -- runs


def _state_type(text: str) -> StateType:
    from trioworker.models import StateType

    try:
        return StateType(text.upper())
    except ValueError:
        names = ", ".join(s.value for s in StateType)
        raise argparse.ArgumentTypeError(f"unknown state {text!r} (one of {names})") from None


def _page_size(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_RUNS_LISTED:
        raise argparse.ArgumentTypeError(f"at most {MAX_RUNS_LISTED}, got {value}")
    return value


#: The most runs the server lists in one answer.
MAX_RUNS_LISTED: Final = 1000


async def _run_runs(args: argparse.Namespace) -> None:
    from rich.table import Table

    from trioworker.client.rest import TaskRunClient

    api_url, api_key = _api(args)
    with _api_errors(api_url):
        async with TaskRunClient(api_url, api_key) as client:
            runs = await client.read_task_runs(
                task_key=args.task, state=args.state, limit=args.limit, offset=args.offset
            )
    console = _console()
    if not runs:
        console.print("No runs" + (" match." if args.task or args.state else ".") + _page_hint(args, 0))
        return
    table = Table(title="Task runs (oldest first; times are local)", title_justify="left")
    table.add_column("id", no_wrap=True)
    table.add_column("task key", overflow="fold")
    table.add_column("name", overflow="fold")
    table.add_column("state")
    table.add_column("created", no_wrap=True)
    table.add_column("updated", no_wrap=True)
    for run in runs:
        table.add_row(
            str(run.id),
            run.task_key,
            run.name,
            _state_text(run.state.type, run.state.name),
            _local_time(run.created),
            _local_time(run.updated),
        )
    console.print(table)
    if args.offset == 0 and len(runs) < args.limit:
        footer = f"{len(runs)} run{'s' if len(runs) != 1 else ''}"
    else:
        footer = f"runs {args.offset + 1} to {args.offset + len(runs)}" + _page_hint(args, len(runs))
    console.print(footer, highlight=False)


def _page_hint(args: argparse.Namespace, shown: int) -> str:
    if shown == args.limit:
        return f"; more with --offset {args.offset + shown}"
    return ""


# -- run ID


def _run_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise CommandError(f"no task run {text!r}: run ids are UUIDs, as `trioworker runs` shows") from None


def _run_fields(run: TaskRun) -> Table:
    from rich.table import Table

    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold", no_wrap=True)
    fields.add_column()
    state = _state_text(run.state.type, run.state.name)
    state.append(f" since {_local_time(run.state.timestamp)}")
    rows: list[tuple[str, str | Text]] = [
        ("id", str(run.id)),
        ("task key", run.task_key),
        ("name", run.name),
        ("state", state),
        ("created", _local_time(run.created)),
        ("updated", _local_time(run.updated)),
        ("attempts", str(run.run_count)),
        ("parameters", run.parameters if run.serializer == "pickle" else _json_text(run.parameters)),
    ]
    if run.serializer != "json":
        rows.append(("serializer", run.serializer))
    if run.state.state_details.scheduled_time is not None and run.state.type.value == "SCHEDULED":
        rows.append(("due", _local_time(run.state.state_details.scheduled_time)))
    if run.wait_for:
        rows.append(("waits for", ", ".join(str(i) for i in run.wait_for)))
    if run.parent_task_run_id is not None:
        rows.append(("parent", str(run.parent_task_run_id)))
    if run.tags:
        rows.append(("tags", ", ".join(run.tags)))
    if run.context:
        rows.append(("context", _json_text(run.context)))
    if run.idempotency_key is not None:
        rows.append(("idempotency key", run.idempotency_key))
    for label, value in rows:
        fields.add_row(label, value)
    return fields


async def _run_run(args: argparse.Namespace) -> None:
    from rich.table import Table

    from trioworker.client.rest import TaskRunClient
    from trioworker.models import StateType

    api_url, api_key = _api(args)
    with _api_errors(api_url):
        async with TaskRunClient(api_url, api_key) as client:
            run_id = _run_id(args.id)
            run = await client.read_task_run(run_id)
            history = await client.history(run_id)
    console = _console()
    console.print(_run_fields(run))
    console.print()
    table = Table(title="History (times are local)", title_justify="left")
    table.add_column("time", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("message")
    for change in history:
        table.add_row(
            change.timestamp.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            _state_text(change.type, change.name),
            change.message or "",
        )
    console.print(table)
    console.print()
    state = run.state
    if state.type is StateType.COMPLETED:
        console.print("[bold]Result[/bold]")
        result = state.data if run.serializer == "json" else f"(pickled) {state.data}"
        console.print(_json_text(result), markup=False, highlight=False, soft_wrap=True)
    elif state.is_terminal:
        console.print(f"[bold]{state.type.value}[/bold]", highlight=False)
        console.print(state.message or "(no message)", markup=False, highlight=False, soft_wrap=True)
        data = state.data
        traceback = data.get("traceback") if isinstance(data, dict) else None
        if isinstance(traceback, str):
            console.print()
            console.print("[bold]Traceback[/bold] (on the worker)")
            console.print(traceback.rstrip(), markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(f"Not ended yet: {state.type.value}.", highlight=False)


# -- status


#: Where ``trioworker status`` looks without a URL (start workers with --status-port 4301).
DEFAULT_STATUS_URL: Final = "http://127.0.0.1:4301"


def _status_endpoint(url: str) -> str:
    url = url.rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url if url.endswith("/status") else f"{url}/status"


async def _run_status(args: argparse.Namespace) -> None:
    import httpx

    url = _status_endpoint(args.url or DEFAULT_STATUS_URL)
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(url)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise CommandError(
            f"cannot reach a worker's status server at {url}: {exc or type(exc).__name__} "
            "(was the worker started with --status-port?)"
        ) from None
    if response.status_code != 200:
        raise CommandError(f"{url} answered {response.status_code} {response.reason_phrase}")
    try:
        status = response.json()
        if not isinstance(status, dict):
            raise TypeError(type(status).__name__)
    except (ValueError, TypeError):
        raise CommandError(f"{url} did not answer with a worker's status (JSON object)") from None
    _print_status(status, url)


def _of_type(value: JSON, cls: type[T], default: T) -> T:
    return value if isinstance(value, cls) else default


def _print_status(status: dict[str, JSON], url: str) -> None:
    from rich.table import Table
    from rich.text import Text

    console = _console()
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold", no_wrap=True)
    fields.add_column()
    fields.add_row("worker", str(status.get("client_id")))
    fields.add_row(
        "status", Text("stopping", "yellow") if status.get("stopping") else Text("running", "green")
    )
    started = status.get("started_at")
    if isinstance(started, str):
        try:
            fields.add_row("started", _local_time(datetime.fromisoformat(started)))
        except ValueError:
            fields.add_row("started", started)
    limit = status.get("limit")
    fields.add_row(
        "runs now",
        f"{status.get('current')} running, "
        + ("no limit" if limit is None else f"{status.get('available')} free of {limit}")
        + (f", up to {status['prefetch']} more sent ahead" if status.get("prefetch") else ""),
    )
    fields.add_row("from", url)
    console.print(fields, highlight=False)
    finished = _of_type(status.get("finished"), dict, {})
    in_flight = _of_type(status.get("in_flight"), dict, {})
    tasks = _of_type(status.get("tasks"), list, [])
    table = Table(title="Tasks", title_justify="left")
    table.add_column("task key")
    table.add_column("finished", justify="right")
    table.add_column("running now", justify="right")
    for key in tasks:
        table.add_row(str(key), str(finished.get(key, 0)), str(len(in_flight.get(key) or {})))
    console.print()
    console.print(table)


# -- the parsers


def _add_tool_commands(commands: Any) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    submit = commands.add_parser(
        "submit",
        help="submit a run of a task (and wait for its result)",
        description=(
            "Submit one run of a task and print its id. The task is loaded from its module (as\n"
            "`trioworker worker` does) so that the arguments are bound to its signature here:\n"
            "a missing or unexpected argument is an error, and nothing is submitted.\n"
            "\n"
            "ARGS are either one JSON array (the positional arguments) or one JSON object (the\n"
            "keyword arguments), or any number of key=value items (keyword arguments) and bare\n"
            "values (positional arguments). A value is read as JSON when it parses as JSON\n"
            '(3, 2.5, true, null, [1, 2], {"a": 1}, "3") and is a string otherwise.\n'
            "\n"
            "With --wait, the run id goes to stderr and stdout gets the run's result as JSON\n"
            "once it completed; a run that failed prints its error and exits with code 1."
        ),
        epilog=(
            "examples:\n"
            "  trioworker submit trioworker.demo_tasks:add 2 3\n"
            "  trioworker submit trioworker.demo_tasks:add '[2, 3]' --wait\n"
            '  trioworker submit trioworker.demo_tasks:add \'{"a": 2, "b": 3}\' --wait --timeout 10\n'
            "  trioworker submit ./tasks.py:send_email to=ann@example.com subject='\"42\"'\n"
            "  ID=$(trioworker submit myapp.tasks:resize path=/tmp/a.png) && trioworker run $ID\n"
            "\n"
            "`--` ends the options, for values that start with a dash. To pass one list as the\n"
            "only positional argument, nest it: '[[1, 2, 3]]', or name it: values='[1, 2, 3]'."
        ),
        formatter_class=formatter,
    )
    submit.add_argument(
        "task",
        metavar="MODULE:TASK",
        help="the task, as package.module:name or path/to/file.py:name (as for `trioworker worker`)",
    )
    submit.add_argument("arguments", nargs="*", metavar="ARGS", help="the run's arguments (see above)")
    submit.add_argument("--wait", action="store_true", help="wait until the run ended and print its result")
    submit.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="with --wait (implied): exit with code 1 if the run has not ended by then "
        "(the run itself goes on)",
    )
    _add_api_options(submit)
    submit.set_defaults(handler=_run_submit, log_level=logging.WARNING)

    runs = commands.add_parser(
        "runs",
        help="list task runs in a table",
        description="List task runs, oldest first, with their id, task key, name, state and times.",
        epilog=(
            "examples:\n"
            "  trioworker runs\n"
            "  trioworker runs --state FAILED\n"
            "  trioworker runs --task demo.square --limit 100 --offset 100\n"
            "\n"
            "States: SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, CRASHED (any case)."
        ),
        formatter_class=formatter,
    )
    runs.add_argument("--state", type=_state_type, default=None, metavar="S", help="only runs in this state")
    runs.add_argument("--task", default=None, metavar="KEY", help="only runs of this task key")
    runs.add_argument(
        "--limit",
        type=_page_size,
        default=20,
        metavar="N",
        help=f"list at most N runs (default 20, at most {MAX_RUNS_LISTED})",
    )
    runs.add_argument("--offset", type=_count, default=0, metavar="N", help="skip the first N runs")
    _add_api_options(runs)
    runs.set_defaults(handler=_run_runs, log_level=logging.WARNING)

    run = commands.add_parser(
        "run",
        help="show one run: its fields, state history and result or error",
        description=(
            "Show one task run: its fields, every state it went through, and its result (once\n"
            "COMPLETED) or its error (with the worker's traceback for a FAILED run)."
        ),
        epilog=(
            "examples:\n"
            "  trioworker run 0b7c7c36-8d3a-4a4e-9f6e-2f1d2c9b6a10\n"
            "  trioworker run $(trioworker submit trioworker.demo_tasks:add 2 3)\n"
            "\n"
            "An unknown id prints one line on stderr and exits with code 1."
        ),
        formatter_class=formatter,
    )
    run.add_argument("id", metavar="ID", help="the run's id (as `submit` and `runs` print it)")
    _add_api_options(run)
    run.set_defaults(handler=_run_run, log_level=logging.WARNING)

    status = commands.add_parser(
        "status",
        help="show what a worker is doing (from its status server)",
        description=(
            "Read a worker's status server (GET URL/status) and show it: the worker, whether it\n"
            "is running or stopping, its runs now and its limit, and per task the runs it\n"
            "finished and the runs it is running. The worker must have a status server:\n"
            "`trioworker worker ... --status-port 4301` (`trioworker demo` prints its URL)."
        ),
        epilog=(
            "examples:\n"
            "  trioworker status\n"
            "  trioworker status http://127.0.0.1:4301\n"
            "  trioworker status worker-3.internal:4301\n"
            "\n"
            "An unreachable status server prints one line on stderr and exits with code 1."
        ),
        formatter_class=formatter,
    )
    status.add_argument(
        "url",
        nargs="?",
        default=None,
        metavar="URL",
        help=f"the status server (default {DEFAULT_STATUS_URL}); /status is added when missing",
    )
    status.set_defaults(handler=_run_status, log_level=logging.WARNING)


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
        "--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)"
    )
    server.add_argument(
        "--db",
        default=None,
        help="SQLite file (default $TRIOWORKER_HOME/trioworker.db, that is ~/.trioworker/trioworker.db; "
        "':memory:' keeps nothing), or a sqlite:// URL (sqlite:///relative.db, sqlite:////absolute.db); "
        "one server at a time may use a file",
    )
    server.add_argument(
        "--api-key", default=None, help="require this key of clients (default $TRIOWORKER_API_KEY)"
    )
    server.add_argument(
        "--max-deliveries",
        type=_positive_int,
        default=5,
        help="a run delivered this many times without finishing becomes CRASHED (default 5)",
    )
    server.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=16 * 1024 * 1024,
        help="largest request body or websocket message accepted (default 16 MiB)",
    )
    server.set_defaults(handler=_run_server)
    _add_worker_command(commands)
    _add_demo_command(commands)
    _add_tool_commands(commands)
    return parser


def _is_option(item: str) -> bool:
    return item.startswith("-") and re.fullmatch(r"-\d+(\.\d*)?([eE][-+]?\d+)?", item) is None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``submit`` takes its options anywhere among its ARGS.

    (argparse stops filling ``nargs="*"`` at the first option: ``submit t --wait 1 2``
    would leave ``1 2`` unrecognized. They are ARGS that came after an option.)
    """
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        if args.command == "submit" and not any(_is_option(item) for item in extras):
            args.arguments = [*args.arguments, *extras]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    _configure_logging(args.verbose, args.log_level)
    try:
        trio.run(args.handler, args)
    except BaseException as exc:  # re-raised below unless it is a user error
        leaf = only_exception(exc)
        if isinstance(leaf, CommandError | OSError):
            print(f"trioworker: {leaf}", file=sys.stderr)
            raise SystemExit(1) from None
        if isinstance(leaf, KeyboardInterrupt):
            raise SystemExit(130) from None
        raise


if __name__ == "__main__":
    main()
