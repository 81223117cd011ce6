"""`GET /dashboard`: a live page over /v1/stats, served whole by the front door.

A page, its script, its stylesheet and its icon, shipped in the package (ingest/static) and
read once: no build step, nothing loaded from elsewhere. The page asks for a key and sends it
to /v1/stats only; the Content-Security-Policy keeps it to this origin.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler

_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_FILES = {
    "dashboard.html": "text/html",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
    # Its own icon, so browsers don't ask for /favicon.ico (a 404 in the request counts).
    "favicon.svg": "image/svg+xml",
}


def _serve(body: bytes, content_type: str) -> Handler:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_HEADERS)

    return handler


def add_routes(app: web.Application) -> None:
    static = resources.files("ingest") / "static"
    files = {name: (static / name).read_bytes() for name in _FILES}
    app.router.add_get("/dashboard", _serve(files["dashboard.html"], _FILES["dashboard.html"]))
    for name in ("dashboard.js", "dashboard.css", "favicon.svg"):
        app.router.add_get(f"/dashboard/{name}", _serve(files[name], _FILES[name]))
