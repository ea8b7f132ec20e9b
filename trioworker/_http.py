"""Serving an ASGI app with hypercorn's trio backend: shared by the server (its quart-trio
app behind its websockets' router) and the worker's status server (a quart-trio app).
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import Framework

from trioworker._util import only_exception

log = logging.getLogger("trioworker")

#: Seconds open requests and sockets get to finish when a server stops.
GRACEFUL_SECONDS: Final = 2.0


def bind_socket(
    host: str, port: int, *, settings: tuple[str, str] = ("host", "port"), role: str = "server"
) -> socket.socket:
    """A bound TCP socket (closed again if binding fails).

    We bind it ourselves and hand hypercorn its file descriptor: hypercorn's own binding
    leaves a socket whose bind failed to the garbage collector, and wraps the OSError
    in several exception groups.

    Raises:
        OSError: one line naming the setting at fault (``settings`` names the host's and
            the port's, e.g. ``("--status-host", "--status-port")``) and its value: a host
            that does not resolve, or an address or port that cannot be bound (in use, not
            this machine's, not permitted), saying whose it is (``role``: ``"server"``,
            ``"status server"``): a :class:`BindError` whose ``errno`` and ``strerror`` are
            the original ones.
    """
    host_setting, port_setting = settings
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if isinstance(exc, socket.gaierror):
            message = f"{host_setting} {host!r} does not resolve: {reason}"
        else:
            message = (
                f"the {role} cannot listen on {host_setting} {host!r} with {port_setting} {port}: {reason}"
            )
        raise BindError(exc.errno, reason, message) from None
    return sock


class BindError(OSError):
    """A host or port that cannot be bound; ``errno`` and ``strerror`` are the original
    error's, ``str()`` is one line naming the setting and its value."""

    def __init__(self, errno: int | None, strerror: str, message: str) -> None:
        super().__init__(errno, strerror)
        self.message = message

    def __str__(self) -> str:
        return self.message


def check_certificate(
    certfile: str, keyfile: str, *, settings: tuple[str, str] = ("certfile", "keyfile")
) -> None:
    """Load the TLS certificate and key as hypercorn will, once, before anything starts.

    Raises:
        CertificateError: one line naming the two settings (``settings``) and their files:
            a file that cannot be read, or that is not a PEM certificate (chain) and its
            private key.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except OSError as exc:  # ssl.SSLError included
        if isinstance(exc, ssl.SSLError):
            reason = f"{exc.reason or exc}: expected a PEM certificate (chain) and its private key"
        else:
            reason = exc.strerror or str(exc)
        cert_setting, key_setting = settings
        raise CertificateError(
            exc.errno,
            reason,
            f"cannot use {cert_setting} {certfile!r} with {key_setting} {keyfile!r} for TLS: {reason}",
        ) from None


class CertificateError(OSError):
    """A TLS certificate or key the server cannot use; ``str()`` is one line naming them."""

    def __init__(self, errno: int | None, strerror: str, message: str) -> None:
        super().__init__(errno, strerror)
        self.message = message

    def __str__(self) -> str:
        return self.message


async def serve_app(
    app: Framework,
    host: str,
    port: int,
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    label: str = "server",
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    websocket_max_message_size: int | None = None,
    settings: tuple[str, str] = ("host", "port"),
    tls_settings: tuple[str, str] = ("certfile", "keyfile"),
    role: str = "server",
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until ``shutdown_trigger`` returns or we are cancelled.

    Reports the URL once listening (``port=0`` picks a free port; ``https://`` with TLS).
    A host or port that cannot be bound raises ``OSError`` (see :func:`bind_socket`;
    ``settings`` names the two settings in its message, ``role`` whose port it is) before
    anything starts.

    With ``certfile`` and ``keyfile`` (PEM files) it serves over TLS (hypercorn's), and its
    websockets are ``wss://``; a pair it cannot use raises :class:`CertificateError`
    first (see :func:`check_certificate`; ``tls_settings`` names the two settings).
    """
    if certfile is not None and keyfile is not None:
        check_certificate(certfile, keyfile, settings=tls_settings)
    sock = bind_socket(host, port, settings=settings, role=role)
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the descriptor from here
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = GRACEFUL_SECONDS
    if certfile is not None and keyfile is not None:
        config.certfile, config.keyfile = certfile, keyfile
    if websocket_max_message_size is not None:
        config.websocket_max_message_size = websocket_max_message_size
    trigger = shutdown_trigger or trio.sleep_forever
    try:
        binds: list[str] = []

        async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await hypercorn_serve(app, config, shutdown_trigger=trigger, task_status=task_status)

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(run)
            log.info("%s listening on %s", label, binds[0])
            task_status.started(binds[0])
    except BaseExceptionGroup as group:
        single = only_exception(group)
        if single is None:
            raise
        raise single from None
