"""Every kind of store the tests know, and how a test opens one: the ``store`` and
``open_store`` fixtures (``conftest.py``) run a test once per entry of :data:`STORES`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from trioworker.server.store import SQLiteStore, Store

#: Opens one database in one kind of store, as often as asked (each open sees what the
#: last one saved).
OpenStore = Callable[[], AbstractAsyncContextManager[Store]]


def _sqlite(tmp_path: Path) -> OpenStore:
    path = tmp_path / "db.sqlite"
    return lambda: SQLiteStore.open(path)


#: Every kind of store by name, each given the test's own directory.
STORES: dict[str, Callable[[Path], OpenStore]] = {"sqlite": _sqlite}
