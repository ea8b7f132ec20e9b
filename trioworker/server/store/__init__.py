"""Durable storage of task runs: one module per store, behind one protocol.

- :mod:`~trioworker.server.store.base`: the :class:`Store` protocol the service calls, the
  records it answers with, its errors;
- :mod:`~trioworker.server.store.runs`: what a change does to a run, the same in every store;
- :mod:`~trioworker.server.store.commit`: group commit, and the async interface over a
  store's synchronous operations;
- :mod:`~trioworker.server.store.sqlite`: :class:`SQLiteStore`, the embedded store (its SQL,
  schema and migrations);
- :mod:`~trioworker.server.store.files`: its database file (what ``--db`` may name, the lock);
- :mod:`~trioworker.server.store.postgres`: :class:`~.postgres.PostgresStore`, the store in a
  PostgreSQL database (its SQL, schema and migrations, reconnection). It is imported only
  when a ``postgresql://`` URL is opened (psycopg takes a while to import).

:func:`open_store` picks the store a database names: a new store is added there.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Final

from trioworker.server.store.base import Change as Change
from trioworker.server.store.base import ConnectedWorker as ConnectedWorker
from trioworker.server.store.base import EndedCount as EndedCount
from trioworker.server.store.base import LiveServer as LiveServer
from trioworker.server.store.base import QueuedOp as QueuedOp
from trioworker.server.store.base import QueuedRun as QueuedRun
from trioworker.server.store.base import Requeued as Requeued
from trioworker.server.store.base import RunCount as RunCount
from trioworker.server.store.base import RunIdTaken as RunIdTaken
from trioworker.server.store.base import SharedStore as SharedStore
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
    "ConnectedWorker",
    "DatabaseInUse",
    "EndedCount",
    "LiveServer",
    "QueuedOp",
    "QueuedRun",
    "Requeued",
    "RunCount",
    "RunIdTaken",
    "SQLiteStore",
    "SharedStore",
    "Store",
    "StoreError",
    "check_database",
    "claimed_copy",
    "database_path",
    "is_postgres",
    "open_store",
]


#: The URL schemes of PostgreSQL databases.
POSTGRES_SCHEMES: Final = ("postgresql://", "postgres://")


def is_postgres(db: str | Path) -> bool:
    """``db`` is a PostgreSQL URL (``postgresql://...`` or ``postgres://...``)."""
    return isinstance(db, str) and db[:13].lower().startswith(POSTGRES_SCHEMES)


def check_database(db: str | Path) -> str:
    """The database ``db`` names, as :func:`open_store` takes it: a PostgreSQL URL as
    given (once libpq can read it), else the SQLite file of :func:`database_path`.

    Raises:
        ValueError: ``db`` names no database a store here can open (the message never
            holds a password).
    """
    if is_postgres(db):
        from trioworker.server.store.postgres import PostgresTarget

        return PostgresTarget.parse(str(db)).url
    return database_path(db)


def open_store(db: str | Path) -> AbstractAsyncContextManager[Store]:
    """Open the store that ``db`` names for the life of an ``async with`` block.

    A ``postgresql://`` (or ``postgres://``) URL opens :meth:`PostgresStore.open
    <trioworker.server.store.postgres.PostgresStore.open>`, shared (several servers may use
    one database: it is a :class:`SharedStore`); anything else is a SQLite database
    (anything :func:`database_path` takes) and opens :meth:`SQLiteStore.open` (one server
    per file).

    Raises:
        ValueError: ``db`` names no database a store here can open.
        StoreError: the database cannot be used (:class:`DatabaseInUse`: another server has
            the SQLite file; PostgreSQL cannot be reached, refuses the login or has no such
            database; the schema is newer than this code knows).
    """
    if is_postgres(db):
        from trioworker.server.store.postgres import PostgresStore

        return PostgresStore.open(str(db), exclusive=False)
    return SQLiteStore.open(db)
