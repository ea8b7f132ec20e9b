from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from trioworker.server import RunningServer
from trioworker.server.store import Store
from trioworker.server.store import open_store as open_any_store

from .helpers import LogEvents
from .postgres import Unavailable, fresh_schema, session_database, unavailable
from .stores import STORES, OpenStore

#: Where the browser tests list the screenshots they saved (printed at the end of the run).
SCREENSHOTS = pytest.StashKey[list[str]]()

# pyproject's addopts turn off the plugin's entry point (`-p no:trioworker`): loaded here,
# after pytest-cov started coverage, trioworker's own import is measured.
pytest_plugins = ["trioworker.testing"]


@pytest.fixture
async def api(trioworker_server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the in-process server's API."""
    async with httpx.AsyncClient(base_url=trioworker_server.api_url, timeout=10) as client:
        yield client


@pytest.fixture
def logs() -> Iterator[LogEvents]:
    """Every record of the ``trioworker`` loggers (DEBUG and up), to wait for one."""
    handler = LogEvents()
    logger = logging.getLogger("trioworker")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test: bound, never listening
    (held, so that nothing else can take it meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" in metafunc.fixturenames and metafunc.definition.get_closest_marker("every_store"):
        metafunc.parametrize("store_kind", sorted(STORES), indirect=True)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """The kind of store of the test's server: SQLite, unless the test is marked
    ``every_store`` (then it runs once per kind)."""
    kind: str = getattr(request, "param", "sqlite")
    return kind


@pytest.fixture
def trioworker_db(store_kind: str, request: pytest.FixtureRequest) -> str | Path:
    """The plugin's server runs on the test's own database of :func:`store_kind`."""
    return STORES[store_kind](request)


@pytest.fixture(scope="session")
def postgres_session() -> Iterator[str | Unavailable]:
    """A database of the session's own on a PostgreSQL server (``postgres.py``), or why
    there is none."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(session_database())
        except Unavailable as exc:
            yield exc
            return
        yield url


@pytest.fixture
def postgres_url(postgres_session: str | Unavailable) -> Iterator[str]:
    """A URL of a fresh schema of the test's own in the session's PostgreSQL database
    (skipped when there is no PostgreSQL; failed instead when CI requires one)."""
    if isinstance(postgres_session, Unavailable):
        unavailable(str(postgres_session))
    assert isinstance(postgres_session, str)
    with fresh_schema(postgres_session) as url:
        yield url


@pytest.fixture(params=sorted(STORES))
def open_store(request: pytest.FixtureRequest) -> OpenStore:
    """Opens the test's own database in each kind of store: once, or again to see what
    survives a restart."""
    db = STORES[request.param](request)
    return lambda: open_any_store(db)


@pytest.fixture
async def store(open_store: OpenStore) -> AsyncIterator[Store]:
    """The test's own store, open for the whole test (once per kind of store)."""
    async with open_store() as opened:
        yield opened


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    shots = config.stash.get(SCREENSHOTS, [])
    if shots:
        terminalreporter.section("dashboard screenshots")
        for path in shots:
            terminalreporter.write_line(path)
