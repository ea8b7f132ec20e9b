"""The options of ``server`` and ``worker`` from the environment.

Every option has a variable: ``TRIOWORKER_`` and the option's name in upper case, its dashes
underscores (``--max-deliveries`` is ``TRIOWORKER_MAX_DELIVERIES``, ``--no-limit``
``TRIOWORKER_NO_LIMIT``). A flag given on the command line wins over its variable; a variable
wins over the option's default. A variable set to an empty string counts as unset. A flag
without a value (``--allow-pickle``) is set by ``1``, ``true``, ``yes`` or ``on``, and left
alone by ``0``, ``false``, ``no`` or ``off``. A repeatable option (``--module``) takes a
comma-separated list. A value the option would refuse is one line
naming the variable (:class:`~trioworker.cli._common.CommandError`).

``--api-url`` and ``--api-key`` keep their variables (``TRIOWORKER_API_URL``,
``TRIOWORKER_API_KEY``, the same rule), which every client reads too: the commands read them
where they read the client's settings.

The variables are read when a command line is parsed (:func:`read_environment`), never at
import time.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import attrs

from trioworker.cli._common import CommandError

#: What every variable of an option starts with.
PREFIX: Final = "TRIOWORKER_"
#: The parser default (of a command whose options have variables) that lists them.
OPTIONS_DEST: Final = "environment_options"
#: The namespace's record of the options set from a variable: ``{dest: variable}``.
SOURCES_DEST: Final = "from_environment"
#: The options whose variables the commands read themselves (the client's settings).
READ_ELSEWHERE: Final = frozenset({"api_url", "api_key"})
#: The texts that set a flag, and those that leave it alone.
YES: Final = ("1", "true", "yes", "on")
NO: Final = ("0", "false", "no", "off")


def variable_of(option: str) -> str:
    """The variable of an option: ``--max-deliveries`` -> ``TRIOWORKER_MAX_DELIVERIES``."""
    return PREFIX + option.lstrip("-").upper().replace("-", "_")


class _Unset:
    """The default of an option while a command line is parsed: not given there."""

    def __repr__(self) -> str:
        return "<not given>"


UNSET: Final = _Unset()


@attrs.frozen(eq=False)
class EnvOption:
    """One option and its variable."""

    action: argparse.Action
    variable: str
    #: The option's own default (used when neither the command line nor the variable sets it).
    default: object

    @property
    def is_flag(self) -> bool:
        return self.action.nargs == 0

    @property
    def is_repeatable(self) -> bool:
        """Given once or more on the command line (``--module``): its variable is a list."""
        return isinstance(self.action, argparse._AppendAction)

    def given(self, value: object) -> bool:
        """Whether ``value``, the option's after the command line was parsed, came from it."""
        return value is not UNSET and not (self.is_repeatable and value is None)

    def fallback(self) -> object:
        """The option's default, converted as argparse converts a default given as text."""
        if isinstance(self.default, str) and not self.is_flag and callable(self.action.type):
            return self.value(self.default)
        return self.default

    def value(self, text: str) -> object:
        """The option's value for the variable's ``text``; :data:`UNSET` for a flag left
        alone. CommandError (one line naming the variable) for a value the option refuses."""
        if self.is_flag:
            word = text.strip().lower()
            if word in YES:
                return self.action.const
            if word in NO:
                return UNSET
            raise CommandError(
                f"{self.variable}: expected {', '.join(YES)} (or {', '.join(NO)}), got {text!r}"
            )
        convert = self.action.type if callable(self.action.type) else str
        if self.is_repeatable:  # a comma-separated list
            items = [item.strip() for item in text.split(",") if item.strip()]
            return [self._converted(convert, item) for item in items] or UNSET
        return self._converted(convert, text)

    def _converted(self, convert: Callable[[str], object], text: str) -> object:
        """``convert(text)``, checked against the option's choices; CommandError naming the
        variable for a value the option refuses."""
        try:
            value = convert(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            why = str(exc) or "not a value it takes"
            got = "" if text.strip() in why else f", got {text!r}"
            raise CommandError(f"{self.variable}: {why}{got}") from None
        choices = self.action.choices
        if choices is not None and value not in choices:
            raise CommandError(
                f"{self.variable}: expected one of {', '.join(map(str, choices))}, got {text!r}"
            )
        return value


def from_environment(parser: argparse.ArgumentParser) -> None:
    """Give every option of ``parser`` (a command's) its variable: named at the end of its
    help, and read when a command line is parsed (see :func:`read_environment`)."""
    options = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        variable = variable_of(max(action.option_strings, key=len))
        if action.help not in (None, argparse.SUPPRESS):
            action.help = f"{action.help} [env: {variable}]"
        if action.dest not in READ_ELSEWHERE:
            options.append(EnvOption(action, variable, action.default))
    parser.set_defaults(**{OPTIONS_DEST: tuple(options)})


def _options_of(parser: argparse.ArgumentParser) -> Sequence[EnvOption]:
    """The options with variables of every command of ``parser``."""
    found: list[EnvOption] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                found.extend(command.get_default(OPTIONS_DEST) or ())
    return found


def parsing_with_environment(parser: argparse.ArgumentParser) -> None:
    """Make ``parser``'s options with variables default to :data:`UNSET` (only for this
    parse: the parser is built for it), so that :func:`read_environment` tells apart an
    option given on the command line."""
    for option in _options_of(parser):
        # A repeatable option appends to its default: it stays None (not given) instead.
        if option.action.default is not argparse.SUPPRESS and not option.is_repeatable:
            option.action.default = UNSET


def read_environment(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> None:
    """Fill in ``args`` the options of its command that the command line did not give: from
    their variables (in ``environ``, default ``os.environ``), else their defaults. Records
    which came from a variable in ``args.from_environment`` (``{dest: variable}``).

    Raises:
        CommandError: one line naming the variable: a value its option refuses, or two
            variables set for one setting (``TRIOWORKER_LIMIT`` and ``TRIOWORKER_NO_LIMIT``).
    """
    env = os.environ if environ is None else environ
    sources: dict[str, str] = {}
    by_dest: dict[str, list[EnvOption]] = {}
    for option in getattr(args, OPTIONS_DEST, ()):
        by_dest.setdefault(option.action.dest, []).append(option)
    for dest, options in by_dest.items():
        if options[0].given(getattr(args, dest, UNSET)):
            continue  # given on the command line
        values = [
            (o, v) for o in options if env.get(o.variable) and (v := o.value(env[o.variable])) is not UNSET
        ]
        if len(values) > 1:
            named = " and ".join(o.variable for o, _ in values)
            raise CommandError(f"{named} are both set; they set the same thing: unset one of them")
        if values:
            option, value = values[0]
            setattr(args, dest, value)
            sources[dest] = option.variable
        else:
            setattr(
                args, dest, next((o.fallback() for o in options if o.default is not argparse.SUPPRESS), None)
            )
    setattr(args, SOURCES_DEST, sources)
