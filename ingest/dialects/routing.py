"""A vendor endpoint's routes: with and without the trailing slash, every error in its shape."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ingest.context import begin_request
from ingest.problems import ERROR_RENDERERS, GatewayError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from aiohttp import web

    from ingest.problems import ErrorRenderer, Handler


class MethodNotAllowedError(GatewayError):
    status, title, code = 405, "Method not allowed", "method_not_allowed"


def add_post_endpoint(  # noqa: PLR0913 - keyword-only options
    app: web.Application,
    path: str,
    handler: Handler,
    *,
    name: str,
    render: ErrorRenderer,
    others: Mapping[str, Handler] | None = None,
) -> None:
    """Serve POST `path` and `path/`, and answer other methods with 405, all in `render`'s shape.

    Both paths are served, never redirected: some producers' HTTP stacks don't follow one.
    `others` serves more methods on both paths (e.g. OPTIONS for CORS preflights).
    """
    app[ERROR_RENDERERS][name] = render
    for route_path, route_name in ((path, name), (f"{path}/", f"{name}:slash")):
        resource = app.router.add_resource(route_path, name=route_name)
        resource.add_route("POST", handler)
        for method, other in (others or {}).items():
            resource.add_route(method, other)
        # aiohttp's own 405 belongs to no route, so it would be answered as problem+json.
        resource.add_route("*", _method_not_allowed)


async def _method_not_allowed(request: web.Request) -> web.StreamResponse:
    begin_request(request)  # a request id, as every answer has
    raise MethodNotAllowedError(
        f"{request.method} is not allowed here; send POST", headers={"Allow": "POST"}
    )
