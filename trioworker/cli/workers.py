"""``trioworker workers``: the workers connected to a server (``GET /api/task_workers``), as a
table or as JSON.

The client and rich are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import logging
from datetime import datetime
from typing import Any

from trioworker.cli._api import api_errors
from trioworker.cli._common import add_api_options, api_of, local_time, print_json, stdout_console


def _local(text: object) -> str:
    """An ISO 8601 time of the API in local time, as the other tables show times."""
    try:
        return local_time(datetime.fromisoformat(str(text)))
    except ValueError:
        return str(text)


async def _run_workers(args: argparse.Namespace) -> None:
    from rich.table import Table

    from trioworker.client.rest import TaskRunClient

    api_urls, api_key = api_of(args)
    with api_errors(api_urls):
        async with TaskRunClient(api_urls, api_key) as client:
            workers = await client.task_workers(args.task_key)
            server = client.api_url
    if args.json:
        print_json(workers)
        return
    console = stdout_console()
    if not workers:
        to = f" to {args.task_key}" if args.task_key else ""
        console.print(f"No worker is connected{to} at {server}.", highlight=False)
        return
    servers = list(dict.fromkeys(str(worker.get("server")) for worker in workers))
    several = len(servers) > 1
    where = f"{server} and the servers sharing its database" if several else server
    table = Table(title=f"Workers connected to {where} (times are local)", title_justify="left")
    table.add_column("client id", overflow="fold")
    table.add_column("task keys", overflow="fold")
    table.add_column("limit", justify="right")
    table.add_column("prefetch", justify="right")
    table.add_column("in flight", justify="right")
    table.add_column("connected since", no_wrap=True)
    if several:
        table.add_column("server", no_wrap=True)
    for worker in workers:
        keys = worker.get("task_keys")
        cells = [
            str(worker.get("client_id")),
            ", ".join(map(str, keys)) if isinstance(keys, list) else str(keys),
            str(worker.get("limit")),
            str(worker.get("prefetch")),
            str(worker.get("runs_in_flight")),
            _local(worker.get("connected_since")),
        ]
        if several:
            cells.append(str(worker.get("server"))[:8])
        table.add_row(*cells)
    console.print(table)
    count = f"{len(workers)} worker{'s' if len(workers) != 1 else ''}"
    console.print(f"{count} on {len(servers)} servers" if several else count, highlight=False)


def add_workers_command(commands: Any) -> None:
    """Add ``workers`` to ``commands`` (the parser's subparsers)."""
    workers = commands.add_parser(
        "workers",
        help="list the workers connected to the server",
        description=(
            "List the workers subscribed to the server, longest connected first: their client id\n"
            "(host-pid), the task keys they take, their limit and prefetch, the runs they hold now\n"
            "and since when they are connected. With several servers on one PostgreSQL database,\n"
            "the workers of every one of them, with the first 8 hex digits of the server's id;\n"
            "what others' workers hold is as of their server's last heartbeat."
        ),
        epilog=(
            "examples:\n"
            "  trioworker workers\n"
            "  trioworker workers --task-key say\n"
            "  trioworker workers --json | jq -r '.[].client_id'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    workers.add_argument(
        "--task-key", default=None, metavar="KEY", help="only the workers that take runs of this task key"
    )
    workers.add_argument(
        "--json", action="store_true", help="print the workers as a JSON array, as the API gives them"
    )
    add_api_options(workers)
    workers.set_defaults(handler=_run_workers, log_level=logging.WARNING)
