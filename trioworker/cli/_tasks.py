"""Loading the tasks a command names (``MODULE:TASK``, or every task of a ``--module``):
shared by ``worker`` and ``submit``, so that neither command group imports the other (and
``submit`` never loads the worker)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from trioworker.cli._common import CommandError, log
from trioworker.entrypoints import EntryPointError, load_module_tasks, load_task
from trioworker.tasks import Task

T = TypeVar("T")


def load_tasks(specs: Sequence[str], modules: Sequence[str] = ()) -> list[Task[..., Any]]:
    """Load every entry point (``MODULE:TASK``) and every task of each module in
    ``modules``; CommandError (one line) for one that cannot be loaded, a module that holds
    no task, or two different tasks with one key."""
    # The console script's sys.path starts with its own directory, not the working one:
    # put the working directory first so that `trioworker worker mytasks:say` finds mytasks.
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
    found = [(spec, _load(load_task, spec)) for spec in specs]
    found += [(module, task) for module in modules for task in _load(load_module_tasks, module)]
    loaded: dict[str, tuple[str, Task[..., Any]]] = {}
    for spec, task in found:
        seen = loaded.setdefault(task.key, (spec, task))
        if seen[1] is not task:
            raise CommandError(
                f"{seen[0]!r} and {spec!r} hold different tasks with the same key {task.key!r}: "
                "give one of them another key with @task(key=...)"
            )
    return [task for _, task in loaded.values()]


def _load(load: Callable[[str], T], spec: str) -> T:
    """``load(spec)``; CommandError (one line) when it cannot."""
    try:
        return load(spec)
    except EntryPointError as exc:
        log.debug("loading %s failed", spec, exc_info=exc.__cause__ or exc)
        raise CommandError(str(exc)) from None
