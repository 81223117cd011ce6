"""The OpenAPI 3.1 document at `/openapi.json`, and the docs page at `/docs` rendered from it.

Request and answer schemas come from the msgspec types the routes decode and encode
(`msgspec.json.schema_components`), so the document cannot drift from the code; what is written
here is only what msgspec cannot know: paths, parameters, keys, statuses. A route the table
does not describe is still listed, with a generic answer. Built on first request, then kept.
The page is Swagger UI from the `swagger-ui-bundle` package, served from here: no CDN.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from aiohttp import web

from ingest import account_api, admin, persons_api, stats
from ingest.context import GATEWAY
from ingest.dialects import bulk, catalog, import_, native, people
from ingest.problems import Problem
from shared.definitions import Definition
from shared.formats.bulk import BulkDocument
from shared.formats.catalog import CatalogHead
from shared.formats.import_ import ImportRequest
from shared.formats.native import NativeEvent
from shared.formats.people import PeopleBody
from shared.formats.person import PersonIn
from shared.persons import PEOPLE_TYPES

if TYPE_CHECKING:
    from shared.settings import Settings

_REF = "#/components/schemas/{name}"
_JSON = "application/json"
_PROBLEM = "application/problem+json"
_JSON_API = "application/vnd.api+json"
_NOT_WORD = re.compile(r"\W+")


class Health(msgspec.Struct, frozen=True):
    status: Literal["ok"]


class Readiness(msgspec.Struct, frozen=True, omit_defaults=True):
    status: Literal["ready", "unavailable", "backpressure"]
    redis: str | None = None  # why Redis is unreachable
    why: str | None = None  # what the backpressure is about


@dataclass(frozen=True)
class Answer:
    status: int | str  # or "default"
    type: Any = None  # None: no body
    media: str = _JSON
    description: str = ""


@dataclass(frozen=True)
class Op:
    """One operation: what msgspec cannot say about it."""

    method: str
    path: str
    summary: str
    tag: str
    answers: tuple[Answer, ...]
    security: tuple[str, ...] = ()  # alternatives; () means none
    body: Any = None
    body_media: tuple[str, ...] = (_JSON,)
    parameters: tuple[dict[str, Any], ...] = ()
    description: str = ""


def _errors(kind: Any, media: str, *statuses: int) -> tuple[Answer, ...]:  # noqa: ANN401 - a type
    return tuple(Answer(s, kind, media, "refused; the body says why") for s in statuses)


def _query(name: str, schema: dict[str, Any], *, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


# Statuses every event route may answer besides its own: bad body, key, slow body, size,
# encoding, rate, connections, Redis.
_EVENT_ERRORS = (400, 401, 403, 408, 413, 415, 429, 503)
_ADMIN_ERRORS = (401, 403, 429, 503)


def operations(settings: Settings) -> list[Op]:
    """Every documented operation, with the limits `settings` puts in force."""
    many = msgspec.Meta(min_length=1, max_length=settings.max_events)
    native_body = NativeEvent | Annotated[list[NativeEvent], many]
    catalog_body = (
        CatalogHead | Annotated[list[CatalogHead], msgspec.Meta(min_length=1, max_length=100)]
    )
    return [
        Op(
            "post",
            "/v1/events",
            "Send one event or a batch (native API)",
            "native",
            (Answer(202, native.Accepted), *_errors(Problem, _PROBLEM, *_EVENT_ERRORS, 422)),
            security=("bearer",),
            body=native_body,
            parameters=(
                _query(
                    "strict",
                    {
                        "type": "string",
                        "description": "`false`, `0` or `no`: queue the valid events and list "
                        "the others; anything else (the default): all or nothing",
                    },
                ),
            ),
            description=f"At most {settings.max_events} events and "
            f"{settings.max_body_bytes} bytes; `strict=false` queues the valid events of a "
            "batch and lists the others. Limits: see the README, `Limits and security`.",
        ),
        Op(
            "post",
            "/events",
            "Send catalog events (seeds 000/001)",
            "catalog",
            (Answer(202, catalog.Accepted), *_errors(catalog.ErrorReply, _JSON, *_EVENT_ERRORS)),
            security=("bearer",),
            body=catalog_body,
        ),
        Op(
            "post",
            "/api/v1/events",
            "Send one person's events (seed 003)",
            "import",
            (Answer(200, import_.Reply), *_errors(import_.Reply, _JSON, *_EVENT_ERRORS)),
            security=("accessToken",),
            body=ImportRequest,
            parameters=(_query("service_id", {"type": "string"}, required=True),),
        ),
        Op(
            "post",
            people.PATH,
            "Send one event of a known person (seed 002)",
            "people",
            (Answer(201, people.Created), *_errors(people.ErrorReply, _JSON, *_EVENT_ERRORS, 404)),
            security=("bearer",),
            body=PeopleBody,
            parameters=(
                _path("personId"),
                _path("definitionId"),
                _query("identifierType", {"type": "string", "enum": PEOPLE_TYPES}, required=True),
            ),
            description="The key may also be sent as `Authorization: App KEY`.",
        ),
        Op(
            "post",
            f"{bulk.PATH}/",
            "Send one profile's events from a browser (seed 004)",
            "bulk",
            (
                Answer(202, None, description="queued; no body"),
                *_errors(bulk.ErrorDocument, _JSON_API, *_EVENT_ERRORS),
            ),
            security=("companyId",),
            body=BulkDocument,
            body_media=(_JSON, _JSON_API),
            parameters=(
                {
                    "name": "revision",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}(\.[\w-]+)?$"},
                },
            ),
        ),
        Op(
            "get",
            "/v1/definitions",
            "The key's account's event definitions",
            "admin",
            (Answer(200, admin.DefinitionList), *_errors(Problem, _PROBLEM, *_ADMIN_ERRORS)),
            security=("bearer",),
        ),
        Op(
            "get",
            "/v1/definitions/{name}",
            "One event definition",
            "admin",
            (Answer(200, Definition), *_errors(Problem, _PROBLEM, *_ADMIN_ERRORS, 404)),
            security=("bearer",),
            parameters=(_path("name"),),
        ),
        Op(
            "put",
            "/v1/definitions/{name}",
            "Create or replace an event definition",
            "admin",
            (
                Answer(200, Definition, description="replaced"),
                Answer(201, Definition, description="created"),
                # 404: a name the route does not match (a line break in it).
                *_errors(Problem, _PROBLEM, *_ADMIN_ERRORS, 400, 404, 408, 413, 415, 422),
            ),
            security=("bearer",),
            body=admin.DefinitionBody,
            parameters=(_path("name"),),
        ),
        Op(
            "delete",
            "/v1/definitions/{name}",
            "Delete an event definition",
            "admin",
            (
                Answer(204, None, description="deleted"),
                *_errors(Problem, _PROBLEM, *_ADMIN_ERRORS, 404),
            ),
            security=("bearer",),
            parameters=(_path("name"),),
        ),
        Op(
            "post",
            "/v1/persons",
            "Create a person, so the people dialect finds it at once",
            "admin",
            (
                Answer(200, persons_api.PersonOut, description="the person existed"),
                Answer(201, persons_api.PersonOut, description="created"),
                *_errors(Problem, _PROBLEM, *_ADMIN_ERRORS, 400, 408, 409, 413, 415, 422),
            ),
            security=("bearer",),
            body=PersonIn,
        ),
        Op(
            "get",
            "/v1/account",
            "The key's account: its settings and the limits in force",
            "admin",
            (Answer(200, account_api.AccountReply), *_errors(Problem, _PROBLEM, *_ADMIN_ERRORS)),
            security=("bearer",),
        ),
        Op(
            "patch",
            "/v1/account",
            "Change the key's account's settings",
            "admin",
            (
                Answer(200, account_api.AccountReply),
                *_errors(Problem, _PROBLEM, *_ADMIN_ERRORS, 400, 408, 413, 415, 422),
            ),
            security=("bearer",),
            body=account_api.Patch,
        ),
        Op(
            "get",
            "/v1/stats",
            "Queue and accounting figures the key may see",
            "operations",
            (Answer(200, stats.Stats), *_errors(Problem, _PROBLEM, *_ADMIN_ERRORS)),
            security=("bearer",),
        ),
        Op(
            "get",
            "/metrics",
            "Prometheus metrics (no key: keep it off the public internet)",
            "operations",
            (Answer(200, None, "text/plain", "Prometheus text format"),),
        ),
        Op("get", "/healthz", "Liveness", "operations", (Answer(200, Health),)),
        Op(
            "get",
            "/readyz",
            "Readiness: Redis answers and no backpressure",
            "operations",
            (Answer(200, Readiness), Answer(503, Readiness, description="not ready")),
        ),
        Op(
            "get",
            "/openapi.json",
            "This document",
            "operations",
            (Answer(200, dict[str, Any]),),
        ),
        Op(
            "get",
            "/docs",
            "This document, for people",
            "operations",
            (Answer(200, None, "text/html", "a page"),),
        ),
    ]


_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "an eventgate key"},
    "accessToken": {"type": "apiKey", "in": "header", "name": import_.TOKEN_HEADER},
    "companyId": {
        "type": "apiKey",
        "in": "query",
        "name": "company_id",
        "description": "a public key",
    },
}


def build_document(app: web.Application) -> dict[str, Any]:
    """The document for `app`: its operations, and any other route it serves."""
    settings = app[GATEWAY].settings
    served = _served(app)
    ops = [op for op in operations(settings) if (op.method, op.path) in served]
    kinds = [t for op in ops for t in _types(op)]
    schemas, components = msgspec.json.schema_components(kinds, ref_template=_REF)
    schema_of = dict(zip(map(id, kinds), schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method] = _operation(op, schema_of)
    for method, path in sorted(served - {(op.method, op.path) for op in ops}):
        paths.setdefault(path, {})[method] = {
            "summary": f"{method.upper()} {path}",
            "tags": ["other"],
            "responses": {"default": {"description": "see the README"}},
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "eventgate",
            "version": "0.1.0",
            "description": "Event ingestion gateway: a native API and four vendor dialects. "
            "Every error is answered in the route's own shape.",
        },
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": _SECURITY_SCHEMES},
    }


def _served(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route: not the trailing-slash twins, HEAD or the 405 catch-alls,
    nor the docs page's own files."""
    served = set()
    for route in app.router.routes():
        name = route.name or ""
        resource = route.resource
        if resource is None or name.endswith(":slash") or route.method in ("HEAD", "*"):
            continue
        path = resource.canonical
        if path.startswith("/docs/"):  # the page's own files
            continue
        served.add((route.method.lower(), path))
    if ("post", bulk.PATH) in served:  # the vendor's own path has the slash
        served = (served - {("post", bulk.PATH), ("options", bulk.PATH)}) | {
            ("post", f"{bulk.PATH}/")
        }
    return served


def _types(op: Op) -> list[Any]:
    return [t for t in (op.body, *(a.type for a in op.answers)) if t is not None]


def _operation(op: Op, schema_of: dict[int, dict[str, Any]]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": op.summary,
        "operationId": _NOT_WORD.sub("_", f"{op.method}{op.path}").strip("_"),
        "tags": [op.tag],
        "responses": {
            str(a.status): _response(a, schema_of) for a in sorted(op.answers, key=_status)
        },
        "security": [{name: []} for name in op.security],
    }
    if op.description:
        operation["description"] = op.description
    if op.parameters:
        operation["parameters"] = list(op.parameters)
    if op.body is not None:
        schema = schema_of[id(op.body)]
        operation["requestBody"] = {
            "required": True,
            "content": {media: {"schema": schema} for media in op.body_media},
        }
    return operation


def _status(answer: Answer) -> str:
    return str(answer.status)


def _response(answer: Answer, schema_of: dict[int, dict[str, Any]]) -> dict[str, Any]:
    response: dict[str, Any] = {"description": answer.description or "done"}
    if answer.type is not None:
        response["content"] = {answer.media: {"schema": schema_of[id(answer.type)]}}
    elif answer.media != _JSON:
        response["content"] = {answer.media: {"schema": {"type": "string"}}}
    return response


# --- serving ------------------------------------------------------------------------------------

_ASSETS = "/docs/assets/"
# Swagger UI's own files, from the swagger-ui-bundle package, and their types.
_UI_FILES = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    # Its own icon, so that browsers don't ask for /favicon.ico (a 404).
    "favicon-32x32.png": "image/png",
}
_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>eventgate API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/assets/start.js"></script></body></html>
"""
# In a file of its own: the page's Content-Security-Policy allows no inline script.
_START = b"""window.onload = () => {
  window.ui = SwaggerUIBundle({url: "/docs/openapi-3.0.json", dom_id: "#swagger-ui",
                               deepLinking: true});
};
"""
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


class Documents:
    """The document, built on first request (every route is known by then) and kept, in
    OpenAPI 3.1 and in the 3.0 the bundled Swagger UI (4.x) renders."""

    def __init__(self) -> None:
        self._json: bytes | None = None
        self._json_30: bytes | None = None

    def json(self, app: web.Application) -> bytes:
        if self._json is None:
            self._json = msgspec.json.encode(build_document(app))
        return self._json

    def json_30(self, app: web.Application) -> bytes:
        if self._json_30 is None:
            self._json_30 = msgspec.json.encode(as_openapi_30(build_document(app)))
        return self._json_30


DOCUMENTS = web.AppKey("openapi_documents", Documents)


async def get_document(request: web.Request) -> web.Response:
    body = request.app[DOCUMENTS].json(request.app)
    return web.Response(body=body, content_type=_JSON)


async def get_document_30(request: web.Request) -> web.Response:
    body = request.app[DOCUMENTS].json_30(request.app)
    return web.Response(body=body, content_type=_JSON)


def as_openapi_30(document: dict[str, Any]) -> dict[str, Any]:
    """The same document as OpenAPI 3.0, which has no `null` type: `anyOf [X, null]` becomes
    `X` with `nullable: true`. Only for the page: Swagger UI 4 refuses 3.1 whole."""
    converted = _nullable(document)
    assert isinstance(converted, dict)  # noqa: S101 - a dict in, a dict out
    converted["openapi"] = "3.0.3"
    info = converted["info"]
    info["description"] += " The contract is /openapi.json (OpenAPI 3.1); this is a 3.0 copy."
    return converted


def _nullable(node: object) -> object:
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable(value) for key, value in node.items()}
    options = out.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [option for option in options if option != {"type": "null"}]
        out.pop("anyOf")
        if len(rest) == 1 and isinstance(rest[0], dict) and "$ref" not in rest[0]:
            out.update(rest[0])
        else:
            out["anyOf"] = rest
        out["nullable"] = True
    return out


def _file(body: bytes, content_type: str, headers: dict[str, str] | None = None) -> Any:  # noqa: ANN401 - a handler
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, headers=headers)

    return handler


def add_routes(app: web.Application) -> None:
    app[DOCUMENTS] = Documents()
    app.router.add_get("/openapi.json", get_document)
    app.router.add_get("/docs/openapi-3.0.json", get_document_30)
    app.router.add_get("/docs", _file(_PAGE, "text/html", _PAGE_HEADERS))
    app.router.add_get(f"{_ASSETS}start.js", _file(_START, "text/javascript"))
    # The package keeps its Swagger UI in vendor/swagger-ui-<version>/.
    vendor = resources.files("swagger_ui_bundle") / "vendor"
    ui = next(d for d in vendor.iterdir() if d.name.startswith("swagger-ui"))
    for name, content_type in _UI_FILES.items():
        app.router.add_get(f"{_ASSETS}{name}", _file((ui / name).read_bytes(), content_type))
