"""What keeps other web pages away from a server without an API key.

A browser lets any page send a "simple" request (a form's POST, ``text/plain`` bodies) to any
address, open a websocket to any address, and, through DNS rebinding, make a name of its
choosing point at ``127.0.0.1``. The app refuses all three (see :func:`check_request`):

- a request from a page (it carries an ``Origin``) of another origin than the server's own
  (the ``Host`` it was sent to) is refused with 403 when it opens a websocket or may change
  something (any method but ``GET``, ``HEAD`` and ``OPTIONS``), unless that origin is in the
  allowed ones (``--allowed-origins``). Workers, clients and the CLI send no ``Origin``;
- a server listening on a loopback address only answers requests whose ``Host`` names a
  loopback address (``localhost``, ``*.localhost``, ``127.0.0.1``, ``[::1]``, any port);
  listening elsewhere, any ``Host`` is answered;
- (in :mod:`~trioworker.server.app`) a REST body must be ``Content-Type: application/json``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from enum import Enum
from typing import Final
from urllib.parse import urlsplit

import trio

#: The methods that change nothing: answered whatever their ``Origin``.
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS: Final = {"http": 80, "ws": 80, "https": 443, "wss": 443}


class Exposure(Enum):
    """Who can reach an address the server listens on."""

    #: Only this machine (every address the host resolves to is a loopback one).
    LOOPBACK = "loopback"
    #: Every interface (``0.0.0.0``, ``::``, ``0``, ``""``...).
    EVERY_INTERFACE = "every interface"
    #: Some other address (or a name that does not resolve to loopback only).
    NETWORK = "network"


async def exposure(host: str) -> Exposure:
    """Who can reach a server listening on ``host`` (an address or a name, ``[::1]`` allowed).

    A name is resolved: it is :attr:`Exposure.LOOPBACK` only when every address it resolves
    to is; one that does not resolve is :attr:`Exposure.NETWORK`.
    """
    literal = host.strip().removeprefix("[").removesuffix("]")
    if not literal:
        return Exposure.EVERY_INTERFACE
    try:
        infos = await trio.socket.getaddrinfo(literal, None, type=socket.SOCK_STREAM)
    except OSError:
        return Exposure.NETWORK
    addresses = {ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos}
    if addresses and all(a.is_unspecified for a in addresses):
        return Exposure.EVERY_INTERFACE
    if addresses and all(a.is_loopback for a in addresses):
        return Exposure.LOOPBACK
    return Exposure.NETWORK


def is_loopback_name(host_header: str) -> bool:
    """Whether a ``Host`` header (``name[:port]``, ``[v6][:port]``) names this machine's
    loopback: ``localhost`` (or a name under it), an address in ``127.0.0.0/8``, ``::1``."""
    host = _host_of(host_header).rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(netloc: str) -> str:
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].partition("]")[0]
    return netloc.rpartition(":")[0] if netloc.count(":") == 1 else netloc


def _origin_key(scheme: str, netloc: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of ``netloc`` with the scheme's default port; None when malformed."""
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port
    except ValueError:
        return None
    if parts.hostname is None:
        return None
    return parts.hostname.rstrip("."), port if port is not None else _DEFAULT_PORTS.get(scheme)


def normalize_origin(origin: str) -> str:
    """``origin`` (``scheme://host[:port]``) as compared: lower case, no trailing slash.

    Raises:
        ValueError: when it is not ``http(s)://host[:port]``.
    """
    text = origin.strip().lower().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
        raise ValueError(f"an origin is http(s)://host[:port], got {origin!r}")
    try:
        parts.port  # noqa: B018 (a malformed port raises)
    except ValueError as exc:
        raise ValueError(f"an origin is http(s)://host[:port], got {origin!r}: {exc}") from None
    return text


def foreign_origin(origin: str, host_header: str, scheme: str, allowed: Iterable[str]) -> bool:
    """Whether a request carrying ``Origin: origin``, sent to ``host_header`` over ``scheme``
    (``http``, ``https``, ``ws``, ``wss``), comes from a page of another origin that is not
    in ``allowed`` (origins as :func:`normalize_origin` gives them)."""
    text = origin.strip().lower().rstrip("/")
    if text in allowed:
        return False
    origin_scheme, sep, netloc = text.partition("://")
    if not sep:
        return True  # "null" (a sandboxed page, a file) or malformed
    mine = _origin_key(scheme, host_header)
    theirs = _origin_key(origin_scheme, netloc)
    return mine is None or theirs is None or mine != theirs


def refusal(
    *,
    method: str,
    websocket: bool,
    scheme: str,
    host_header: str | None,
    origin: str | None,
    allowed_origins: frozenset[str],
    loopback_only: bool,
) -> str | None:
    """Why a request is refused (403), or None when it is answered (see the module's doc)."""
    if loopback_only and host_header is not None and not is_loopback_name(host_header):
        return (
            f"Host {host_header!r} is not this machine's loopback: a server listening on loopback "
            "answers only requests sent to localhost, 127.0.0.1 or [::1]"
        )
    if origin is None or (not websocket and method.upper() in SAFE_METHODS):
        return None
    if foreign_origin(origin, host_header or "", scheme, allowed_origins):
        return (
            f"requests from pages of origin {origin!r} are refused; allow it with --allowed-origins "
            "or TRIOWORKER_ALLOWED_ORIGINS"
        )
    return None
