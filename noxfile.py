"""Developer sessions: ``nox -s lint typecheck tests`` before every push; ``nox -s bench`` for speed."""

from __future__ import annotations

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
