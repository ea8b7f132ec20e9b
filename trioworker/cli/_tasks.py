"""Loading the tasks a command names (``MODULE:TASK``): shared by ``worker`` and ``submit``,
so that neither command group imports the other (and ``submit`` never loads the worker)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from trioworker.cli._common import CommandError, log
from trioworker.entrypoints import EntryPointError, load_task
from trioworker.tasks import Task


def load_tasks(specs: Sequence[str]) -> list[Task[..., Any]]:
    """Load every entry point; two different tasks with one key are an error."""
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
