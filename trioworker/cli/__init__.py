"""The ``trioworker`` command: one module per group of commands.

- :mod:`~trioworker.cli.server`: ``server``
- :mod:`~trioworker.cli.worker`: ``worker`` (and loading tasks by ``MODULE:TASK``)
- :mod:`~trioworker.cli.runs`: ``submit``, ``runs``, ``run`` (talking to a server)
- :mod:`~trioworker.cli.manage`: ``cancel``, ``retry``, ``delete``, ``purge`` (changing runs)
- :mod:`~trioworker.cli.workers`: ``workers`` (the workers connected to a server)
- :mod:`~trioworker.cli.schedules`: ``schedule add``, ``list``, ``remove`` (periodic runs)
- :mod:`~trioworker.cli.status`: ``status`` (talking to a worker's status server)
- :mod:`~trioworker.cli.demo`: ``demo`` (:mod:`~trioworker.cli.demo_runner` runs it, with the
  tasks of :mod:`~trioworker.cli.demo_tasks`)
- :mod:`~trioworker.cli._common`: the user error, logging, value types, the API options
- :mod:`~trioworker.cli._api`: the client's errors as one line, the run an id (or its start) names
- :mod:`~trioworker.cli._environment`: the ``TRIOWORKER_*`` variable of every option of
  ``server`` and ``worker``

Every group imports what its commands run (the server, the worker, the client, rich) only
when one of them runs: ``trioworker worker`` never imports the server, nor ``--help`` rich.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Final

import trio

from trioworker._util import only_exception
from trioworker._version import __version__
from trioworker.cli._common import CommandError, configure_logging, fatal_line, requested_log_format, visible
from trioworker.cli._environment import parsing_with_environment, read_environment
from trioworker.cli.demo import add_demo_command
from trioworker.cli.manage import add_manage_commands
from trioworker.cli.runs import add_runs_commands
from trioworker.cli.schedules import add_schedule_commands
from trioworker.cli.server import add_server_command
from trioworker.cli.status import add_status_command
from trioworker.cli.worker import add_worker_command
from trioworker.cli.workers import add_workers_command


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; a parsed command's ``handler`` is its async main."""
    parser = argparse.ArgumentParser(
        prog="trioworker", description="Background task runs for Trio: server, workers and tools."
    )
    parser.add_argument("--version", action="version", version=f"trioworker {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.set_defaults(log_level=logging.INFO)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_server_command(commands)
    add_worker_command(commands)
    add_demo_command(commands)
    add_runs_commands(commands)
    add_manage_commands(commands)
    add_workers_command(commands)
    add_schedule_commands(commands)
    add_status_command(commands)
    return parser


def _is_option(item: str) -> bool:
    return item.startswith("-") and re.fullmatch(r"-\d+(\.\d*)?([eE][-+]?\d+)?", item) is None


#: Stands for the ``--`` argument: the options end there, whatever follows is positional.
END_OF_OPTIONS: Final = "--"
#: The exit code when stdout was closed by its reader (as for a program SIGPIPE killed).
EXIT_BROKEN_PIPE: Final = 141


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``submit`` takes its options anywhere among its ARGS, and
    ``--`` ends the options wherever it stands. The options of ``server`` and ``worker`` that
    the command line does not give come from their ``TRIOWORKER_*`` variables (see
    :mod:`~trioworker.cli._environment`; CommandError for a bad value).

    (argparse stops filling ``nargs="*"`` at the first option: ``submit t --wait 1 2``
    would leave ``1 2`` unrecognized. They are ARGS that came after an option. And it
    takes ``--`` for the end of options only where a positional may start: ``submit t 1
    --wait -- -x`` would leave ``-- -x`` unrecognized.)
    """
    parser = build_parser()
    parsing_with_environment(parser)
    given = list(sys.argv[1:] if argv is None else argv)
    # After the command's name, each argument after "--" is parsed as a stand-in that
    # cannot look like an option, put back once parsed.
    after: dict[str, str] = {}
    command_at = next((i for i, item in enumerate(given) if not item.startswith("-")), len(given))
    if END_OF_OPTIONS in given[command_at:]:
        end = given.index(END_OF_OPTIONS, command_at)
        after = {f"\0{index}": item for index, item in enumerate(given[end + 1 :])}
        given = [*given[:end], *after]
    args, extras = parser.parse_known_args(given)
    if extras:
        takes_extras = getattr(args, "extra_arguments", args.command == "submit")  # ARGS after options
        if takes_extras and not any(_is_option(item) for item in extras):
            args.arguments = [*args.arguments, *extras]
        else:
            parser.error(f"unrecognized arguments: {' '.join(after.get(item, item) for item in extras)}")
    for name, value in vars(args).items():
        if isinstance(value, str) and value in after:
            setattr(args, name, after[value])
        elif isinstance(value, list):
            setattr(args, name, [after.get(item, item) if isinstance(item, str) else item for item in value])
    read_environment(args)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command (``argv``: without the program name; default ``sys.argv[1:]``).

    Raises:
        SystemExit: 1 after a user error (printed as one line on stderr: a JSON log record
            with ``--log-format json``), 130 after Ctrl-C, 2 for a bad command line
            (argparse's usage error) or a bad ``TRIOWORKER_*`` variable of an option (one
            line naming it), :data:`EXIT_BROKEN_PIPE` when stdout was closed before all was
            written (``trioworker runs | head -1``: nothing more is said).
    """
    args_list = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(args_list)
    except CommandError as exc:
        print(fatal_line(str(exc), requested_log_format(args_list)), file=sys.stderr)
        raise SystemExit(2) from None
    log_format = getattr(args, "log_format", "text")
    configure_logging(args.verbose, args.log_level, log_format)
    try:
        prepare = getattr(args, "prepare", None)
        if prepare is not None:  # what a command does before its event loop (purge asks)
            prepare(args)
        trio.run(args.handler, args)
        sys.stdout.flush()  # here, not at exit: a closed stdout is one more case below
    except BaseException as exc:  # re-raised below unless it is a user error
        leaf = only_exception(exc)
        if isinstance(leaf, BrokenPipeError):
            _drop_stdout()
            raise SystemExit(EXIT_BROKEN_PIPE) from None
        if isinstance(leaf, CommandError | OSError):  # may quote a server's or a task's text
            print(fatal_line(visible(str(leaf)), log_format), file=sys.stderr)
            raise SystemExit(1) from None
        if isinstance(leaf, KeyboardInterrupt):
            raise SystemExit(130) from None
        raise


def _drop_stdout() -> None:
    """Point stdout at ``/dev/null``: what is still buffered for a reader that left (a
    closed pipe) goes nowhere, instead of failing once more as Python exits."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
