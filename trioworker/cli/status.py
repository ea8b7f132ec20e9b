"""``trioworker status``: what a worker is doing, read from its status server.

httpx and rich are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar

from trioworker.cli._common import CommandError, local_time, plain, stdout_console

if TYPE_CHECKING:
    from trioworker.models import JSON

T = TypeVar("T")


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

    console = stdout_console()
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold", no_wrap=True)
    fields.add_column()
    fields.add_row("worker", plain(str(status.get("client_id"))))
    fields.add_row(
        "status", Text("stopping", "yellow") if status.get("stopping") else Text("running", "green")
    )
    started = status.get("started_at")
    if isinstance(started, str):
        try:
            fields.add_row("started", local_time(datetime.fromisoformat(started)))
        except ValueError:
            fields.add_row("started", plain(started))
    limit = status.get("limit")
    fields.add_row(
        "runs now",
        f"{status.get('current')} running, "
        + ("no limit" if limit is None else f"{status.get('available')} free of {limit}")
        + (f", up to {status['prefetch']} more sent ahead" if status.get("prefetch") else ""),
    )
    fields.add_row("from", plain(url))
    console.print(fields, highlight=False)
    finished = _of_type(status.get("finished"), dict, {})
    in_flight = _of_type(status.get("in_flight"), dict, {})
    tasks = _of_type(status.get("tasks"), list, [])
    table = Table(title="Tasks", title_justify="left")
    table.add_column("task key")
    table.add_column("finished", justify="right")
    table.add_column("running now", justify="right")
    for key in tasks:
        table.add_row(plain(str(key)), plain(str(finished.get(key, 0))), str(len(in_flight.get(key) or {})))
    console.print()
    console.print(table)


def add_status_command(commands: Any) -> None:
    """Add ``status`` to ``commands`` (the parser's subparsers)."""
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument(
        "url",
        nargs="?",
        default=None,
        metavar="URL",
        help=f"the status server (default {DEFAULT_STATUS_URL}); /status is added when missing",
    )
    status.set_defaults(handler=_run_status, log_level=logging.WARNING)
