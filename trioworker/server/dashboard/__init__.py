"""The dashboard: one page and its assets, served by the server at ``/`` (same port); and
the API document's page (``/api/docs``), which shows ``/api/openapi.json``.

No build step and no front-end library: plain HTML, CSS and JavaScript modules, shipped
in the wheel beside this file. The pages hold no data: they read everything from the REST
API (``/api/overview``, ``/api/task_runs``, ...) and the live feed (``/api/events``), with
the API key the user types when the server asks for one (kept in the tab, shared by both).
"""

from __future__ import annotations

import importlib.resources
from typing import Final

from quart import Response

from trioworker._version import __version__

#: The page, served at ``/``.
PAGE: Final = "index.html"
#: The API document's page, served at ``/api/docs``.
DOCS_PAGE: Final = "docs.html"
#: Where the assets are served: ``/dashboard/app.js``.
ASSETS_PREFIX: Final = "/dashboard"
#: Every file of the dashboard, with its content type.
CONTENT_TYPES: Final = {
    PAGE: "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
    DOCS_PAGE: "text/html; charset=utf-8",
    "docs.js": "text/javascript; charset=utf-8",
    "docs.css": "text/css; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
}
#: Files the pages load with their version in the URL (``?v=``): cached for an hour. The
#: others (the pages, and modules the scripts import) are checked at every load.
VERSIONED: Final = frozenset({"app.js", "style.css", "favicon.svg", "docs.js", "docs.css"})
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
    """Every file of :data:`CONTENT_TYPES`, read once (when the app is made); the pages'
    references to their assets carry the version, so a new release is never served from an
    old cache."""
    root = importlib.resources.files(__name__)
    assets = {name: root.joinpath(name).read_bytes() for name in CONTENT_TYPES}
    for page in (PAGE, DOCS_PAGE):
        assets[page] = assets[page].replace(b"{{version}}", __version__.encode())
    return assets


def is_asset_path(path: str) -> bool:
    """Whether ``path`` is the page or one of its assets (they load without the API key)."""
    return path == "/" or path.startswith(f"{ASSETS_PREFIX}/")


def response(assets: Assets, name: str) -> Response:
    headers = dict(SECURITY_HEADERS)
    headers["Cache-Control"] = "public, max-age=3600" if name in VERSIONED else "no-cache"
    return Response(assets[name], status=200, content_type=CONTENT_TYPES[name], headers=headers)
