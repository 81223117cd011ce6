"""Catalog dialect (seeds 000/001): `POST /events`, one event or up to 100, Bearer key.

Answers 202 `{"accepted", "requestId"}`; errors as `{"error": {"code", "message",
"requestId", "details"}}`. The vendor's events carry no id, so each gets one minted here:
a resent event is a new event (nothing to deduplicate it by).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from aiohttp import web

from ingest.admission import admit
from ingest.body import read_body
from ingest.context import begin_request
from ingest.dialects.native import bearer
from ingest.dialects.routing import add_post_endpoint
from ingest.event_checks import EventChecks
from ingest.metrics import note_rejected
from ingest.problems import (
    EventErrors,
    FieldError,
    GatewayError,
    InvalidEventsError,
    MalformedBodyError,
    UnauthorizedError,
)
from ingest.validation import (
    MAX_LISTED,
    check_count,
    field_error,
    malformed_json,
    summarise,
)
from shared.definitions import builtin_definitions
from shared.envelope import Part
from shared.event import new_event_id
from shared.formats.catalog import (
    DIALECT,
    ITEMS,
    MAX_EVENTS,
    decode_body,
    properties_of,
    read_head,
)

if TYPE_CHECKING:
    from ingest.accounts import AccountView
    from shared.accounts import KeyKind

log = structlog.get_logger("ingest.catalog")

ROUTE = "catalog"
PATH = "/events"
# The vendor's key goes in browser tags as well as servers: both kinds may write events.
ALLOWED_KEYS: frozenset[KeyKind] = frozenset({"private", "public"})


class Accepted(msgspec.Struct, frozen=True):
    accepted: int
    requestId: str  # noqa: N815 - the vendor's camelCase


class ErrorDetail(msgspec.Struct, frozen=True):
    index: int
    field: str  # the event's field, e.g. "quantity"; "" for the event as a whole
    message: str


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    code: str
    message: str
    requestId: str  # noqa: N815 - the vendor's camelCase
    details: list[ErrorDetail] = []


class ErrorReply(msgspec.Struct, frozen=True):
    error: ErrorBody


# The front door's error codes -> (HTTP status, this dialect's code). Bad input is a plain 400.
_CODES: dict[str, tuple[int, str]] = {
    "malformed": (400, "malformed_body"),
    "invalid": (400, "invalid_events"),
    "too_many_events": (400, "too_many_events"),
    "unauthorized": (401, "unauthorized"),
    "forbidden": (403, "forbidden"),
    "too_large": (413, "payload_too_large"),
    "unsupported_encoding": (415, "unsupported_encoding"),
    "unavailable": (503, "service_unavailable"),
}
_ENCODER = msgspec.json.Encoder()


async def post_events(request: web.Request) -> web.Response:
    """Validate a batch, mint an id per event, answer 202 once Redis has them.

    Steps: authenticate; read the body within limits; decode and validate every event
    against its type's definition (the account's, else the built-in one); hand the body
    as received to the enqueuer.
    """
    gateway, request_id, received_ns = begin_request(request)
    key = await gateway.keys.authenticate(bearer(request), allow=ALLOWED_KEYS)
    structlog.contextvars.bind_contextvars(account=key.account)
    await admit(request, key, DIALECT)  # 503 backpressure, 429 rate limit
    body = await read_body(request, gateway.body_limits)
    view = await gateway.accounts.view(key.account)
    if view is None:
        raise UnauthorizedError("the key's account no longer exists")
    count = validate(body, view, EventChecks.now(gateway.settings))
    part = Part(
        account=key.account,
        dialect=DIALECT,
        request_id=request_id,
        received_ns=received_ns,
        count=count,
        body=body,
        ids={index: new_event_id() for index in range(count)},
    )
    await gateway.enqueuer.submit(part)
    log.debug("request.accepted", accepted=count)
    reply = Accepted(accepted=count, requestId=request_id)
    return web.Response(body=_ENCODER.encode(reply), status=202, content_type="application/json")


def validate(body: bytes, view: AccountView, checks: EventChecks) -> int:
    """How many events the body holds, once every one is found valid. All or nothing.

    Raises:
        MalformedBodyError: empty, not JSON (line and column named), or not an object or array.
        TooManyEventsError: more than 100 events.
        InvalidEventsError: some events invalid; each one listed by index and field.
    """
    if not body.strip():
        raise MalformedBodyError("empty body; send one event object or an array of them")
    try:
        events = decode_body(body)
    except msgspec.ValidationError:
        raise MalformedBodyError("expected one event object or an array of them") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise malformed_json(body, exc) from None
    check_count(len(events), MAX_EVENTS)
    rejected = [
        EventErrors(index=index, errors=[error])
        for index, event in enumerate(events)
        if (error := _check(event, view, checks)) is not None
    ]
    if rejected:
        note_rejected(len(rejected))
        raise InvalidEventsError(summarise(rejected), events=rejected[:MAX_LISTED])
    return len(events)


def _check(event: Any, view: AccountView, checks: EventChecks) -> FieldError | None:  # noqa: ANN401 - any JSON value
    try:
        head = read_head(event)
    except msgspec.ValidationError as exc:
        return field_error(exc)[1]
    # The event's own fields are its properties here.
    limits = checks.properties(event, "") or checks.items(event.get(ITEMS), ITEMS)
    if limits is not None:
        return limits
    error = checks.timestamp(head.timestamp) or view.check_event(
        head.type, properties_of(event), builtins=builtin_definitions(DIALECT)
    )
    if error is None:
        return None
    # The account view speaks of the canonical event; this vendor's fields are top-level.
    field = "type" if error.field == "name" else error.field.removeprefix("properties.")
    return FieldError(field=field, message=error.message)


def render_error(error: GatewayError, request_id: str) -> web.Response:
    """Every error on the catalog routes, in this dialect's shape."""
    status, code = _CODES.get(error.code) or (error.status, _status_code(error.status))
    details = [
        ErrorDetail(index=event.index, field=field.field, message=field.message)
        for event in error.events
        for field in event.errors
    ]
    body = ErrorBody(code=code, message=error.detail, requestId=request_id, details=details)
    return web.Response(
        body=_ENCODER.encode(ErrorReply(error=body)),
        status=status,
        content_type="application/json",
    )


def _status_code(status: int) -> str:
    """`not_found`, `method_not_allowed` ...: the code of an error with no code of its own."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_")
    except ValueError:
        return "error"


def add_routes(app: web.Application) -> None:
    add_post_endpoint(app, PATH, post_events, name=ROUTE, render=render_error)
