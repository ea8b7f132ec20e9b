"""Settings from the environment, read when asked for (never at import time).

| variable | default | meaning |
|---|---|---|
| ``TRIOWORKER_HOME`` | ``~/.trioworker`` | where the embedded server keeps ``trioworker.db`` |
| ``TRIOWORKER_API_URL`` | ``http://127.0.0.1:4300/api`` | the server(s) to use, comma-separated |
| ``TRIOWORKER_API_KEY`` | unset | the API key (server: required of clients; clients: sent) |
| ``TRIOWORKER_API_CA_BUNDLE`` | unset | clients: the CA certificates to check servers' against |
| ``TRIOWORKER_API_INSECURE`` | unset | clients: ``1`` checks no server certificate |
| ``TRIOWORKER_API_HEADERS`` | unset | clients: headers for every request (a JSON object) |

An API URL may be given as the server prints it (``http://host:port``) or with ``/api``:
:func:`api_root` (defined in :mod:`trioworker.protocol`, re-exported here) is the one rule
every client, worker and command applies to it. Several servers of one deployment are
given as a list, comma-separated (``http://a:4300,http://b:4300``), and used in order, the
next when one fails: see :mod:`trioworker.servers`. The client's TLS and header settings are
read (and checked) by :mod:`trioworker.connection`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import attrs

from trioworker.protocol import api_root, socket_url

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_STATUS_HOST",
    "MAX_PREFETCH",
    "Settings",
    "api_root",
    "socket_url",
]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 4300
#: Where a worker's status server listens unless told otherwise (this host only).
DEFAULT_STATUS_HOST: Final = "127.0.0.1"
#: Most runs a worker may have sent ahead into its buffer beyond its limit (``prefetch``).
MAX_PREFETCH: Final = 1000
#: Seconds in-flight runs get to finish after a worker's stop() before they are cancelled.
DEFAULT_SHUTDOWN_GRACE_SECONDS: Final = 30.0
#: Seconds a server sharing a PostgreSQL database may go without a heartbeat.
DEFAULT_REPLICA_TIMEOUT_SECONDS: Final = 15.0
#: The clients' connection settings (see :mod:`trioworker.connection`).
CA_BUNDLE_VARIABLE: Final = "TRIOWORKER_API_CA_BUNDLE"
INSECURE_VARIABLE: Final = "TRIOWORKER_API_INSECURE"
HEADERS_VARIABLE: Final = "TRIOWORKER_API_HEADERS"
#: How long the server keeps a run after it ended (seconds): 7 days.
DEFAULT_RETENTION_SECONDS: Final = 7 * 24 * 3600.0


@attrs.frozen
class Settings:
    home: Path
    #: As given (trailing slashes removed): one URL, or several comma-separated;
    #: :func:`trioworker.servers.api_roots` makes them API roots.
    api_url: str
    api_key: str | None
    #: The clients' connection settings, as the variables give them (read and checked by
    #: :func:`trioworker.connection.connection_options`).
    api_ca_bundle: str | None = None
    api_insecure: str | None = None
    api_headers: str | None = None

    @property
    def db_path(self) -> Path:
        return self.home / "trioworker.db"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("TRIOWORKER_HOME") or "~/.trioworker").expanduser()
        api_url = env.get("TRIOWORKER_API_URL") or f"http://{DEFAULT_HOST}:{DEFAULT_PORT}/api"
        return cls(
            home=home,
            api_url=api_url.rstrip("/"),
            api_key=env.get("TRIOWORKER_API_KEY") or None,
            api_ca_bundle=env.get(CA_BUNDLE_VARIABLE) or None,
            api_insecure=env.get(INSECURE_VARIABLE) or None,
            api_headers=env.get(HEADERS_VARIABLE) or None,
        )
