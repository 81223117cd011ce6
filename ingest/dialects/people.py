"""People dialect (seed 002): one event for one known person against a registered definition.

`POST /peopleevents/2/persons/{personId}/definitions/{definitionId}/events?identifierType=`,
key as `Authorization: App KEY` (or `Bearer KEY`), private keys only. Answers 201 with the
stored event; errors as the vendor's `{"requestError": {"serviceException": {"messageId",
"text", "validationErrors"?}}}`. The vendor's 250 requests/s per account is enforced by
ingest/admission.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from aiohttp import web

from ingest import persons
from ingest.admission import admit
from ingest.body import read_body
from ingest.context import begin_request
from ingest.dialects.routing import add_post_endpoint
from ingest.event_checks import EventChecks
from ingest.metrics import note_rejected
from ingest.problems import (
    BadParameterError,
    EventErrors,
    FieldError,
    GatewayError,
    MalformedBodyError,
    UnauthorizedError,
)
from ingest.validation import field_error, malformed_json
from shared.definitions import CompiledDefinition, Definition
from shared.envelope import Part
from shared.event import new_event_id, utc_from_ns
from shared.formats.people import (
    BODY_DECODER,
    DEFINITION,
    DIALECT,
    IDENTIFIER_TYPE,
    ITEMS,
    PERSON,
)
from shared.persons import PEOPLE_TYPES

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime

    from shared.accounts import KeyKind

log = structlog.get_logger("ingest.people")

ROUTE = "people"
PATH = "/peopleevents/2/persons/{personId}/definitions/{definitionId}/events"
# The vendor's keys are server-side: a public (browser) key gets the 403 the seed lists.
ALLOWED_KEYS: frozenset[KeyKind] = frozenset({"private"})
_SCHEMES = ("app", "bearer")


class UnknownDefinitionError(GatewayError):
    status, title, code = 404, "No such event definition", "definition_not_found"


class InvalidPropertiesError(GatewayError):
    """The properties do not match the definition; `events[0]` names each bad one."""

    status, title, code = 400, "Properties do not match the definition", "invalid_properties"


class Metadata(msgspec.Struct, frozen=True):
    source: str = "API"


class Created(msgspec.Struct, frozen=True):
    """The stored event, as the vendor answers it."""

    eventId: str  # noqa: N815 - the vendor's camelCase
    definitionId: str  # noqa: N815
    occurredTime: str  # noqa: N815
    properties: dict[str, Any] | None
    metadata: Metadata


class ServiceException(msgspec.Struct, frozen=True, omit_defaults=True):
    messageId: str  # noqa: N815 - the vendor's camelCase
    text: str
    validationErrors: dict[str, list[str]] = {}  # noqa: N815


class RequestError(msgspec.Struct, frozen=True):
    serviceException: ServiceException  # noqa: N815


class ErrorReply(msgspec.Struct, frozen=True):
    requestError: RequestError  # noqa: N815


# HTTP status -> the vendor's messageId.
_MESSAGE_IDS = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "TOO_MANY_REQUESTS",
    503: "SERVICE_UNAVAILABLE",
}
_ENCODER = msgspec.json.Encoder()


def app_key(request: web.Request) -> str | None:
    """The key of `Authorization: App KEY` (the vendor's scheme) or `Bearer KEY`."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() in _SCHEMES else None


async def post_event(request: web.Request) -> web.Response:
    """Check one event against its person and definition, answer 201 once Redis has it.

    Steps: authenticate; check identifierType; read and decode the body; find the person
    (path segments arrive percent-decoded: `%2B` is `+`, `%2F` part of the id); find the
    definition; check every property; mint the event id the answer names; enqueue.
    """
    gateway, request_id, received_ns = begin_request(request)
    # The path holds a person's email or phone: log the route, never the path.
    structlog.contextvars.bind_contextvars(route=PATH)
    key = await gateway.keys.authenticate(app_key(request), allow=ALLOWED_KEYS)
    structlog.contextvars.bind_contextvars(account=key.account)
    kind = _identifier_type(request.query.get("identifierType"))
    await admit(request, key, DIALECT)  # 503 backpressure, 429 rate limit
    body = await read_body(request, gateway.body_limits)
    properties = _decode(body)
    _check_limits(properties or {}, EventChecks.now(gateway.settings))
    view = await gateway.accounts.view(key.account)
    if view is None:
        raise UnauthorizedError("the key's account no longer exists")
    person_id = request.match_info["personId"]
    definition_id = request.match_info["definitionId"]
    await request.app[persons.PERSONS].find(key.account, kind, person_id)
    definition = view.definitions.get(definition_id)
    if definition is None:
        raise UnknownDefinitionError(f"no event definition {definition_id!r}")
    errors = property_errors(definition, properties or {})
    if errors:
        shown = "; ".join(f"{e.field}: {e.message}" for e in errors)
        note_rejected(1)
        raise InvalidPropertiesError(
            f"properties do not match definition {definition_id!r}: {shown}",
            events=[EventErrors(index=0, errors=errors)],
        )

    event_id = new_event_id()
    part = Part(
        account=key.account,
        dialect=DIALECT,
        request_id=request_id,
        received_ns=received_ns,
        count=1,
        body=body,
        ids={0: event_id},
        context={DEFINITION: definition_id, PERSON: person_id, IDENTIFIER_TYPE: kind},
    )
    await gateway.enqueuer.submit(part)
    log.debug("request.accepted", accepted=1)
    reply = Created(
        eventId=event_id,
        definitionId=definition_id,
        occurredTime=occurred_time(utc_from_ns(received_ns)),
        properties=properties,
        metadata=Metadata(),
    )
    return web.Response(body=_ENCODER.encode(reply), status=201, content_type="application/json")


def occurred_time(at: datetime) -> str:
    """The vendor's timestamp: UTC, seven fractional digits, `Z` (2024-05-17T15:47:50.4139152Z).

    Made from the same microseconds the sink stores, so the answer matches the row.
    """
    return f"{at:%Y-%m-%dT%H:%M:%S}.{at.microsecond:06d}0Z"


def property_errors(
    definition: CompiledDefinition, properties: Mapping[str, Any]
) -> list[FieldError]:
    """Every property that does not match the definition; none if they all do.

    The definition's compiled type stops at the first problem; only then is each property
    checked on its own, so that the answer names them all.
    """
    whole = definition.check(properties)
    if whole is None:
        return []
    errors = []
    for name, spec in definition.definition.properties.items():
        alone = CompiledDefinition(
            Definition(name=definition.definition.name, properties={name: spec})
        )
        error = alone.check({name: properties[name]} if name in properties else {})
        if error is not None:
            found = field_error(error)[1]
            # A missing required property is reported at the object: name the property.
            errors.append(
                FieldError(field=f"properties.{found.field or name}", message=found.message)
            )
    if not errors:  # never let a refused whole through because its parts passed alone
        found = field_error(whole)[1]
        errors.append(
            FieldError(field=f"properties.{found.field}".rstrip("."), message=found.message)
        )
    return errors


def _check_limits(properties: dict[str, Any], checks: EventChecks) -> None:
    """Raises:
    InvalidPropertiesError: too many properties, or items (`itemsInCart`).
    """
    error = checks.properties(properties) or checks.items(
        properties.get(ITEMS), f"properties.{ITEMS}"
    )
    if error is not None:
        raise InvalidPropertiesError(
            f"{error.field}: {error.message}", events=[EventErrors(index=0, errors=[error])]
        )


def _identifier_type(value: str | None) -> str:
    """Raises:
    BadParameterError: missing, or not one of the vendor's identifier types.
    """
    if value in PEOPLE_TYPES:
        return value
    allowed = ", ".join(PEOPLE_TYPES)
    if value is None:
        raise BadParameterError(
            f"identifierType is required; one of {allowed}", parameter="identifierType"
        )
    raise BadParameterError(
        f"identifierType {value[:64]!r} is not one of {allowed}", parameter="identifierType"
    )


def _decode(body: bytes) -> dict[str, Any] | None:
    """The body's properties (None if null or absent).

    Raises:
        MalformedBodyError: empty, not JSON (line and column named), or not `{"properties"}`.
    """
    if not body.strip():
        raise MalformedBodyError('empty body; send {"properties": {...}}')
    try:
        return BODY_DECODER.decode(body).properties
    except msgspec.ValidationError as exc:
        field = field_error(exc)[1]
        where = f" at {field.field}" if field.field else ""
        raise MalformedBodyError(
            f'expected {{"properties": {{...}}}}{where}: {field.message}'
        ) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise malformed_json(body, exc) from None


def render_error(error: GatewayError, _request_id: str) -> web.Response:
    """Every error on the people routes, in the vendor's shape; bad input is a plain 400."""
    status = 400 if error.status == 422 else error.status  # noqa: PLR2004 - HTTP statuses
    validation = {field.field: [field.message] for event in error.events for field in event.errors}
    exception = ServiceException(
        messageId=_MESSAGE_IDS.get(status, "GENERAL_ERROR"),
        text=error.detail,
        validationErrors=validation,
    )
    return web.Response(
        body=_ENCODER.encode(ErrorReply(requestError=RequestError(serviceException=exception))),
        status=status,
        content_type="application/json",
    )


def add_routes(app: web.Application) -> None:
    persons.install(app)
    add_post_endpoint(app, PATH, post_event, name=ROUTE, render=render_error)
