"""Developer sessions: ``nox -s lint typecheck tests`` before every push; ``nox -s bench`` for speed."""

from __future__ import annotations

import shutil
import sys

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
    session.run("ruff", "check", "trioworker", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "trioworker", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    session.install("-e", ".")
    session.run("python", "benchmarks/bench_server.py", *session.posargs)


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


def _run_peer(session: nox.Session, name: str) -> None:
    """Runs one peer script under ``timeout``; its failure is recorded in its JSON, not raised."""
    limit = PEER_TIME_LIMIT[name]
    if "--quick" in session.posargs:
        limit = max(120, limit // 3)
    output = f"benchmarks/results/peers-{name}.json"
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
    session.install("-e", ".")
    _run_peer(session, "trioworker")


@nox.session(default=False)
def bench_peers_prefect(session: nox.Session) -> None:
    session.install("prefect>=3,<4")
    _run_peer(session, "prefect")


@nox.session(default=False)
def bench_peers_saq(session: nox.Session) -> None:
    session.install("saq[redis]", "hiredis")
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
    session.run(sys.executable, f"{PEERS}/compare.py", external=True)
