"""What an install gives a user: a script that imports trioworker is type-checked against the
installed package (mypy --strict sees its types, after ``pip install -e '.[test]'`` as after
``pip install .``), and the wheel holds the package, its ``py.typed`` and the dashboard's files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from trioworker.server.dashboard import CONTENT_TYPES

ROOT = Path(__file__).resolve().parents[1]

USER_SCRIPT = """\
import trioworker


@trioworker.task(key="user.add")
def add(a: int, b: int) -> int:
    return a + b


async def main() -> None:
    future = await add.delay(1, 2)
    total: int = await future.result(timeout=10)
    reveal_type(add)
    text: str = await future.result()  # the one mistake: the result is an int
    print(total, text)
"""


def clean_env() -> dict[str, str]:
    """This environment, without paths that would find trioworker some other way."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    env["PYTHONSAFEPATH"] = "1"  # not even the current folder
    return env


def run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=200)


def test_mypy_strict_finds_the_installed_packages_types(tmp_path: Path) -> None:
    (tmp_path / "user.py").write_text(USER_SCRIPT)
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--config-file",
        "",
        "--cache-dir",
        ".cache",
        "user.py",
    ]
    done = run(command, cwd=tmp_path)
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.startswith("user.py:")]
    assert len(lines) == 2, output
    # Newer mypy versions write builtins.int as int.
    assert re.fullmatch(
        r'user\.py:12: note: Revealed type is "trioworker\.tasks\.Task\[\[a: (builtins\.)?int, '
        r'b: (builtins\.)?int\], (builtins\.)?int\]"',
        lines[0],
    ), output
    assert lines[1] == (
        'user.py:13: error: Incompatible types in assignment (expression has type "int", '
        'variable has type "str")  [assignment]'
    ), output
    assert done.returncode == 1, output


def test_the_wheel_holds_the_package_its_types_and_the_dashboard(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
        str(ROOT),
    ]
    built = run(command)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = tmp_path.glob("trioworker-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = archive.read(metadata).decode()
    assert "trioworker/py.typed" in names
    assert {f"trioworker/server/dashboard/{name}" for name in CONTENT_TYPES} <= names
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "trioworker").rglob("*.py")}
    assert sources <= names
    assert not [
        n for n in names if n.startswith(("tests/", "benchmarks/", "examples/")) or "__pycache__" in n
    ]
    assert "trioworker = trioworker.cli:main" in scripts and "[pytest11]" in scripts
    assert "Requires-Dist: prometheus-client" in requires
