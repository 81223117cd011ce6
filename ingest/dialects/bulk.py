"""Bulk dialect (seed 004): one profile and up to 1000 events from browsers, JSON:API.

`POST /client/event-bulk-create/?company_id=PUBLIC_KEY` with a `revision` header. Answers
202 with no body; errors as JSON:API `{"errors": [{"id", "status", "code", "title",
"detail", "source": {"pointer"}}]}`, one entry per problem. Browsers call it, so every
answer allows any origin and preflights are answered. The vendor's rate limits (burst
10, steady 150/min per account) are enforced by ingest/admission.py.
"""

from __future__ import annotations

import re
from datetime import date
from typing import TYPE_CHECKING

import msgspec
import structlog
from aiohttp import web

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
    ForbiddenError,
    GatewayError,
    InvalidEventsError,
    MalformedBodyError,
    UnauthorizedError,
)
from ingest.validation import (
    MAX_LISTED,
    Checked,
    check_count,
    decode_each,
    field_error,
    malformed_json,
)
from shared.envelope import Part
from shared.event import new_event_id
from shared.formats.bulk import (
    DIALECT,
    DOCUMENT_DECODER,
    EVENT_DECODER,
    IDENTIFIERS,
    MAX_EVENTS,
    RAW_DOCUMENT_DECODER,
    BulkEvent,
    ProfileResource,
)

if TYPE_CHECKING:
    from ingest.accounts import AccountView
    from shared.accounts import KeyKind

log = structlog.get_logger("ingest.bulk")

ROUTE = "bulk"
PATH = "/client/event-bulk-create"  # served with and without the trailing slash
# Any valid key is authenticated, so that a private one gets the reason it is refused.
_ANY_KEY: frozenset[KeyKind] = frozenset({"private", "public"})
# YYYY-MM-DD[.suffix]; the date must exist, any date (a future revision too) is accepted.
_REVISION = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:\.[A-Za-z0-9_-]{1,32})?")
_EVENTS = "/data/attributes/events/data"
_PROFILE = "/data/attributes/profile/data/attributes"
_DOCUMENT = "/data/"
_CORS = {"Access-Control-Allow-Origin": "*"}
_PREFLIGHT = {
    **_CORS,
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Max-Age": "86400",
}


class Source(msgspec.Struct, frozen=True, omit_defaults=True):
    pointer: str
    parameter: str | None = None


class ErrorMeta(msgspec.Struct, frozen=True):
    request_id: str


class ErrorEntry(msgspec.Struct, frozen=True):
    id: str
    status: int
    code: str
    title: str
    detail: str
    source: Source
    meta: ErrorMeta


class ErrorDocument(msgspec.Struct, frozen=True):
    errors: list[ErrorEntry]


# HTTP status -> the vendor's (code, title).
_CODES = {
    400: ("invalid", "Invalid input."),
    401: ("not_authenticated", "Authentication credentials were not provided."),
    403: ("permission_denied", "You do not have permission to perform this action."),
    404: ("not_found", "Not found."),
    405: ("method_not_allowed", "Method not allowed."),
    408: ("request_timeout", "Request timeout."),
    413: ("request_too_large", "Request too large."),
    415: ("unsupported_media_type", "Unsupported media type."),
    429: ("throttled", "Request was throttled."),
    503: ("service_unavailable", "Service unavailable; retry later."),
}
_ENCODER = msgspec.json.Encoder()
_MISSING_OR_UNKNOWN = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]+)`")


async def post_events(request: web.Request) -> web.Response:
    """Validate the document, enqueue its events, answer 202 (no body) once Redis has them.

    Steps: authenticate the public key of `company_id`; check the `revision` header; read
    the body within limits; decode and validate (fast path: the whole document at once; on
    any error, event by event to point at every problem); mint ids for events without a
    `unique_id`; hand the body as received to the enqueuer.
    """
    gateway, request_id, received_ns = begin_request(request)
    company_id = request.query.get("company_id")
    if not company_id:
        raise UnauthorizedError("company_id is missing: pass your public key as ?company_id=")
    key = await gateway.keys.authenticate(company_id, allow=_ANY_KEY)
    structlog.contextvars.bind_contextvars(account=key.account)
    if key.kind != "public":
        raise ForbiddenError(
            "company_id takes a public key: a private key in a URL leaks into browser "
            "history, server logs and proxies; revoke this one and use a public key"
        )
    check_revision(request.headers.get("revision"))
    await admit(request, key, DIALECT)  # 503 backpressure, 429 rate limit
    body = await read_body(request, gateway.body_limits)
    view = await gateway.accounts.view(key.account)
    if view is None:
        raise UnauthorizedError("the key's account no longer exists")

    events = validate(body, view, EventChecks.now(gateway.settings))
    part = Part(
        account=key.account,
        dialect=DIALECT,
        request_id=request_id,
        received_ns=received_ns,
        count=len(events),
        body=body,
        ids={i: new_event_id() for i, e in enumerate(events) if e.attributes.unique_id is None},
    )
    await gateway.enqueuer.submit(part)
    log.debug("request.accepted", accepted=len(events))
    return web.Response(status=202, headers=_CORS)


def check_revision(value: str | None) -> str:
    """Raises:
    BadParameterError: missing, not YYYY-MM-DD[.suffix], or not a calendar date.
    """
    expected = "YYYY-MM-DD[.suffix], e.g. 2024-10-15"
    if not value or not value.strip():
        raise BadParameterError(
            f"the revision header is required ({expected})", parameter="revision"
        )
    match = _REVISION.fullmatch(value.strip())
    if match is None:
        raise BadParameterError(f"revision {value[:64]!r} is not {expected}", parameter="revision")
    try:
        date(*(int(part) for part in match.groups()))
    except ValueError:
        raise BadParameterError(
            f"revision {value[:64]!r} is not a real date", parameter="revision"
        ) from None
    return value.strip()


def validate(body: bytes, view: AccountView, checks: EventChecks) -> list[BulkEvent]:
    """The document's events, once every one is found valid. All or nothing.

    Raises:
        MalformedBodyError: empty, or not JSON (line and column named).
        InvalidEventsError: the document, the profile or some events are invalid; each
            problem with the JSON pointer to it.
        TooManyEventsError: more than 1000 events (none at all: MalformedBodyError).
    """
    if not body.strip():
        raise MalformedBodyError("empty body; send a JSON:API event-bulk-create document")
    try:
        document = DOCUMENT_DECODER.decode(body)
    except msgspec.ValidationError:
        checked, profile = _decode_each(body)  # some part is invalid: find every problem
    except (msgspec.DecodeError, RecursionError) as exc:
        raise malformed_json(body, exc) from None
    else:
        _check_count(len(document.events))
        checked, profile = Checked(list(enumerate(document.events)), []), document.profile

    _check_profile(profile, checks)

    def check(event: BulkEvent) -> FieldError | None:
        attrs = event.attributes
        error = checks.timestamp(attrs.time, "attributes.time") or checks.properties(
            attrs.properties, "attributes.properties"
        )
        if error is not None:
            return error
        error = view.check_event(attrs.metric.data.attributes.name, attrs.properties)
        if error is None:
            return None
        # The account view names the canonical event's fields: `name` is the metric's.
        field = "metric.data.attributes.name" if error.field == "name" else error.field
        return FieldError(field=f"attributes.{field}", message=error.message)

    checked = checked.check(check)
    if checked.rejected:
        note_rejected(len(checked.rejected))
        problems = [
            FieldError(field=_pointer(f"{_EVENTS}/{e.index}", field), message=field.message)
            for e in checked.rejected
            for field in e.errors
        ]
        raise InvalidEventsError(
            f"{len(checked.rejected)} invalid event(s); see each error's source.pointer",
            events=[EventErrors(index=0, errors=problems[:MAX_LISTED])],
        )
    return [event for _, event in checked.valid]


def _check_profile(profile: ProfileResource, checks: EventChecks) -> None:
    """Raises:
    InvalidEventsError: a profile without any identifier, or with too many properties.
    """
    if not profile.identity():
        raise _invalid(_PROFILE, f"the profile needs one of {', '.join(IDENTIFIERS)} (or its id)")
    too_big = checks.properties(profile.attributes.properties)
    if too_big is not None:
        raise _invalid(f"{_PROFILE}/properties", too_big.message)


def _decode_each(body: bytes) -> tuple[Checked[BulkEvent], ProfileResource]:
    """The document around its events, then each event on its own.

    Raises:
        InvalidEventsError: the document or its profile is invalid (pointed at).
        TooManyEventsError, MalformedBodyError: too many events, or none.
    """
    try:
        document = RAW_DOCUMENT_DECODER.decode(body)
    except msgspec.ValidationError as exc:
        found = field_error(exc)[1]
        raise _invalid(_pointer("", found), found.message) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        # The typed decode may stop at a wrong type before reaching malformed JSON further on.
        raise malformed_json(body, exc) from None
    _check_count(len(document.events))
    return decode_each(document.events, EVENT_DECODER), document.profile


def _check_count(count: int) -> None:
    try:
        check_count(count, MAX_EVENTS)
    except GatewayError as exc:
        exc.events = [EventErrors(index=0, errors=[FieldError(field=_EVENTS, message=exc.detail)])]
        raise


def _invalid(pointer: str, message: str) -> InvalidEventsError:
    return InvalidEventsError(
        message, events=[EventErrors(index=0, errors=[FieldError(pointer, message)])]
    )


def _pointer(base: str, error: FieldError) -> str:
    """The JSON pointer (RFC 6901) to an error's field below `base`; a missing or unknown
    member is pointed at itself rather than at the object holding it."""
    segments = error.field.split(".") if error.field else []
    named = _MISSING_OR_UNKNOWN.match(error.message)
    if named and segments[-1:] != [named.group(1)]:  # field_error may have named it already
        segments.append(named.group(1))
    escaped = (s.replace("~", "~0").replace("/", "~1") for s in segments)
    return "/".join([base, *escaped]) or _DOCUMENT


async def preflight(request: web.Request) -> web.Response:
    """CORS preflight: browsers ask before sending the `revision` header cross-origin."""
    requested = request.headers.get("Access-Control-Request-Headers", "revision, content-type")
    return web.Response(
        status=204, headers={**_PREFLIGHT, "Access-Control-Allow-Headers": requested}
    )


def render_error(error: GatewayError, request_id: str) -> web.Response:
    """Every error on the bulk routes as a JSON:API error document; bad input is a 400."""
    status = 400 if error.status == 422 else error.status  # noqa: PLR2004 - HTTP statuses
    code, title = _CODES.get(status, ("error", "An error occurred."))
    if status in (401, 403):
        sources = [(error.detail, Source(pointer=_DOCUMENT, parameter="company_id"))]
    elif isinstance(error, BadParameterError):
        sources = [(error.detail, Source(pointer=_DOCUMENT, parameter=error.parameter))]
    elif error.events:
        sources = [(f.message, Source(pointer=f.field)) for e in error.events for f in e.errors]
    else:
        sources = [(error.detail, Source(pointer=_DOCUMENT))]
    entries = [
        ErrorEntry(
            id=new_event_id(),
            status=status,
            code=code,
            title=title,
            detail=detail,
            source=source,
            meta=ErrorMeta(request_id=request_id),
        )
        for detail, source in sources
    ]
    return web.Response(
        body=_ENCODER.encode(ErrorDocument(errors=entries)),
        status=status,
        content_type="application/vnd.api+json",
        headers=_CORS,
    )


def add_routes(app: web.Application) -> None:
    add_post_endpoint(
        app, PATH, post_events, name=ROUTE, render=render_error, others={"OPTIONS": preflight}
    )
