from __future__ import annotations

from collections.abc import AsyncIterator

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
