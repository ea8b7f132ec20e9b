"""The commands about task runs: ``submit`` (and wait for the result), ``runs`` (a table of
runs) and ``run`` (one run: fields, history, result or error).

The client and rich are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from trioworker.cli._api import ID_HELP, SHORT_ID_DIGITS, api_errors, find_run, short_id
from trioworker.cli._common import (
    CommandError,
    add_api_options,
    api_of,
    count,
    local_time,
    plain,
    positive_int,
    print_json,
    seconds,
    stdout_console,
    visible,
)
from trioworker.cli._tasks import load_tasks
from trioworker.protocol import SERIALIZER_JSON, SERIALIZER_PICKLE

if TYPE_CHECKING:
    from rich.table import Table
    from rich.text import Text
    from rich.tree import Tree

    from trioworker.models import JSON, StateType, TaskRun


def _json_text(value: JSON) -> str:
    """``value`` as JSON, its control characters :func:`visible`."""
    return visible(json.dumps(value, ensure_ascii=False, default=repr))


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
        text.append(f" ({visible(name)})")
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
    from trioworker.cli._progress import wait_showing_states
    from trioworker.client.futures import result_of
    from trioworker.client.rest import connect
    from trioworker.errors import ParameterError, ResultDecodeError
    from trioworker.models import StateType
    from trioworker.serializers import read_arguments

    api_urls, api_key = api_of(args)
    (task,) = load_tasks([args.task])
    call_args, call_kwargs = parse_task_arguments(args.arguments)
    if task.serializer == SERIALIZER_JSON:  # read as the annotations say, as the worker will
        try:
            call_args, call_kwargs = read_arguments(task.fn, call_args, call_kwargs)
        except (TypeError, ParameterError) as exc:
            raise CommandError(f"cannot submit {task.name}: {exc}") from None
    wait = args.wait or args.timeout is not None
    with api_errors(api_urls):
        async with connect(api_urls, api_key) as client:
            try:
                future = await task.apply_async(call_args, call_kwargs)
            except TypeError as exc:  # the arguments do not fit the signature
                raise CommandError(f"cannot submit {task.name}: {exc}") from None
            if not wait:
                print(future.task_run_id, flush=True)
                return
            print(f"submitted run {future.task_run_id} of {task.key}", file=sys.stderr, flush=True)
            run = await wait_showing_states(client, future, task.key, args.timeout)
    if run is None or not run.state.is_terminal:
        state = "unknown" if run is None else run.state.type.value
        waited = "yet" if args.timeout is None else f"after {args.timeout:g} s"
        raise CommandError(f"run {future.task_run_id} has not ended {waited} (it is {state})")
    if run.state.type is not StateType.COMPLETED:
        why = f": {run.state.message}" if run.state.message else ""
        raise CommandError(f"run {run.id} ended {run.state.type.value}{why}")
    try:
        value = run.state.data if run.serializer == SERIALIZER_JSON else result_of(run, task)
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
    value = positive_int(text)
    if value > MAX_RUNS_LISTED:
        raise argparse.ArgumentTypeError(f"at most {MAX_RUNS_LISTED}, got {value}")
    return value


#: The most runs the server lists in one answer.
MAX_RUNS_LISTED: Final = 1000


async def _run_runs(args: argparse.Namespace) -> None:
    from rich.table import Table

    from trioworker.client.rest import TaskRunClient
    from trioworker.models import converter

    api_urls, api_key = api_of(args)
    with api_errors(api_urls):
        async with TaskRunClient(api_urls, api_key) as client:
            runs = await client.read_task_runs(
                task_key=args.task,
                state=args.state,
                limit=args.limit,
                offset=args.offset,
                newest_first=True,
                tags=args.tag,
            )
    if args.json:
        print_json(converter.unstructure(runs))
        return
    console = stdout_console()
    if not runs:
        filtered = args.task or args.state or args.tag
        console.print("No runs" + (" match." if filtered else ".") + _page_hint(args, 0))
        return
    table = Table(title="Task runs (newest first; times are local)", title_justify="left")
    table.add_column("id", no_wrap=True)
    table.add_column("task key", overflow="fold")
    table.add_column("name", overflow="fold")
    table.add_column("state")
    table.add_column("created", no_wrap=True)
    table.add_column("updated", no_wrap=True)
    for run in runs:
        table.add_row(
            short_id(run.id),
            plain(run.task_key),
            plain(run.name),
            _state_text(run.state.type, run.state.name),
            local_time(run.created),
            local_time(run.updated),
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


def _run_fields(run: TaskRun) -> Table:
    from rich.table import Table

    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold", no_wrap=True)
    fields.add_column()
    state = _state_text(run.state.type, run.state.name)
    state.append(f" since {local_time(run.state.timestamp)}")
    rows: list[tuple[str, str | Text]] = [
        ("id", str(run.id)),
        ("task key", plain(run.task_key)),
        ("name", plain(run.name)),
        ("state", state),
        ("created", local_time(run.created)),
        ("updated", local_time(run.updated)),
        ("attempts", str(run.run_count)),
        (
            "parameters",
            plain(str(run.parameters))
            if run.serializer == SERIALIZER_PICKLE
            else plain(_json_text(run.parameters)),
        ),
    ]
    if run.serializer != SERIALIZER_JSON:
        rows.append(("serializer", plain(run.serializer)))
    if run.state.state_details.scheduled_time is not None and run.state.type.value == "SCHEDULED":
        rows.append(("due", local_time(run.state.state_details.scheduled_time)))
    if run.wait_for:
        rows.append(("waits for", ", ".join(str(i) for i in run.wait_for)))
    if run.parent_task_run_id is not None:
        rows.append(("parent", str(run.parent_task_run_id)))
    if run.tags:
        rows.append(("tags", plain(", ".join(run.tags))))
    if run.context:
        rows.append(("context", plain(_json_text(run.context))))
    if run.idempotency_key is not None:
        rows.append(("idempotency key", plain(run.idempotency_key)))
    if run.cache_key is not None:
        lasts = "" if run.cache_expiration is None else f" (kept {run.cache_expiration:g} s)"
        rows.append(
            ("cache key", plain(run.cache_key + lasts + (", refreshed" if run.refresh_cache else "")))
        )
    owner = run.state.state_details.cache_owner
    if owner is not None and run.state.type.value == "SCHEDULED":
        rows.append(("waits for", f"{owner} (computing the same cache key)"))
    for label, value in rows:
        fields.add_row(label, value)
    return fields


#: Descendants ``run ID`` shows at most (the nearest levels first).
MAX_DESCENDANTS_SHOWN: Final = 1000


def _descendants_tree(run: TaskRun, descendants: list[TaskRun]) -> Tree:
    """The runs submitted from inside ``run`` (and from those) as a tree under ``run``."""
    from rich.text import Text
    from rich.tree import Tree

    def label(node: TaskRun) -> Text:
        text = Text.assemble(
            f"{short_id(node.id)}  {plain(node.task_key)}  ", _state_text(node.state.type, node.state.name)
        )
        if node.detached:
            text.append("  detached")
        return text

    tree = Tree(label(run))
    nodes = {run.id: tree}
    for node in descendants:  # in creation order: a parent before its children
        parent = nodes.get(node.parent_task_run_id) if node.parent_task_run_id else None
        if parent is not None:
            nodes[node.id] = parent.add(label(node))
    return tree


async def _run_run(args: argparse.Namespace) -> None:
    from rich.table import Table

    from trioworker.client.rest import TaskRunClient
    from trioworker.models import StateType, converter

    api_urls, api_key = api_of(args)
    with api_errors(api_urls):
        async with TaskRunClient(api_urls, api_key) as client:
            run = await find_run(client, args.id)
            history = await client.history(run.id)
            descendants = await client.descendants(run.id, limit=MAX_DESCENDANTS_SHOWN)
    if args.json:
        fields = converter.unstructure(run)
        assert isinstance(fields, dict)
        print_json(
            {
                **fields,
                "history": converter.unstructure(history),
                "descendants": converter.unstructure(descendants),
            }
        )
        return
    console = stdout_console()
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
            plain(change.message or ""),
        )
    console.print(table)
    console.print()
    state = run.state
    if state.type is StateType.COMPLETED:
        console.print("[bold]Result[/bold]")
        result = state.data if run.serializer == SERIALIZER_JSON else f"(pickled) {state.data}"
        console.print(_json_text(result), markup=False, highlight=False, soft_wrap=True)
    elif state.is_terminal:
        console.print(f"[bold]{state.type.value}[/bold]", highlight=False)
        console.print(visible(state.message or "(no message)"), markup=False, highlight=False, soft_wrap=True)
        data = state.data
        traceback = data.get("traceback") if isinstance(data, dict) else None
        if isinstance(traceback, str):
            console.print()
            console.print("[bold]Traceback[/bold] (on the worker)")
            console.print(visible(traceback.rstrip()), markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(f"Not ended yet: {state.type.value}.", highlight=False)
    if descendants:
        console.print()
        shown = len(descendants)
        first = f" (the first {shown})" if shown >= MAX_DESCENDANTS_SHOWN else ""
        console.print(f"[bold]Runs submitted from it[/bold], at any depth: {shown}{first}", highlight=False)
        console.print(_descendants_tree(run, descendants), highlight=False)


def add_runs_commands(commands: Any) -> None:
    """Add ``submit``, ``runs`` and ``run`` to ``commands`` (the parser's subparsers)."""
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
            "  trioworker submit trioworker.cli.demo_tasks:add 2 3\n"
            "  trioworker submit trioworker.cli.demo_tasks:add '[2, 3]' --wait\n"
            '  trioworker submit trioworker.cli.demo_tasks:add \'{"a": 2, "b": 3}\' --wait --timeout 10\n'
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
        type=seconds,
        default=None,
        metavar="SECONDS",
        help="with --wait (implied): exit with code 1 if the run has not ended by then "
        "(the run itself goes on)",
    )
    add_api_options(submit)
    submit.set_defaults(handler=_run_submit, log_level=logging.WARNING)

    runs = commands.add_parser(
        "runs",
        help="list task runs in a table",
        description=(
            "List task runs, newest first, with their id, task key, name, state and times. The\n"
            f"table shows the first {SHORT_ID_DIGITS} hex digits of each id: the commands that take an id\n"
            "take any start of one that no other run's id shares."
        ),
        epilog=(
            "examples:\n"
            "  trioworker runs\n"
            "  trioworker runs --state FAILED\n"
            "  trioworker runs --task demo.square --limit 100 --offset 100\n"
            "  trioworker runs --tag nightly --tag billing\n"
            "  trioworker runs --state failed --json | jq -r '.[].id'\n"
            "\n"
            "States: SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, CRASHED (any case)."
        ),
        formatter_class=formatter,
    )
    runs.add_argument("--state", type=_state_type, default=None, metavar="S", help="only runs in this state")
    runs.add_argument("--task", default=None, metavar="KEY", help="only runs of this task key")
    runs.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="TAG",
        help="only runs with this tag (repeat it: runs with every tag given)",
    )
    runs.add_argument(
        "--limit",
        type=_page_size,
        default=20,
        metavar="N",
        help=f"list at most N runs (default 20, at most {MAX_RUNS_LISTED})",
    )
    runs.add_argument("--offset", type=count, default=0, metavar="N", help="skip the first N runs")
    runs.add_argument(
        "--json", action="store_true", help="print the runs as a JSON array (whole ids, every field)"
    )
    add_api_options(runs)
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
            "  trioworker run 0b7c7c36\n"
            "  trioworker run $(trioworker submit trioworker.cli.demo_tasks:add 2 3)\n"
            "  trioworker run 0b7c7c36 --json | jq .state.type\n"
            "\n"
            "An unknown id, or the start of an id that several runs share, prints one line on\n"
            "stderr and exits with code 1."
        ),
        formatter_class=formatter,
    )
    run.add_argument("id", metavar="ID", help=ID_HELP)
    run.add_argument(
        "--json",
        action="store_true",
        help='print the run as JSON: its fields as the API gives them, and "history", every state',
    )
    add_api_options(run)
    run.set_defaults(handler=_run_run, log_level=logging.WARNING)
