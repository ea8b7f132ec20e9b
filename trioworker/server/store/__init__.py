"""Durable storage of task runs: one module per store, behind one protocol.

- :mod:`~trioworker.server.store.base`: the :class:`Store` protocol the service calls, the
  records it answers with, its errors;
- :mod:`~trioworker.server.store.runs`: what a change does to a run, the same in every store;
- :mod:`~trioworker.server.store.sqlite`: :class:`SQLiteStore`, the embedded store (its SQL,
  schema and migrations, group commit);
- :mod:`~trioworker.server.store.files`: its database file (what ``--db`` may name, the lock).

:func:`open_store` picks the store a database names: a new store is added there.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path

from trioworker.server.store.base import Change as Change
from trioworker.server.store.base import EndedCount as EndedCount
from trioworker.server.store.base import QueuedOp as QueuedOp
from trioworker.server.store.base import QueuedRun as QueuedRun
from trioworker.server.store.base import Requeued as Requeued
from trioworker.server.store.base import RunCount as RunCount
from trioworker.server.store.base import RunIdTaken as RunIdTaken
from trioworker.server.store.base import Store as Store
from trioworker.server.store.base import StoreError as StoreError
from trioworker.server.store.files import SUPPORTED_DATABASES as SUPPORTED_DATABASES
from trioworker.server.store.files import DatabaseInUse as DatabaseInUse
from trioworker.server.store.files import database_path as database_path
from trioworker.server.store.runs import claimed_copy as claimed_copy
from trioworker.server.store.sqlite import SCHEMA_VERSION as SCHEMA_VERSION
from trioworker.server.store.sqlite import SQLiteStore as SQLiteStore

__all__ = [
    "SCHEMA_VERSION",
    "SUPPORTED_DATABASES",
    "Change",
    "DatabaseInUse",
    "EndedCount",
    "QueuedOp",
    "QueuedRun",
    "Requeued",
    "RunCount",
    "RunIdTaken",
    "SQLiteStore",
    "Store",
    "StoreError",
    "claimed_copy",
    "database_path",
    "open_store",
]


def open_store(db: str | Path) -> AbstractAsyncContextManager[Store]:
    """Open the store that ``db`` names for the life of an ``async with`` block.

    Every database is SQLite's today: ``db`` is anything :func:`database_path` takes, and
    the block is :meth:`SQLiteStore.open`'s.

    Raises:
        ValueError: ``db`` names no database a store here can open.
        StoreError: the database cannot be used (:class:`DatabaseInUse`: another server has it).
    """
    return SQLiteStore.open(db)
