from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from trioworker.server import RunningServer
from trioworker.server.store import Store

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
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test: bound, never listening
    (held, so that nothing else can take it meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture(params=sorted(STORES))
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
    """Opens the test's own database in each kind of store: once, or again to see what
    survives a restart."""
    return STORES[request.param](tmp_path)


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
