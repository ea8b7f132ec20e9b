"""Finding tasks by name: ``package.module:name`` or ``path/to/file.py:name``; or every
task of a module (``package.module`` or ``path/to/file.py``).

The ``trioworker worker`` command uses :func:`load_task` for each of its arguments and
:func:`load_module_tasks` for each ``--module``; every way they can fail raises
:class:`EntryPointError` with one sentence that says what is wrong.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from trioworker.tasks import Task

__all__ = ["EntryPointError", "load_module_tasks", "load_task"]


class EntryPointError(ValueError):
    """An entry point that does not name a task: malformed, not importable, missing or not a task."""


def _is_file_spec(target: str) -> bool:
    """A path (ends with ``.py`` or has a directory part), not a dotted module name."""
    return target.endswith(".py") or any(sep in target for sep in ("/", os.sep, os.altsep) if sep)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise EntryPointError(f"cannot import module {name!r}: {_describe(exc)}") from exc


def _load_file(target: str) -> ModuleType:
    """Load ``target`` as a module named after the file, its directory first on ``sys.path``.

    The module is registered in ``sys.modules`` under the file's stem (``tasks.py`` ->
    ``tasks``), so default task keys (``module.qualname``) match those of code that imports
    the file as a module from its directory. Loading the same file again reuses it.
    """
    path = Path(target)
    if not path.exists():
        raise EntryPointError(f"file {target!r} does not exist")
    if not path.is_file():
        raise EntryPointError(f"{target!r} is not a file")
    path = path.resolve()
    name = path.stem
    if not name.isidentifier():
        raise EntryPointError(
            f"cannot load {target!r}: {name!r} is not a valid module name (rename the file)"
        )
    existing = sys.modules.get(name)
    if existing is not None:
        existing_file = getattr(existing, "__file__", None)
        if existing_file is not None and Path(existing_file).resolve() == path:
            return existing
        raise EntryPointError(
            f"cannot load {target!r} as module {name!r}: a different module of that name is "
            "already imported (rename the file)"
        )
    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise EntryPointError(f"cannot load {target!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise EntryPointError(f"cannot import {target!r}: {_describe(exc)}") from exc
    return module


def load_task(spec: str) -> Task[..., Any]:
    """The task that ``spec`` names: ``package.module:name`` or ``path/to/file.py:name``.

    A module is imported with :func:`importlib.import_module` (so it must be on
    ``sys.path``). A file is loaded as a module named after it, with its directory put
    first on ``sys.path`` so that it can import its siblings.

    Raises:
        EntryPointError: ``spec`` is malformed, its module cannot be imported, its file
            does not exist, the name is missing, or it is not a :class:`~trioworker.tasks.Task`.
    """
    target, sep, attribute = spec.partition(":")
    if not sep or ":" in attribute or not target or not attribute:
        raise EntryPointError(f"expected MODULE:TASK or path/to/file.py:TASK, got {spec!r}")
    if _is_file_spec(target):
        module = _load_file(target)
        where = f"file {target!r}"
    else:
        module = _import_module(target)
        where = f"module {target!r}"
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise EntryPointError(f"{where} has no attribute {attribute!r}") from None
    if not isinstance(found, Task):
        raise EntryPointError(f"{spec!r} is not a task: decorate it with @trioworker.task")
    return found


def load_module_tasks(spec: str) -> list[Task[..., Any]]:
    """Every task the module ``spec`` names holds (``package.module``, imported, or
    ``path/to/file.py``, loaded as :func:`load_task` loads files): its module-level
    attributes that are :class:`~trioworker.tasks.Task` objects, imported ones included,
    each once, in the order the module defines them.

    Raises:
        EntryPointError: ``spec`` is empty or names a task (``MODULE:TASK``), its module
            cannot be imported, its file does not exist, or it holds no task.
    """
    if not spec.strip() or ":" in spec:
        raise EntryPointError(f"expected a module, package.module or path/to/file.py, got {spec!r}")
    if _is_file_spec(spec):
        module, where = _load_file(spec), f"file {spec!r}"
    else:
        module, where = _import_module(spec), f"module {spec!r}"
    found: dict[int, Task[..., Any]] = {}
    for value in vars(module).values():
        if isinstance(value, Task):
            found.setdefault(id(value), value)
    if not found:
        raise EntryPointError(f"{where} holds no task: none of its module-level names is a @trioworker.task")
    return list(found.values())
