"""The dashboard: one page and its assets, served by the server at ``/`` (same port).

No build step and no front-end library: plain HTML, CSS and a JavaScript module, shipped
in the wheel beside this file. The page holds no data: it reads everything from the REST
API (``/api/overview``, ``/api/task_runs``, ...) and the live feed (``/api/events``), with
the API key the user types when the server asks for one.
"""

from __future__ import annotations

import importlib.resources
from typing import Final

from quart import Response

from trioworker._version import __version__

#: The page, served at ``/``.
PAGE: Final = "index.html"
#: Where the assets are served: ``/dashboard/app.js``.
ASSETS_PREFIX: Final = "/dashboard"
#: Every file of the dashboard, with its content type.
CONTENT_TYPES: Final = {
    PAGE: "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
#: Only the page's own files run and load; it talks only to its own server.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

Assets = dict[str, bytes]


def read_assets() -> Assets:
    """Every file of :data:`CONTENT_TYPES`, read once (when the app is made); the page's
    references to its assets carry the version, so a new release is never served from an
    old cache."""
    root = importlib.resources.files(__name__)
    assets = {name: root.joinpath(name).read_bytes() for name in CONTENT_TYPES}
    assets[PAGE] = assets[PAGE].replace(b"{{version}}", __version__.encode())
    return assets


def is_asset_path(path: str) -> bool:
    """Whether ``path`` is the page or one of its assets (they load without the API key)."""
    return path == "/" or path.startswith(f"{ASSETS_PREFIX}/")


def response(assets: Assets, name: str) -> Response:
    headers = dict(SECURITY_HEADERS)
    headers["Cache-Control"] = "no-cache" if name == PAGE else "public, max-age=3600"
    return Response(assets[name], status=200, content_type=CONTENT_TYPES[name], headers=headers)
