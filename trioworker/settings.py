"""Settings from the environment, read when asked for (never at import time).

| variable | default | meaning |
|---|---|---|
| ``TRIOWORKER_HOME`` | ``~/.trioworker`` | where the embedded server keeps ``trioworker.db`` |
| ``TRIOWORKER_API_URL`` | ``http://127.0.0.1:4300/api`` | the server clients and workers talk to |
| ``TRIOWORKER_API_KEY`` | unset | the API key (server: required of clients; clients: sent) |

An API URL may be given as the server prints it (``http://host:port``) or with ``/api``:
:func:`api_root` is the one rule every client, worker and command applies to it.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import attrs

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 4300
#: Where a worker's status server listens unless told otherwise (this host only).
DEFAULT_STATUS_HOST: Final = "127.0.0.1"
#: Most runs a worker may have sent ahead into its buffer beyond its limit (``prefetch``).
MAX_PREFETCH: Final = 1000


def api_root(url: str) -> str:
    """The API root of a server URL: ``http(s)://host[:port][/prefix]/api``, no trailing slash.

    ``http://host:4300``, ``http://host:4300/``, ``http://host:4300/api`` and
    ``http://host:4300/api/`` all give ``http://host:4300/api``: a path that does not end
    in ``/api`` gets it added (so a server behind a proxy at ``/queue`` is ``.../queue``).

    Raises:
        ValueError: one sentence naming the fault: not ``http://`` or ``https://``, no
            host, a port that is not a number from 0 to 65535, or a query or fragment.
    """
    text = url.strip()
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not text[len(scheme) : len(scheme) + 3] == "://":
        raise ValueError(f"the API URL must start with http:// or https://, got {url!r}")
    try:
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number in range)
    except ValueError:
        raise ValueError(f"the API URL has a port that is not a number from 0 to 65535: {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"the API URL has no host: {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"the API URL takes no query or fragment: {url!r}")
    path = re.sub(r"/{2,}", "/", parts.path).rstrip("/")
    if not path.endswith("/api"):
        path += "/api"
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def socket_url(api_url: str, path: str) -> str:
    """The ``ws(s)://`` URL of ``path`` (e.g. ``/task_runs/channel``) under :func:`api_root`.

    Raises:
        ValueError: ``api_url`` is unusable (see :func:`api_root`).
    """
    scheme, rest = api_root(api_url).split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}"


@attrs.frozen
class Settings:
    home: Path
    #: As given (trailing slashes removed); :func:`api_root` makes it the API root.
    api_url: str
    api_key: str | None

    @property
    def db_path(self) -> Path:
        return self.home / "trioworker.db"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("TRIOWORKER_HOME") or "~/.trioworker").expanduser()
        api_url = env.get("TRIOWORKER_API_URL") or f"http://{DEFAULT_HOST}:{DEFAULT_PORT}/api"
        return cls(home=home, api_url=api_url.rstrip("/"), api_key=env.get("TRIOWORKER_API_KEY") or None)
