"""The OpenAPI document: every route in it, its schemas the msgspec types' own, built once;
and the docs page, served whole by the front door."""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from ingest import openapi
from ingest.dialects import native
from ingest.problems import Problem
from shared.formats.native import NativeEvent


def refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(value) for value in node))
    return set()


async def test_every_route_is_in_the_document(gateway):
    client = await gateway()
    response = await client.get("/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"] == "3.1.0"
    paths = document["paths"]
    for route in client.server.app.router.routes():
        resource = route.resource
        name = route.name or ""
        if resource is None or route.method in ("HEAD", "*") or name.endswith(":slash"):
            continue
        path = resource.canonical
        if path.startswith("/docs/") or path == "/client/event-bulk-create":
            continue  # the page's files; the bulk path is documented with its slash
        assert route.method.lower() in paths.get(path, {}), (route.method, path)
    assert "post" in paths["/client/event-bulk-create/"]


async def test_every_reference_resolves_and_every_operation_has_its_errors(gateway):
    client = await gateway()
    document = await (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    for ref in refs(document):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation["responses"], (method, path)
            if operation.get("security"):
                assert {"401", "403"} <= set(operation["responses"]), (method, path)


async def test_the_schemas_are_the_msgspec_types_own(gateway):
    """Nothing written twice: the components are what msgspec says of the types in use."""
    client = await gateway()
    document = await (await client.get("/openapi.json")).json()
    _, own = msgspec.json.schema_components(
        [NativeEvent, Problem, native.Accepted], ref_template="#/components/schemas/{name}"
    )
    schemas = document["components"]["schemas"]
    assert schemas["NativeEvent"] == own["NativeEvent"]
    assert schemas["Problem"] == own["Problem"]
    events = document["paths"]["/v1/events"]["post"]
    body = events["requestBody"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/NativeEvent"} in body["anyOf"]
    [batch] = [option for option in body["anyOf"] if option.get("type") == "array"]
    assert batch["maxItems"] == 1000  # EVENTGATE_MAX_EVENTS
    assert "application/problem+json" in events["responses"]["422"]["content"]


async def test_the_document_is_built_once(gateway, monkeypatch):
    built = []
    real = openapi.build_document

    def counting(app: Any) -> dict[str, Any]:
        built.append(app)
        return real(app)

    monkeypatch.setattr(openapi, "build_document", counting)
    client = await gateway()
    first = await (await client.get("/openapi.json")).read()
    second = await (await client.get("/openapi.json")).read()
    assert first == second
    assert len(built) == 1


async def test_the_docs_page_is_served_from_here(gateway):
    client = await gateway()
    page = await client.get("/docs")
    assert page.status == 200
    assert page.content_type == "text/html"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    html = await page.text()
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources
    for source in sources:
        assert source.startswith("/docs/"), source  # nothing from elsewhere
        asset = await client.get(source)
        assert asset.status == 200, source
        assert asset.content_type in ("text/css", "text/javascript", "image/png"), source
    assert "swagger-ui" in html


async def test_the_pages_copy_is_openapi_30_without_null_types(gateway):
    """Swagger UI 4 (the bundled one) renders OpenAPI 3.0 only: the page gets a 3.0 copy."""
    client = await gateway()
    copy = await (await client.get("/docs/openapi-3.0.json")).json()
    assert copy["openapi"] == "3.0.3"
    assert '{"type": "null"}' not in json.dumps(copy)
    assert copy["components"]["schemas"]["NativeEvent"]["properties"]["id"]["nullable"] is True
