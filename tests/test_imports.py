"""The shape of the package: its modules import each other without a loop, and each side
(worker, submitter) imports only what it needs, checked in a fresh interpreter.

The graph is read from the source with ``ast``: every ``import`` counts, at module level,
under ``if TYPE_CHECKING:`` and inside functions alike, since a loop hidden by a guard or
a late import is still a loop in the design. An import of a name from a package counts
as an import of its submodule when that name is one (``from trioworker import protocol``),
else of the package. Importing ``a.b.c`` runs ``a/b/__init__.py`` first, so it counts as an
import of the package ``a.b`` too (a loop through a wing's ``__init__`` is a loop). The root
package is the exception: ``trioworker/__init__.py`` is the public surface, which by design
gathers names from the wings, and Python runs it before any of them.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Mapping, Set
from pathlib import Path

import pytest

import trioworker

PACKAGE = Path(trioworker.__file__).parent


def module_files() -> dict[str, Path]:
    """Every module of trioworker by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = [PACKAGE.name, *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported_modules(name: str, path: Path, modules: Set[str]) -> set[str]:
    """The trioworker modules that module ``name`` (at ``path``) imports anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
    found = set()
    for target in targets:
        while target and target not in modules:  # trioworker.x.Y -> trioworker.x
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def with_parent_packages(name: str, targets: Set[str], modules: Set[str]) -> set[str]:
    """``targets`` and every package above each of them (the root and ``name``'s own
    ancestors excepted, which are running already when ``name`` runs)."""
    own = {name.rsplit(".", depth)[0] for depth in range(name.count(".") + 1)}
    found = set(targets)
    for target in targets:
        parts = target.split(".")
        found.update(".".join(parts[:n]) for n in range(2, len(parts)))
    return {m for m in found if m in modules and m not in own and m != PACKAGE.name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {
        name: with_parent_packages(name, imported_modules(name, path, files.keys()), files.keys())
        for name, path in files.items()
    }


def find_cycle(graph: Mapping[str, Set[str]]) -> list[str] | None:
    """One import loop as ``[a, b, ..., a]``, or None when the graph has none."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                cycle = visit(nxt)
                if cycle is not None:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle is not None:
                return cycle
    return None


def test_find_cycle_finds_loops_and_only_loops() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no loop
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"y"}}) == ["y", "z", "y"]


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import pkg.a\n"
        "from pkg import b\n"
        "from . import c\n"
        "from .d import Thing\n"
        "if TYPE_CHECKING:\n    from pkg.e import E\n"
        "def late():\n    from pkg.f import g\n"
    )
    modules = {"pkg", "pkg.m", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e", "pkg.f"}
    assert imported_modules("pkg.m", source, modules) == modules - {"pkg", "pkg.m"}


def test_a_wing_package_counts_as_imported_with_its_modules() -> None:
    modules = {"trioworker", "trioworker.a", "trioworker.a.b", "trioworker.a.b.c", "trioworker.d"}
    found = with_parent_packages("trioworker.d", {"trioworker.a.b.c"}, modules)
    assert found == {"trioworker.a", "trioworker.a.b", "trioworker.a.b.c"}
    # A module's own packages are running already when it runs: no edge to them.
    assert with_parent_packages("trioworker.a.x", {"trioworker.a.b"}, modules) == {"trioworker.a.b"}


def test_trioworker_has_no_import_loop() -> None:
    graph = import_graph()
    assert {"trioworker.worker", "trioworker.worker.status", "trioworker.tasks"} <= graph.keys()
    cycle = find_cycle(graph)
    assert cycle is None, "import loop: " + " -> ".join(cycle or [])


# -- boundaries: what each kind of process imports

#: Modules a process that only submits runs never needs (the worker, the server, the web stack).
NOT_FOR_SUBMITTERS = (
    "trioworker.worker",
    "trioworker.worker.status",
    "trioworker.server",
    "quart",
    "hypercorn",
)

SUBMITTER = """
import uuid
import trioworker
import trioworker.client.channel, trioworker.client, trioworker.client.futures, trioworker.sync

@trioworker.task(key="imports.add")
def add(x: int) -> int:
    return x + 1

trioworker.TaskRunFuture(uuid.uuid4(), add)
trioworker.TaskRunClient("http://127.0.0.1:9")
"""


def modules_after(code: str, tmp_path: Path) -> set[str]:
    """``sys.modules`` of a fresh interpreter after running ``code``."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def among(modules: Set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_a_worker_process_never_imports_the_server(tmp_path: Path) -> None:
    modules = modules_after("import trioworker, trioworker.worker\ntrioworker.TaskWorker", tmp_path)
    assert "trioworker.worker" in modules
    assert among(modules, ("trioworker.server",)) == []
    # Without a status port, not even the status server and its web stack.
    assert among(modules, ("trioworker.worker.status", "quart", "hypercorn")) == []


def test_a_submitting_process_never_imports_the_worker_or_the_web_stack(tmp_path: Path) -> None:
    modules = modules_after(SUBMITTER, tmp_path)
    assert {"trioworker.tasks", "trioworker.client.futures", "trioworker.client"} <= modules
    assert among(modules, NOT_FOR_SUBMITTERS) == []


def test_the_worker_is_still_one_attribute_away(tmp_path: Path) -> None:
    modules = modules_after("from trioworker import TaskWorker, serve", tmp_path)
    assert "trioworker.worker" in modules


#: What the server wing may import besides its own modules: the shared core.
SERVER_MAY_IMPORT = frozenset(
    {
        "trioworker._http",
        "trioworker._util",
        "trioworker._version",
        "trioworker.errors",
        "trioworker.models",
        "trioworker.protocol",
        "trioworker.schedules",
        "trioworker.serializers",
        "trioworker.settings",
    }
)


def test_the_server_imports_only_the_shared_core() -> None:
    """Every module the server's modules reach (not counting parent packages) is the
    server's own or the shared core: never the client or the worker wing."""
    graph = import_graph()
    reached: set[str] = set()
    todo = ["trioworker.server"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph[module]
    assert "trioworker.server.store.sqlite" in reached
    assert among(reached, ("trioworker.client", "trioworker.worker")) == []
    assert sorted(reached - SERVER_MAY_IMPORT - set(among(reached, ("trioworker.server",)))) == []


def test_no_two_classes_share_a_name() -> None:
    """A name means one thing: the server's and the client's sides of a concept have
    different names (``Refusal`` on the server, ``ApiError`` in the client)."""
    where: dict[str, list[str]] = {}
    for name, path in module_files().items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                where.setdefault(node.name, []).append(name)
    assert {cls: mods for cls, mods in where.items() if len(mods) > 1} == {}


#: What the ``trioworker`` command leaves out unless the command needs it: the server and its
#: web stack (only ``server`` and ``demo`` run them) and the demo. (Not rich: httpx imports it
#: for its own command line whenever it is installed.)
NOT_FOR_THE_WORKER_COMMAND = ("trioworker.server", "trioworker.cli.demo_runner", "quart", "hypercorn")

TASKS_FILE = """
import trioworker

@trioworker.task(key="imports.say")
def say() -> None: ...
"""


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--help"], 0),
        # Loads the task, then stops at the URL: the command's path up to connecting.
        (["worker", "jobs:say", "--api-url", "ftp://nowhere"], 1),
        # Loads the task, then finds no server (port 9, discard, is closed on loopback).
        (["submit", "jobs:say", "--api-url", "http://127.0.0.1:9"], 1),
    ],
)
def test_the_command_imports_only_what_it_runs(tmp_path: Path, argv: list[str], code: int) -> None:
    (tmp_path / "jobs.py").write_text(TASKS_FILE)
    script = f"from trioworker.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as exit:\n"
    script += f"    assert exit.code == {code}, exit.code\n"
    modules = modules_after(script, tmp_path)
    assert {"trioworker.cli.worker", "trioworker.cli.demo"} <= modules  # every group is there
    assert ("jobs" in modules) == (argv[0] != "--help")
    assert among(modules, NOT_FOR_THE_WORKER_COMMAND) == []
    if argv[0] != "worker":  # help takes its defaults from settings; submit only submits
        assert among(modules, ("trioworker.worker",)) == []


def test_the_architecture_page_names_every_module() -> None:
    """docs/architecture.md lists every module by its path: one it does not name is a room
    missing from the plan (a new module gets its row there), one it names that is gone is
    a room that no longer exists."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", page, flags=re.MULTILINE))
    present = {path.relative_to(PACKAGE).as_posix() for path in module_files().values()}
    assert sorted(present - listed) == []
    assert sorted(listed - present) == []
