"""Admin API: the key's account's event definitions, `GET|PUT|DELETE /v1/definitions[/{name}]`.

A private key only (a public key lives in browsers), and always the key's own account:
no path or body names another one. Errors are problem+json, as on the native API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, TypeVar

import msgspec
import redis.exceptions
import structlog
from aiohttp import web

from ingest.body import read_body
from ingest.context import begin_request
from ingest.dialects.native import bearer
from ingest.problems import GatewayError, ServiceUnavailableError
from ingest.validation import field_error, malformed_json
from shared.definitions import (
    Definition,
    DefinitionError,
    DefinitionName,
    PropertySpec,
    bad_property,
    delete_definition,
    get_definition,
    list_definitions,
    put_definition,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from ingest.context import Gateway
    from shared.accounts import KeyKind

log = structlog.get_logger("ingest.admin")

T = TypeVar("T")

ALLOWED_KEYS: frozenset[KeyKind] = frozenset({"private"})


class InvalidDefinitionError(GatewayError):
    status, title, code = 422, "Invalid event definition", "invalid_definition"


class DefinitionNotFoundError(GatewayError):
    status, title, code = 404, "No such event definition", "definition_not_found"


class DefinitionBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """PUT's body: a whole definition or just `{properties}`; the name in the path wins."""

    name: str | None = None
    properties: dict[str, PropertySpec] = {}
    description: str = ""


class DefinitionList(msgspec.Struct, frozen=True):
    definitions: list[Definition]


_BODY_DECODER = msgspec.json.Decoder(DefinitionBody)
# A definition as stored, so that a name over the limit is refused like any bad field.
_NAMED = Annotated[str, DefinitionName]
_ENCODER = msgspec.json.Encoder()


async def get_definitions(request: web.Request) -> web.Response:
    """Every definition of the key's account, by name."""
    gateway, account = await _authenticate(request)
    definitions = await _redis(list_definitions(gateway.redis, account))
    return _json(DefinitionList(definitions=definitions))


async def get_one(request: web.Request) -> web.Response:
    gateway, account = await _authenticate(request)
    name = request.match_info["name"]
    definition = await _redis(get_definition(gateway.redis, account, name))
    if definition is None:
        raise DefinitionNotFoundError(f"no definition {name!r}")
    return _json(definition)


async def put_one(request: web.Request) -> web.Response:
    """Create (201) or replace (200) a definition; front doors use it within their cache time.

    Raises:
        MalformedBodyError: not JSON.
        InvalidDefinitionError: not a definition: unknown type, misspelt key, name too long.
    """
    gateway, account = await _authenticate(request)
    body = await read_body(request, gateway.body_limits)
    definition = _decode(request.match_info["name"], body)
    existed = await _redis(get_definition(gateway.redis, account, definition.name))
    try:
        await _redis(put_definition(gateway.redis, account, definition))
    except (DefinitionError, RecursionError) as exc:
        raise InvalidDefinitionError(f"cannot compile the definition: {exc}") from None
    log.info("definition.stored", name=definition.name, replaced=existed is not None)
    return _json(definition, status=200 if existed else 201)


async def delete_one(request: web.Request) -> web.Response:
    gateway, account = await _authenticate(request)
    name = request.match_info["name"]
    if not await _redis(delete_definition(gateway.redis, account, name)):
        raise DefinitionNotFoundError(f"no definition {name!r}")
    log.info("definition.deleted", name=name)
    return web.Response(status=204)


def _decode(name: str, body: bytes) -> Definition:
    try:
        decoded = _BODY_DECODER.decode(body)
        msgspec.convert(name, _NAMED)
    except msgspec.ValidationError as exc:
        # msgspec says `properties[...]`; bad_property names the property.
        _, error = field_error(exc)
        where = f"{error.field}: " if error.field else ""
        detail = bad_property(msgspec.Raw(body)) or f"{where}{error.message}"
        raise InvalidDefinitionError(detail) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise malformed_json(body, exc) from None
    return Definition(name=name, properties=decoded.properties, description=decoded.description)


async def _authenticate(request: web.Request) -> tuple[Gateway, str]:
    """The gateway and the key's account: the only account this request may touch."""
    gateway, _, _ = begin_request(request)
    key = await gateway.keys.authenticate(bearer(request), allow=ALLOWED_KEYS)
    structlog.contextvars.bind_contextvars(account=key.account)
    return gateway, key.account


async def _redis(call: Awaitable[T]) -> T:
    """Raises:
    ServiceUnavailableError: Redis unreachable (503, retry), never a 500.
    """
    try:
        return await call
    except (redis.exceptions.RedisError, OSError):
        raise ServiceUnavailableError(
            "definitions are unavailable: Redis is unreachable", headers={"Retry-After": "1"}
        ) from None


def _json(value: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=_ENCODER.encode(value), status=status, content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/definitions", get_definitions, name="definitions")
    # `.+`: an event name may hold a `/` (sent as %2F).
    one = app.router.add_resource("/v1/definitions/{name:.+}", name="definition")
    one.add_route("GET", get_one)
    one.add_route("PUT", put_one)
    one.add_route("DELETE", delete_one)
