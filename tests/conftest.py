from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from trioworker.server import RunningServer

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
