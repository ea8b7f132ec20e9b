"""Every kind of store the tests know, and the database a test gets in each: the ``store``
and ``open_store`` fixtures (``conftest.py``) run a test once per entry of :data:`STORES`;
so do the server fixtures in a module marked ``every_store``."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from trioworker.server.store import Store

#: Opens one database in one kind of store, as often as asked (each open sees what the
#: last one saved).
OpenStore = Callable[[], AbstractAsyncContextManager[Store]]


def _sqlite(request: pytest.FixtureRequest) -> str | Path:
    tmp_path: Path = request.getfixturevalue("tmp_path")
    return tmp_path / "trioworker.db"


def _postgres(request: pytest.FixtureRequest) -> str | Path:
    url: str = request.getfixturevalue("postgres_url")  # a schema of the test's own
    return url


#: Every kind of store by name: the test's own database in it (what ``--db`` takes).
STORES: dict[str, Callable[[pytest.FixtureRequest], str | Path]] = {"sqlite": _sqlite, "postgres": _postgres}
