"""How a client reaches its servers: TLS and extra headers, in one place.

Every connection that a client, a worker or a command opens to a server (REST calls over
httpx; the worker's subscription, the client channel and ``submit --wait``'s live feed over
websockets) is made with one :class:`ConnectionOptions`:

- **TLS**: an ``https://`` server (its websockets are then ``wss://``) must show a
  certificate that the system's trust store vouches for, or, with ``ca_bundle``
  (``TRIOWORKER_API_CA_BUNDLE``), one that the CA certificates of that PEM file (or folder
  of them, as OpenSSL's ``c_rehash`` makes it) vouch for, and only those. The certificate
  must name the host of the URL. ``insecure=True`` (``TRIOWORKER_API_INSECURE=1``) checks
  nothing and each client that uses it logs a warning as it is set up: the traffic is encrypted, but anyone on
  the way can read and change it.
- **headers**: sent on every HTTP request and on every websocket handshake
  (``TRIOWORKER_API_HEADERS``, a JSON object: ``{"X-Tenant": "blue"}``), for a proxy or a
  gateway in front of the servers. The client's own ``Authorization`` (the API key, when
  one is set: ``Bearer KEY``, on websocket handshakes too) and ``Content-Type`` (HTTP)
  win over headers of the same name given here, whatever their case; without an API key
  an ``Authorization`` given here is sent as it is.

:func:`connection_options` reads what it is not given from the environment and checks it;
a setting that cannot be used is a :class:`ValueError` of one line that names it. The
options of one setting are made once in a process (a TLS context reads the trust store or
the CA file, which takes milliseconds), so a CA file changed later is read by a new process.

This module uses no wing: the clients, the worker and the commands share it.
"""

from __future__ import annotations

import json
import logging
import ssl
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import attrs
import trio

from trioworker.settings import CA_BUNDLE_VARIABLE, HEADERS_VARIABLE, INSECURE_VARIABLE, Settings

__all__ = ["ConnectionOptions", "connection_options", "tls_failure"]

log = logging.getLogger("trioworker.connection")

#: The texts that turn a yes/no variable on, and those that leave it off.
_YES: Final = ("1", "true", "yes", "on")
_NO: Final = ("0", "false", "no", "off")
#: What a header name may hold (an HTTP token).
_TOKEN_CHARACTERS: Final = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)
#: The header an API key goes in (lower case): with a key, the key's wins.
_AUTHORIZATION: Final = "authorization"
#: The header every HTTP request of a client sets itself (lower case): its own wins.
_HTTP_OWN_HEADERS: Final = frozenset({"content-type"})
#: Links of an exception's chain looked at for a TLS failure, at most.
_CHAIN_LIMIT: Final = 16


@attrs.frozen(eq=False)
class ConnectionOptions:
    """How to connect: the TLS context for ``https://`` and ``wss://``, and the extra headers.

    Make it with :func:`connection_options`.
    """

    #: The CA bundle certificates are checked against (None: the system's trust store).
    ca_bundle: str | None
    #: Certificates are not checked at all.
    insecure: bool
    #: Sent on every request and websocket handshake, in order.
    headers: tuple[tuple[str, str], ...]
    #: The client side of every TLS connection.
    ssl_context: ssl.SSLContext

    def _with_key(self, api_key: str | None, own: frozenset[str]) -> list[tuple[str, str]]:
        """The extra headers, but none named (in any case) as one of ``own`` (lower case),
        then ``Authorization: Bearer KEY`` when there is an API key: the key wins over an
        extra ``Authorization``; without a key, an extra one is sent as it is."""
        if api_key:
            own = own | {_AUTHORIZATION}
        pairs = [(name, value) for name, value in self.headers if name.lower() not in own]
        if api_key:
            pairs.append(("Authorization", f"Bearer {api_key}"))
        return pairs

    def http_headers(self, api_key: str | None) -> dict[str, str]:
        """The headers of every HTTP request: the extra ones, ``Content-Type:
        application/json`` and, with an API key, ``Authorization: Bearer KEY`` (the client's
        own win over extra headers of the same name, in any case)."""
        headers = dict(self._with_key(api_key, _HTTP_OWN_HEADERS))
        headers["Content-Type"] = "application/json"
        return headers

    def websocket_headers(self, api_key: str | None) -> list[tuple[bytes, bytes]]:
        """The headers of every websocket handshake: the same rule as :meth:`http_headers`
        (the API key's ``Authorization`` wins; the server reads the key from the socket's
        auth message, a proxy in front of it from this header), without ``Content-Type``."""
        return [(name.encode(), value.encode()) for name, value in self._with_key(api_key, frozenset())]

    async def open_stream(self, host: str, port: int, secure: bool) -> trio.abc.Stream:
        """The byte stream under a websocket: TCP to ``host:port`` and, when ``secure``
        (``wss://``), TLS with :attr:`ssl_context`, its handshake done (so a certificate
        that is not accepted fails here). This is :data:`trioworker._websocket.OpenStream`.

        Raises:
            OSError: the connection or the TLS handshake failed (an :class:`ssl.SSLError`,
                :class:`ssl.SSLCertVerificationError` for a certificate not accepted).
        """
        if not secure:
            return await trio.open_tcp_stream(host, port)
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=self.ssl_context, https_compatible=True
        )
        try:
            await stream.do_handshake()
        except BaseException as exc:  # closed, then re-raised (an SSL error as itself)
            await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.BrokenResourceError):
                cause = exc.__cause__
                if isinstance(cause, OSError):
                    raise cause from None
                raise OSError(f"the TLS handshake with {host}:{port} failed: {exc!r}") from exc
            raise
        return stream


def connection_options(
    ca_bundle: str | Path | None = None,
    insecure: bool | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    warn: bool = True,
) -> ConnectionOptions:
    """The options for these settings; each one not given (None) is read from its variable:
    ``TRIOWORKER_API_CA_BUNDLE``, ``TRIOWORKER_API_INSECURE`` (``1``, ``true``, ``yes``,
    ``on``; or ``0``, ``false``, ``no``, ``off``), ``TRIOWORKER_API_HEADERS`` (a JSON object
    of header names and string values). With ``warn`` (the default), an insecure setting
    logs its warning, once per client that calls this; a check made before the client is
    built passes ``warn=False``.

    Raises:
        ValueError: one line naming the setting (the argument, or the variable it was read
            from): a CA bundle that cannot be read or holds no certificate, a yes/no
            variable that is neither, headers that are not a JSON object of strings, a
            header name that is not an HTTP token, or a value with a line break or a
            character outside printable ASCII.
    """
    settings = Settings.from_env()
    bundle: str | None = settings.api_ca_bundle
    bundle_source = CA_BUNDLE_VARIABLE
    if ca_bundle is not None:
        bundle, bundle_source = str(ca_bundle), "ca_bundle"
    if insecure is None:
        insecure = _yes_or_no(settings.api_insecure, INSECURE_VARIABLE)
    if headers is not None:
        pairs = _checked_headers(headers, "headers")
    else:
        pairs = _checked_headers(_json_headers(settings.api_headers), HEADERS_VARIABLE)
    options = _options(bundle, bundle_source, insecure, pairs)
    if insecure and warn:
        log.warning(
            "TLS certificates of servers are not checked (%s): the traffic is encrypted, but anyone "
            "on the way can read and change it; give the servers' CA with %s instead",
            INSECURE_VARIABLE,
            CA_BUNDLE_VARIABLE,
        )
    return options


def _options(
    ca_bundle: str | None, source: str, insecure: bool, headers: tuple[tuple[str, str], ...]
) -> ConnectionOptions:
    """The options of one setting. Made per client, not cached in the process: a CA file
    changed meanwhile is read again."""
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_bundle is not None:
        context = _bundle_context(ca_bundle, source)
    else:
        context = ssl.create_default_context()
    return ConnectionOptions(ca_bundle, insecure, headers, context)


def _bundle_context(ca_bundle: str, source: str) -> ssl.SSLContext:
    path = Path(ca_bundle).expanduser()
    try:
        if path.is_dir():
            context = ssl.create_default_context(capath=str(path))
        else:
            context = ssl.create_default_context(cafile=str(path))
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"{source}: cannot read the CA bundle {ca_bundle!r}: {reason}") from None
    if not path.is_dir() and not context.get_ca_certs():
        raise ValueError(f"{source}: the CA bundle {ca_bundle!r} holds no CA certificate (PEM)")
    return context


def _yes_or_no(text: str | None, variable: str) -> bool:
    word = (text or "").strip().lower()
    if word in _YES:
        return True
    if word in _NO or not word:
        return False
    raise ValueError(f"{variable}: expected {', '.join(_YES)} (or {', '.join(_NO)}), got {text!r}")


def _json_headers(text: str | None) -> Mapping[str, str]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f'{HEADERS_VARIABLE}: expected a JSON object such as {{"X-Tenant": "blue"}}, got {text!r} '
            f"({exc.msg} at character {exc.pos})"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(
            f'{HEADERS_VARIABLE}: expected a JSON object such as {{"X-Tenant": "blue"}}, '
            f"got a JSON {type(value).__name__}: {text!r}"
        )
    return value


def _checked_headers(headers: Mapping[str, object], source: str) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    for name, value in headers.items():
        if not isinstance(name, str) or not name or not set(name) <= _TOKEN_CHARACTERS:
            raise ValueError(f"{source}: {name!r} is not a header name (letters, digits and !#$%&'*+-.^_`|~)")
        if not isinstance(value, str):
            raise ValueError(f"{source}: the value of {name!r} must be a string, got {value!r}")
        if not all(" " <= c <= "~" or c == "\t" for c in value):
            raise ValueError(
                f"{source}: the value of {name!r} may hold printable ASCII only (no line breaks), "
                f"got {value!r}"
            )
        pairs.append((name, value))
    return tuple(pairs)


def tls_failure(exc: BaseException) -> str | None:
    """One sentence for a TLS failure in ``exc`` or what caused it (its ``__cause__`` and
    ``__context__`` chain), for an error message; None when TLS did not fail."""
    current: BaseException | None = exc
    for _ in range(_CHAIN_LIMIT):
        if current is None:
            return None
        if isinstance(current, ssl.SSLCertVerificationError):
            why = current.verify_message or current.reason or str(current)
            return (
                f"its TLS certificate was not accepted ({why}): give the CA that signed it "
                f"(ca_bundle=, {CA_BUNDLE_VARIABLE}), or skip the check ({INSECURE_VARIABLE}=1)"
            )
        if isinstance(current, ssl.SSLError):
            why = current.reason or str(current)
            return f"the TLS handshake failed ({why}): does it serve https:// on that port?"
        current = current.__cause__ or current.__context__
    return None
