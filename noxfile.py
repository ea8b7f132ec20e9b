"""Developer sessions: ``nox -s lint typecheck tests`` before every push; ``nox -s bench`` for speed."""

from __future__ import annotations

import argparse
import os
import re
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


# --------------------------------------------------------------------------- peers (issues 5, 18)
#
# ``nox -s bench_peers [-- --quick]`` runs the same workloads on trioworker (SQLite, then
# PostgreSQL), Prefect 3 and SAQ, each in its own virtualenv made by its own session below, then
# prints the targets of issue 18 and one side-by-side table (benchmarks/peers/compare.py; JSON in
# benchmarks/results/peers.json). ``-- --repeat 3`` runs them 3 times each, interleaved (round k:
# trioworker, trioworker on PostgreSQL, SAQ, Prefect; benchmarks/peers/repeat.py), and compares
# medians; ``-- --without prefect`` (or postgres, saq, trioworker; comma-separated) leaves systems
# out. PostgreSQL: the server at $TRIOWORKER_BENCH_POSTGRES_URL (default below), on which the
# runs make a database per phase. See benchmarks/peers/README.md for the settings each system
# gets. SAQ needs ``redis-server``: the saq session installs Debian's package with ``apt-get
# install -y redis-server`` when it is not on PATH, which needs root (as on the project's
# machines). Every script stops what it started.

PEERS = "benchmarks/peers"
PEER_RESULTS = Path("benchmarks", "results")
PEER_SYSTEMS = ("trioworker", "trioworker-postgres", "saq", "prefect")  # the order of a round
PEER_ALIASES = {"postgres": "trioworker-postgres", "pg": "trioworker-postgres"}
BENCH_POSTGRES_VARIABLE = "TRIOWORKER_BENCH_POSTGRES_URL"
DEFAULT_BENCH_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _peer_plan(session: nox.Session) -> tuple[int, set[str]]:
    """``--repeat N`` (default 1) and the systems of ``--without`` in the posargs."""
    parser = argparse.ArgumentParser(prog="nox -s bench_peers --", add_help=False)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--without", action="append", default=[])
    args, _ = parser.parse_known_args(session.posargs)
    without = {PEER_ALIASES.get(name, name) for value in args.without for name in value.split(",") if name}
    if without - set(PEER_SYSTEMS) or args.repeat < 1:
        session.error(f"--without takes {', '.join(PEER_SYSTEMS)} (or postgres); --repeat at least 1")
    return args.repeat, without


def _peer_begin(session: nox.Session, system: str) -> int:
    """Skips the session if ``--without`` names ``system``; removes its old results; ``--repeat``.

    The results go first, before anything that may fail, so that compare.py never shows a stale one.
    """
    repeat, without = _peer_plan(session)
    if system in without:
        session.skip(f"--without {system}")
    pattern = re.compile(rf"peers-{re.escape(system)}(-\d+)?\.json")
    for path in PEER_RESULTS.glob("peers-*.json"):
        if pattern.fullmatch(path.name):
            path.unlink()
    return repeat


def _peer_python(system: str) -> Path:
    """Where a session records its virtualenv's Python for ``bench_peers -- --repeat N``."""
    return PEER_RESULTS / f"peers-{system}.python"


def _postgres_url() -> str:
    return os.environ.get(BENCH_POSTGRES_VARIABLE) or DEFAULT_BENCH_POSTGRES_URL


def _run_peer(session: nox.Session, system: str, repeat: int) -> None:
    """Runs ``system`` once (benchmarks/peers/repeat.py sets its time limit); its failure is
    recorded in its JSON, not raised. With ``--repeat`` N > 1, only records this virtualenv's
    Python: bench_peers then runs every system N times, interleaved."""
    if repeat > 1:
        PEER_RESULTS.mkdir(parents=True, exist_ok=True)
        _peer_python(system).write_text(f"{Path(session.bin, 'python')}\n")
        session.log(f"--repeat {repeat}: bench_peers runs {system} (interleaved with the others)")
        return
    postgres = ["--postgres-url", _postgres_url()] if system == "trioworker-postgres" else []
    session.run(
        "python", f"{PEERS}/repeat.py", "--systems", system, *postgres, *session.posargs, success_codes=[0, 1]
    )


@nox.session(default=False)
def bench_peers_trioworker(session: nox.Session) -> None:
    """The peer workloads on trioworker with SQLite (part of bench_peers)."""
    repeat = _peer_begin(session, "trioworker")
    session.install("-e", ".")
    _run_peer(session, "trioworker", repeat)


@nox.session(default=False)
def bench_peers_trioworker_postgres(session: nox.Session) -> None:
    """The peer workloads on trioworker with PostgreSQL (see $TRIOWORKER_BENCH_POSTGRES_URL; bench_peers)."""
    repeat = _peer_begin(session, "trioworker-postgres")
    session.install("-e", ".")
    _run_peer(session, "trioworker-postgres", repeat)


@nox.session(default=False)
def bench_peers_prefect(session: nox.Session) -> None:
    """The peer workloads on Prefect 3 task workers, with a local `prefect server` (part of bench_peers)."""
    repeat = _peer_begin(session, "prefect")
    session.install("prefect>=3,<4")
    _run_peer(session, "prefect", repeat)


@nox.session(default=False)
def bench_peers_saq(session: nox.Session) -> None:
    """The peer workloads on SAQ with a loopback redis-server (part of bench_peers; apt needs root)."""
    repeat = _peer_begin(session, "saq")
    # saq 0.26 imports typing_extensions without declaring it as a dependency
    session.install("saq[redis]", "hiredis", "typing_extensions")
    if shutil.which("redis-server") is None:
        session.run_install("apt-get", "update", external=True)
        session.run_install("apt-get", "install", "-y", "redis-server", external=True)
    _run_peer(session, "saq", repeat)


@nox.session(
    python=False,
    default=False,
    requires=[
        "bench_peers_trioworker",
        "bench_peers_trioworker_postgres",
        "bench_peers_saq",
        "bench_peers_prefect",
    ],
)
def bench_peers(session: nox.Session) -> None:
    """trioworker (SQLite, PostgreSQL) vs Prefect 3 vs SAQ on the same workloads: issue 18's targets and
    one table (`-- --quick` for a smoke run, `-- --repeat 3 --without prefect` for medians)."""
    repeat, without = _peer_plan(session)
    if repeat > 1:
        pythons: list[str] = []
        for system in PEER_SYSTEMS:
            if system not in without:
                if not _peer_python(system).exists():
                    session.error(f"{_peer_python(system)} is missing: run without --no-deps")
                pythons += ["--python", f"{system}={_peer_python(system).read_text().strip()}"]
        session.run(
            sys.executable,
            f"{PEERS}/repeat.py",
            *pythons,
            "--postgres-url",
            _postgres_url(),
            *session.posargs,
            external=True,
            success_codes=[0, 1],
        )
    session.run(sys.executable, f"{PEERS}/compare.py", *session.posargs, external=True)
