"""The SQLite store's database file: what a ``--db`` may name, and the lock that keeps one
server per file.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.parse
from pathlib import Path
from typing import Final

from trioworker.server.store.base import StoreError


class DatabaseInUse(StoreError):
    """Another trioworker server has this database: it holds the lock on the SQLite file (by
    any name or link), or the PostgreSQL store's advisory lock on the database's schema."""


#: What a database may be given as (the error for any other URL names them).
SUPPORTED_DATABASES: Final = (
    "a SQLite file path, ':memory:', a sqlite:// URL "
    "(sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite:// for memory), "
    "or a PostgreSQL URL (postgresql://USER@HOST:PORT/DB)"
)

_URL_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+)://")


def database_path(db: str | Path) -> str:
    """The SQLite file (or ``":memory:"``) that ``db`` names.

    ``db`` is a file path (``~`` is expanded), ``":memory:"``, or a ``sqlite://`` URL in
    SQLAlchemy's (and Prefect's) form: ``sqlite:///relative.db`` and
    ``sqlite:////absolute/path.db``; ``sqlite://`` is an in-memory database.

    Raises:
        ValueError: ``db`` is empty, or starts with ``file:`` (SQLite would read a URI), or
            a URL of another scheme (only the scheme is named,
            so that a password in the URL is never printed), or a ``sqlite://`` URL with a
            host, a query or a fragment.
    """
    if isinstance(db, Path):
        path = str(db.expanduser())
        # SQLite reads a name that starts with "file:" as a URI: "./" keeps it a file name.
        return f".{os.sep}{path}" if path[:5].lower() == "file:" else path
    if db[:5].lower() == "file:":
        # SQLite would read it as a URI (file:z.db, file:./z.db?mode=rwc): refused, so one
        # file never has two names that escape its lock, and no stray "file:." folder.
        raise ValueError(f"unsupported database URL scheme 'file'; supported: {SUPPORTED_DATABASES}")
    match = _URL_SCHEME.match(db)
    if match is None:
        if not db.strip():
            raise ValueError(f"the database is empty; give {SUPPORTED_DATABASES}")
        return db if db == ":memory:" else str(Path(db).expanduser())
    scheme = match.group(1)
    if scheme.lower() != "sqlite":
        raise ValueError(f"unsupported database URL scheme {scheme!r}; supported: {SUPPORTED_DATABASES}")
    rest = db[match.end() :]
    if "?" in rest or "#" in rest:
        raise ValueError("a sqlite:// URL takes no query or fragment")
    if rest and not rest.startswith("/"):
        raise ValueError(
            "a sqlite:// URL has no host: write sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    path = urllib.parse.unquote(rest[1:])
    return ":memory:" if path in ("", ":memory:") else database_path(Path(path))


def lock_file(path: str) -> int | None:
    """Lock the database file ``path`` itself (creating it empty if missing, in a folder
    that must exist); returns the descriptor that holds the lock.

    The lock follows the file, not its name: every spelling of the path, a symlink and a
    hard link all reach one inode, so they all meet one lock. It is the kernel's
    (``flock``, on Windows a lock file beside the database): it goes with the descriptor, so
    a server that is killed (even with SIGKILL) releases it. On Linux ``flock`` and
    SQLite's own (POSIX ``fcntl``) locks do not interfere, but closing any descriptor of the
    file drops the process's POSIX locks on it: the caller keeps the descriptor open until
    every SQLite connection to the file is closed.

    Raises:
        DatabaseInUse: another process (or another store in this one) holds it.
        OSError: the file cannot be opened or created (``FileNotFoundError``: its folder
            does not exist).
    """
    if path == ":memory:":
        return None
    real = os.path.realpath(path)
    if sys.platform == "win32":  # pragma: no cover - Windows locks are mandatory: not the file
        import msvcrt

        fd = os.open(real + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            os.close(fd)
            raise DatabaseInUse(_in_use(real)) from None
        return fd
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DatabaseInUse(_in_use(real)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _in_use(real: str) -> str:
    return (
        f"the database {real} is in use by another trioworker server; "
        "stop that server first, or use another database"
    )
