"""``trioworker schedule add | list | remove``: the periodic runs a server fires
(``/api/schedules``; see :mod:`trioworker.schedules`).

``add`` loads the task as ``submit`` does, so that the arguments are bound to its signature
and encoded as a worker reads them. The client and rich are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from trioworker.cli._api import api_errors
from trioworker.cli._common import (
    CommandError,
    add_api_options,
    api_of,
    local_time,
    plain,
    positive_duration,
    print_json,
    stdout_console,
)
from trioworker.cli._tasks import load_tasks
from trioworker.protocol import SERIALIZER_JSON

if TYPE_CHECKING:
    from trioworker.models import Schedule


def _when(schedule: Schedule) -> str:
    """``*/5 * * * * (Europe/Paris)`` or ``every 300 s``."""
    if schedule.cron is not None:
        return schedule.cron if schedule.timezone == "UTC" else f"{schedule.cron} ({schedule.timezone})"
    return f"every {schedule.interval:g} s"


def _describe(schedule: Schedule) -> str:
    """One line: ``schedule NAME of KEY (WHEN): next run at LOCAL TIME``."""
    return (
        f"schedule {schedule.name} of {schedule.task_key} ({_when(schedule)}): next run at "
        f"{local_time(schedule.next_fire_time)} (local time)"
    )


async def _run_add(args: argparse.Namespace) -> None:
    from trioworker.cli.runs import parse_task_arguments
    from trioworker.client.rest import TaskRunClient
    from trioworker.client.schedules import schedule_create
    from trioworker.errors import ParameterError
    from trioworker.schedules import Cron, Interval
    from trioworker.serializers import read_arguments

    api_urls, api_key = api_of(args)
    (task,) = load_tasks([args.task])
    call_args, call_kwargs = parse_task_arguments(args.arguments)
    try:
        if task.serializer == SERIALIZER_JSON:  # read as the annotations say, as the worker will
            call_args, call_kwargs = read_arguments(task.fn, call_args, call_kwargs)
        options: dict[str, Any] = {
            "args": call_args,
            "kwargs": call_kwargs,
            "timezone": args.timezone,
            "catchup": args.catchup,
        }
        spec = Cron(args.cron, **options) if args.cron is not None else Interval(args.every, **options)
        create = schedule_create(task, spec, args.name or task.key)
    except (TypeError, ValueError, ParameterError) as exc:
        raise CommandError(f"cannot schedule {task.name}: {exc}") from None
    with api_errors(api_urls):
        async with TaskRunClient(api_urls, api_key) as client:
            schedule = await client.upsert_schedule(create)
    print(_describe(schedule), flush=True)


async def _run_list(args: argparse.Namespace) -> None:
    from rich.table import Table

    from trioworker.client.rest import TaskRunClient
    from trioworker.models import converter

    api_urls, api_key = api_of(args)
    with api_errors(api_urls):
        async with TaskRunClient(api_urls, api_key) as client:
            schedules = await client.schedules()
            server = client.api_url
    if args.json:
        print_json(converter.unstructure(schedules))
        return
    console = stdout_console()
    if not schedules:
        console.print(f"No schedule at {server}.", highlight=False)
        return
    table = Table(title=f"Schedules at {server} (times are local)", title_justify="left")
    table.add_column("name", overflow="fold")
    table.add_column("task key", overflow="fold")
    table.add_column("when", overflow="fold")
    table.add_column("catch-up")
    table.add_column("next run", no_wrap=True)
    table.add_column("last run", no_wrap=True)
    for schedule in schedules:
        last = schedule.last_fire_time
        table.add_row(
            plain(schedule.name),
            plain(schedule.task_key),
            plain(_when(schedule)),
            schedule.catchup,
            local_time(schedule.next_fire_time),
            "-" if last is None else local_time(last),
        )
    console.print(table)
    console.print(f"{len(schedules)} schedule{'s' if len(schedules) != 1 else ''}", highlight=False)


async def _run_remove(args: argparse.Namespace) -> None:
    from trioworker.client.rest import TaskRunClient

    api_urls, api_key = api_of(args)
    with api_errors(api_urls):
        async with TaskRunClient(api_urls, api_key) as client:
            await client.delete_schedule(args.name)
    print(f"removed schedule {args.name}", flush=True)


def add_schedule_commands(commands: Any) -> None:
    """Add ``schedule`` and its ``add``, ``list`` and ``remove`` to ``commands`` (the
    parser's subparsers)."""
    schedule = commands.add_parser(
        "schedule",
        help="periodic runs: add, list or remove the schedules the server fires",
        description=(
            "Periodic runs: the server creates one run of a task at each tick of a schedule (a\n"
            "cron expression in a time zone, or a fixed interval), whichever servers and workers\n"
            "run. Workers register the schedules their tasks declare (@task(schedule=...));\n"
            "these commands add, list and remove schedules by hand."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = schedule.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = actions.add_parser(
        "add",
        help="add a schedule, or change the one of that name",
        description=(
            "Add a schedule of a task (loaded as `worker` and `submit` load it, so that ARGS are\n"
            "bound to its signature here, as `submit` takes them), or change the schedule of that\n"
            "name (default: the task's key). It prints when it runs next. A bad cron expression\n"
            "or time zone is one line, exit code 1."
        ),
        epilog=(
            "examples:\n"
            "  trioworker schedule add app.py:report --cron '0 9 * * 1-5' --timezone Europe/Paris\n"
            "  trioworker schedule add app.py:say --every 5m hello\n"
            "  trioworker schedule add app.py:say --every 1h --name hourly-hello --catchup once hi"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add.add_argument("task", metavar="MODULE:TASK", help="the task: package.module:name or path/file.py:name")
    add.add_argument(
        "arguments", nargs="*", metavar="ARGS", help="every run's arguments (as `submit` takes them)"
    )
    when = add.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help="a cron expression: five fields, or @hourly, @daily ...")
    when.add_argument(
        "--every",
        type=positive_duration,
        metavar="DURATION",
        help="a fixed interval: seconds, or a number with a unit (90, 15m, 12h, 7d)",
    )
    add.add_argument(
        "--timezone",
        default="UTC",
        metavar="TZ",
        help="the cron expression's IANA time zone (default UTC)",
    )
    add.add_argument("--name", default=None, help="the schedule's name (default: the task's key)")
    add.add_argument(
        "--catchup",
        choices=("skip", "once"),
        default="skip",
        help="ticks missed while no server ran: skip them (the default), or run once for all",
    )
    add_api_options(add)
    add.set_defaults(handler=_run_add, log_level=logging.WARNING, extra_arguments=True)

    listing = actions.add_parser(
        "list",
        help="list the schedules, with their next run",
        description="List the server's schedules by name: their task, when they run, their next and last run",
        epilog="examples:\n  trioworker schedule list\n  trioworker schedule list --json | jq -r '.[].name'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listing.add_argument(
        "--json", action="store_true", help="print them as a JSON array, as the API gives them"
    )
    add_api_options(listing)
    listing.set_defaults(handler=_run_list, log_level=logging.WARNING)

    remove = actions.add_parser(
        "remove",
        help="remove a schedule: no more runs from it",
        description="Remove the schedule NAME: the server creates no more runs from it (runs made are kept).",
        epilog="examples:\n  trioworker schedule remove hourly-hello",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    remove.add_argument("name", metavar="NAME", help="the schedule's name, as `schedule list` shows it")
    add_api_options(remove)
    remove.set_defaults(handler=_run_remove, log_level=logging.WARNING)
