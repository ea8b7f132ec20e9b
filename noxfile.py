"""Developer sessions: ``nox -s lint typecheck tests`` before every push; ``nox -s bench`` for speed."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "trioworker", "tests", "benchmarks", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "trioworker", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy", "types-jsonschema", "types-croniter")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """The speed tables: bench_server.py, bench_worker.py and (when present) bench_submit.py."""
    session.install("-e", ".")
    for script in ("bench_server.py", "bench_worker.py", "bench_submit.py"):
        if Path("benchmarks", script).exists():
            # Exit 1 means a target was missed (its table says which): run the others too.
            session.run("python", f"benchmarks/{script}", *session.posargs, success_codes=[0, 1])


# --------------------------------------------------------------------------- peers (issue 5)
#
# ``nox -s bench_peers [-- --quick]`` runs the same workloads on trioworker, Prefect 3 and SAQ,
# each in its own virtualenv made by its own session below, then prints one side-by-side table
# (benchmarks/peers/compare.py; JSON in benchmarks/results/peers.json). See
# benchmarks/peers/README.md for the settings each system gets. SAQ needs ``redis-server``: the
# saq session installs Debian's package with ``apt-get install -y redis-server`` when it is not
# on PATH, which needs root (as on the project's machines). Every script stops what it started.

PEERS = "benchmarks/peers"
PEER_TIME_LIMIT = {"trioworker": 420, "prefect": 600, "saq": 420}  # seconds per script (full run)


def _peer_output(name: str) -> str:
    """Where ``run_<name>.py`` writes; removed first, so compare.py never shows a stale result."""
    output = Path("benchmarks", "results", f"peers-{name}.json")
    output.unlink(missing_ok=True)
    return str(output)


def _run_peer(session: nox.Session, name: str) -> None:
    """Runs one peer script under ``timeout``; its failure is recorded in its JSON, not raised."""
    limit = PEER_TIME_LIMIT[name]
    if "--quick" in session.posargs:
        limit = max(120, limit // 3)
    output = _peer_output(name)
    session.run(
        "timeout",
        "--signal=TERM",
        "--kill-after=30",
        str(limit),
        "python",
        f"{PEERS}/run_{name}.py",
        "--output",
        output,
        "--time-limit",
        str(limit - 20),
        *session.posargs,
        external=True,
        success_codes=range(256),
    )


@nox.session(default=False)
def bench_peers_trioworker(session: nox.Session) -> None:
    """The peer workloads on trioworker (part of bench_peers)."""
    _peer_output("trioworker")
    session.install("-e", ".")
    _run_peer(session, "trioworker")


@nox.session(default=False)
def bench_peers_prefect(session: nox.Session) -> None:
    """The peer workloads on Prefect 3 task workers, with a local `prefect server` (part of bench_peers)."""
    _peer_output("prefect")
    session.install("prefect>=3,<4")
    _run_peer(session, "prefect")


@nox.session(default=False)
def bench_peers_saq(session: nox.Session) -> None:
    """The peer workloads on SAQ with a loopback redis-server (part of bench_peers; apt needs root)."""
    _peer_output("saq")
    # saq 0.26 imports typing_extensions without declaring it as a dependency
    session.install("saq[redis]", "hiredis", "typing_extensions")
    if shutil.which("redis-server") is None:
        session.run_install("apt-get", "update", external=True)
        session.run_install("apt-get", "install", "-y", "redis-server", external=True)
    _run_peer(session, "saq")


@nox.session(
    python=False,
    default=False,
    requires=["bench_peers_trioworker", "bench_peers_prefect", "bench_peers_saq"],
)
def bench_peers(session: nox.Session) -> None:
    """trioworker vs Prefect 3 vs SAQ on the same workloads: one table (`-- --quick` for a smoke run)."""
    session.run(sys.executable, f"{PEERS}/compare.py", external=True)
