"""The commands that change runs: ``cancel``, ``retry`` and ``delete`` one run (named by
its id or the start of it).

The client is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from trioworker.cli._api import ID_HELP, api_errors, find_run
from trioworker.cli._common import CommandError, add_api_options, api_of

if TYPE_CHECKING:
    from trioworker.client.rest import TaskRunClient
    from trioworker.models import TaskRun

#: What a command does to the run it found: prints the outcome (raises CommandError).
Action = Callable[["TaskRunClient", "TaskRun"], Awaitable[None]]


async def _on_one_run(args: argparse.Namespace, action: Action) -> None:
    """Find the run ``args.id`` names and do ``action`` to it; a refusal is one line."""
    from trioworker.client.rest import TaskRunClient
    from trioworker.errors import ApiError

    api_urls, api_key = api_of(args)
    with api_errors(api_urls):
        async with TaskRunClient(api_urls, api_key) as client:
            run = await find_run(client, args.id)
            try:
                await action(client, run)
            except ApiError as exc:
                if exc.status_code != 409:
                    raise
                why = exc.detail.removeprefix(f"cannot {args.command}: ")
                raise CommandError(f"cannot {args.command} run {run.id} ({run.task_key}): {why}") from None


async def _cancel(client: TaskRunClient, run: TaskRun) -> None:
    await client.cancel(run.id)
    print(f"cancelled run {run.id} ({run.task_key}; it was {run.state.type.value})", flush=True)


async def _retry(client: TaskRunClient, run: TaskRun) -> None:
    new = await client.retry(run.id)
    print(new.id, flush=True)


async def _delete(client: TaskRunClient, run: TaskRun) -> None:
    await client.delete(run.id)
    print(f"deleted run {run.id} ({run.task_key}; it was {run.state.type.value})", flush=True)


async def _run_cancel(args: argparse.Namespace) -> None:
    await _on_one_run(args, _cancel)


async def _run_retry(args: argparse.Namespace) -> None:
    await _on_one_run(args, _retry)


async def _run_delete(args: argparse.Namespace) -> None:
    await _on_one_run(args, _delete)


def add_manage_commands(commands: Any) -> None:
    """Add ``cancel``, ``retry`` and ``delete`` to ``commands`` (the parser's subparsers)."""
    formatter = argparse.RawDescriptionHelpFormatter
    for name, handler, summary, description, example in [
        (
            "cancel",
            _run_cancel,
            "cancel a run that has not ended",
            "Cancel a run that has not ended: a scheduled run is never delivered, a running one\n"
            "is stopped on its worker (a sync task's thread runs to its end; its result is\n"
            "discarded). Prints what it cancelled. A run that already ended cannot be cancelled:\n"
            "one line on stderr, exit code 1.",
            "trioworker cancel 0b7c7c36",
        ),
        (
            "retry",
            _run_retry,
            "run an ended run again, as a new run",
            "Create a new run with the same task, arguments, tags, context and parent as a run\n"
            "that ended (completed, failed, cancelled or crashed), and print the new run's id.\n"
            "A run that has not ended cannot be retried (cancel it first): one line on stderr,\n"
            "exit code 1.",
            "NEW=$(trioworker retry 0b7c7c36) && trioworker run $NEW",
        ),
        (
            "delete",
            _run_delete,
            "delete a run and its history",
            "Delete a run and its state history (a run still running is stopped on its worker).\n"
            "Prints what it deleted.",
            "trioworker delete 0b7c7c36",
        ),
    ]:
        command = commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=(
                "examples:\n"
                f"  {example}\n"
                f"  trioworker {name} 0b7c7c36-8d3a-4a4e-9f6e-2f1d2c9b6a10 --api-url http://queue.internal:4300\n"
                "\n"
                "An unknown id, or the start of an id that several runs share, prints one line on\n"
                "stderr and exits with code 1."
            ),
            formatter_class=formatter,
        )
        command.add_argument("id", metavar="ID", help=ID_HELP)
        add_api_options(command)
        command.set_defaults(handler=handler, log_level=logging.WARNING)
