"""What every group of commands shares: the user error, logging, the argparse value types,
the ``--api-url``/``--api-key`` options and the rich console.

Light on purpose: every command imports it, so it imports neither rich (only inside
:func:`console`) nor the client, the worker or the server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from trioworker._util import parse_duration
from trioworker.servers import api_roots
from trioworker.settings import DEFAULT_HOST, DEFAULT_PORT, Settings

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

#: The commands' logger (its name leads every log line: ``trioworker: ...``).
log = logging.getLogger("trioworker")


class CommandError(Exception):
    """A user error: printed as one line, exit code 1."""


#: The ``--log-format`` choices: a timed line for people, or a JSON object per line.
LOG_FORMATS: Final = ("text", "json")

#: What every LogRecord has: the rest of its attributes are the fields given with ``extra``.
_RECORD_ATTRIBUTES: Final = frozenset(
    [*vars(logging.LogRecord("", 0, "", 0, "", None, None)), "message", "asctime", "taskName"]
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (ISO 8601, UTC, milliseconds),
    ``level``, ``logger``, ``message``, then the record's structured fields (what the
    logging call gave as ``extra``: a worker's run line gives ``task_key``, ``run_id``,
    ``outcome``, ``duration_seconds``, ``attempt``, ``error``), and ``exception`` with the
    traceback when there is one. A value JSON cannot hold is written as its ``str()``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES and not name.startswith("_"):
                entry.setdefault(name, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def fatal_line(message: str, log_format: str = "text") -> str:
    """The one line a command prints on stderr as it stops on an error: ``trioworker:
    message``, or (``log_format="json"``) an ``ERROR`` record of the ``trioworker`` logger
    as :class:`JsonFormatter` writes every other line."""
    if log_format != "json":
        return f"trioworker: {message}"
    record = logging.LogRecord("trioworker", logging.ERROR, __file__, 0, message, None, None)
    return JsonFormatter().format(record)


def requested_log_format(argv: Sequence[str]) -> str:
    """The ``--log-format`` that ``argv`` (or ``TRIOWORKER_LOG_FORMAT``) asks for, read
    without the parser: for an error found while parsing."""
    for n, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--log-format" and n + 1 < len(argv):
            return argv[n + 1]
        if arg.startswith("--log-format="):
            return arg.partition("=")[2]
    return os.environ.get("TRIOWORKER_LOG_FORMAT") or "text"


def configure_logging(verbose: bool, level: int = logging.INFO, log_format: str = "text") -> None:
    """Log to stderr at ``level`` (DEBUG with ``verbose``): one timed line per record, or
    (``log_format="json"``) one JSON object per line (:class:`JsonFormatter`)."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
        )
    logging.basicConfig(level=logging.DEBUG if verbose else level, handlers=[handler])


def add_log_format_option(parser: argparse.ArgumentParser) -> None:
    """``--log-format text|json``, for a command that runs until stopped."""
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text: a timed line per message, for people (the default); json: one JSON object per "
        "line with time, level, logger, message and the message's fields, for log collectors",
    )


# -- argparse value types: a bad value is argparse's usage error (exit code 2)


def whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
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


#: An argparse type: a whole number >= 1.
positive_int: Final = whole_number(1)
#: An argparse type: a whole number >= 0.
count: Final = whole_number(0)


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 0 and 65535, got {value}")
    return value


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def duration(text: str) -> float:
    """An argparse type: seconds from ``90``, ``15m``, ``7d`` (see :func:`parse_duration`)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_duration(text: str) -> float:
    """An argparse type: a :func:`duration` above 0."""
    value = duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value


# -- the server a command talks to


class _JoinUrls(argparse.Action):
    """``--api-url`` given more than once: the URLs, comma-separated in the order given."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        earlier = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, f"{earlier},{values}" if earlier else values)


def add_api_options(parser: argparse.ArgumentParser) -> None:
    """``--api-url`` (repeatable; each may list several, comma-separated) and
    ``--api-key``, for a command that talks to a server."""
    parser.add_argument(
        "--api-url",
        default=None,
        metavar="URL",
        action=_JoinUrls,
        help="the server, as `trioworker server` prints it (http://HOST:PORT) or with /api "
        f"(default $TRIOWORKER_API_URL, else http://{DEFAULT_HOST}:{DEFAULT_PORT}/api); "
        "several servers of one deployment: repeat it or separate URLs with commas, in the "
        "order to try them (the next is used when one fails)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="the API key to send to the server (default $TRIOWORKER_API_KEY)",
    )


def api_roots_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The API roots of ``--api-url``, else of ``TRIOWORKER_API_URL``, in order;
    CommandError (one line) if one is unusable, empty or given twice, or if a connection
    setting (``TRIOWORKER_API_CA_BUNDLE``, ``TRIOWORKER_API_INSECURE``,
    ``TRIOWORKER_API_HEADERS``) cannot be used."""
    from trioworker.connection import connection_options

    api_url = args.api_url or Settings.from_env().api_url
    try:
        roots = api_roots(api_url)
    except ValueError as exc:
        source = "--api-url" if args.api_url else "TRIOWORKER_API_URL"
        raise CommandError(f"unusable API URL from {source}: {exc}") from None
    try:
        connection_options(warn=False)  # checked here; the client reads them again, and warns
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return roots


def api_of(args: argparse.Namespace) -> tuple[tuple[str, ...], str | None]:
    """The API roots and key of the command line, else of the environment; checked."""
    return api_roots_of(args), args.api_key or Settings.from_env().api_key


# -- rich output (rich is imported only by the commands that print with it)

#: Columns of rich output that goes to a pipe or a file (COLUMNS overrides it).
PIPED_WIDTH: Final = 200


#: Characters that move the cursor, recolour or reorder the terminal's text: C0 (but tab and
#: newline) and DEL, C1, and Unicode's bidirectional controls (U+202E would show text
#: backwards). :func:`visible` shows them as escapes.
_HIDDEN: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """``text`` with every control character as an escape (``\\x1b``, ``\\u202e``): what
    the CLI prints of data from a server or a worker, so it cannot drive the terminal."""
    return _HIDDEN.sub(lambda m: repr(m.group())[1:-1], text)


def plain(text: str) -> Text:
    """``text`` as rich shows it verbatim: no markup read (``[red]`` stays), and control
    characters :func:`visible`."""
    from rich.text import Text

    return Text(visible(text))


def stdout_console() -> Console:
    """A rich console on stdout; piped output is not wrapped at 80 columns (one row per line)."""
    from rich.console import Console

    width = None
    if not sys.stdout.isatty() and not os.environ.get("COLUMNS"):
        width = PIPED_WIDTH
    return Console(width=width)


def print_json(value: object) -> None:
    """``value`` (unstructured) on stdout as JSON, indented (for jq and for eyes), as the
    API gives it (times in ISO 8601)."""
    import orjson

    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def local_time(when: datetime) -> str:
    """``when`` in the local time zone, to the second: ``2030-01-02 09:00:00``."""
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")
