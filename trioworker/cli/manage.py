"""The commands that change runs: ``cancel``, ``retry`` and ``delete`` one run (named by
its id or the start of it), and ``purge`` the runs that ended long ago.

The client is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from trioworker.cli._api import ID_HELP, api_errors, find_run
from trioworker.cli._common import CommandError, add_api_options, api_of, duration, visible

if TYPE_CHECKING:
    from trioworker.client.rest import TaskRunClient
    from trioworker.models import StateType, TaskRun

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
    from trioworker.models import StateType

    if run.state.type is StateType.CANCELLED:  # the server answers it as done: it was, before
        raise CommandError(
            f"cannot cancel run {run.id} ({visible(run.task_key)}): the run is already CANCELLED; "
            "it cannot become CANCELLED"
        )
    result = await client.cancel(run.id)
    descendants = len(result.cancelled_descendants)
    with_them = f" and {descendants} of its descendants" if descendants else ""
    print(
        f"cancelled run {run.id} ({visible(run.task_key)}; it was {run.state.type.value}){with_them}",
        flush=True,
    )


async def _retry(client: TaskRunClient, run: TaskRun) -> None:
    new = await client.retry(run.id)
    print(new.id, flush=True)


async def _delete(client: TaskRunClient, run: TaskRun) -> None:
    await client.delete(run.id)
    print(f"deleted run {run.id} ({visible(run.task_key)}; it was {run.state.type.value})", flush=True)


async def _run_cancel(args: argparse.Namespace) -> None:
    await _on_one_run(args, _cancel)


async def _run_retry(args: argparse.Namespace) -> None:
    await _on_one_run(args, _retry)


async def _run_delete(args: argparse.Namespace) -> None:
    await _on_one_run(args, _delete)


def _ended_state(text: str) -> StateType:
    """An argparse type: a state runs end in (any case)."""
    from trioworker.models import TERMINAL_STATES, StateType

    ends = ", ".join(s.value for s in StateType if s in TERMINAL_STATES)
    try:
        state = StateType(text.upper())
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown state {text!r} (runs end in {ends})") from None
    if state not in TERMINAL_STATES:
        raise argparse.ArgumentTypeError(f"runs do not end in {state.value}: they end in {ends}")
    return state


def _duration_text(seconds: float) -> str:
    """``7d`` for 604800 seconds: in the largest unit that divides it."""
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _purged(args: argparse.Namespace) -> str:
    """Which runs a purge deletes: `` of app.say that ended FAILED more than 7d ago``."""
    which = f" of {args.task_key}" if args.task_key else ""
    state = f" {args.state.value}" if args.state else ""
    older = f" more than {_duration_text(args.older_than)} ago" if args.older_than else ""
    return f"{which} that ended{state}{older}"


def confirm_purge(args: argparse.Namespace) -> None:
    """Before the event loop starts: unless ``--yes``, ask on stderr and read the answer from
    stdin (a terminal, or a pipe: ``echo y | trioworker purge ...``).

    Raises:
        CommandError: not confirmed (any answer but y or yes; no answer at all).
    """
    if args.yes:
        return
    print(
        f"Delete every run{_purged(args)}, with its result and history? It cannot be undone. [y/N] ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    answer = sys.stdin.readline()
    if not sys.stdin.isatty():  # a piped answer is not echoed: end the question's line
        print(answer.strip(), file=sys.stderr, flush=True)
    if answer.strip().lower() not in ("y", "yes"):
        raise CommandError("nothing was deleted: not confirmed (--yes purges without asking)")


async def _run_purge(args: argparse.Namespace) -> None:
    from trioworker.client.rest import TaskRunClient

    api_urls, api_key = api_of(args)
    with api_errors(api_urls):
        async with TaskRunClient(api_urls, api_key) as client:
            deleted = await client.purge(args.older_than, task_key=args.task_key, state=args.state)
    print(f"deleted {deleted} run{'' if deleted == 1 else 's'}{_purged(args)}", flush=True)


def add_manage_commands(commands: Any) -> None:
    """Add ``cancel``, ``retry``, ``delete`` and ``purge`` to ``commands`` (the parser's
    subparsers)."""
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

    purge = commands.add_parser(
        "purge",
        help="delete the runs that ended long ago",
        description=(
            "Delete, with their results and history, the runs that ended more than --older-than\n"
            "ago (0: every run that ended), of one task key and in one end state when given. Runs\n"
            "that have not ended are never touched. It asks first (on stderr, the answer read from\n"
            "stdin) unless --yes is given, then prints how many runs it deleted. The server deletes\n"
            "ended runs after its --retention by itself; this is for sooner."
        ),
        epilog=(
            "examples:\n"
            "  trioworker purge --older-than 7d\n"
            "  trioworker purge --older-than 12h --state FAILED --task-key app.fetch --yes\n"
            "  trioworker purge --older-than 0 --yes        # every run that ended\n"
            "\n"
            "DURATION is seconds, or a number with a unit: 90, 90s, 15m, 12h, 7d, 2w."
        ),
        formatter_class=formatter,
    )
    purge.add_argument(
        "--older-than",
        type=duration,
        required=True,
        metavar="DURATION",
        help="delete the runs that ended more than this long ago: seconds, or a number with a unit "
        "(s, m, h, d, w), e.g. 7d; 0: every run that ended",
    )
    purge.add_argument("--task-key", default=None, metavar="KEY", help="only runs of this task key")
    purge.add_argument(
        "--state",
        type=_ended_state,
        default=None,
        metavar="S",
        help="only runs that ended in this state: COMPLETED, FAILED, CANCELLED or CRASHED (any case)",
    )
    purge.add_argument("--yes", action="store_true", help="do not ask first")
    add_api_options(purge)
    purge.set_defaults(handler=_run_purge, prepare=confirm_purge, log_level=logging.WARNING)
