"""Import dialect (seed 003): `POST /api/v1/events?service_id=ACCOUNT`, `access_token` header.

Every answer is the vendor's `{"status", "code", "message", "data"}`: 20000 OK, else a
5-digit code whose first three digits are its family (400 request, 401 service, 402 token,
404 limits, 500 server). `event_log_id` is the dedupe key; events must be registered
(the built-in `df_` events, or the account's own definitions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import msgspec
import structlog
from aiohttp import web

from ingest.admission import admit
from ingest.body import read_body
from ingest.context import begin_request
from ingest.dialects.routing import add_post_endpoint
from ingest.event_checks import EventChecks
from ingest.metrics import note_rejected
from ingest.problems import GatewayError, MalformedBodyError, UnauthorizedError
from ingest.validation import (
    decode_each,
    field_error,
    malformed_json,
)
from shared.definitions import builtin_definitions
from shared.envelope import Part
from shared.formats.import_ import (
    DIALECT,
    EVENT_DECODER,
    MAX_EVENTS,
    MAX_ITEMS,
    REQUEST_DECODER,
    Common,
    ImportEvent,
)
from shared.logging import redact_text

if TYPE_CHECKING:
    from ingest.accounts import AccountView
    from ingest.problems import FieldError
    from shared.accounts import KeyKind

log = structlog.get_logger("ingest.import")

ROUTE = "import_events"  # aiohttp refuses a keyword ("import") as a route name
PATH = "/api/v1/events"
# A server-to-server API: its token would leak from a browser, so public keys are refused.
ALLOWED_KEYS: frozenset[KeyKind] = frozenset({"private"})
TOKEN_HEADER = "access_token"  # noqa: S105 - a header name, not a secret


class ResultCode(NamedTuple):
    code: str
    message: str
    status: int  # the HTTP status it is answered with


OK = ResultCode("20000", "OK", 200)
BAD_REQUEST = ResultCode("40000", "BAD_REQUEST", 400)
VALIDATION_FAILURE = ResultCode("40001", "VALIDATION_FAILURE", 400)
MISSING_IDENTITY = ResultCode("40002", "MISSING_IDENTITY", 400)
INVALID_EVENT_LOG_ID = ResultCode("40003", "INVALID_EVENT_LOG_ID", 400)
UNREGISTERED_EVENT = ResultCode("40004", "UNREGISTERED_EVENT", 400)
INVALID_PROPERTY_TYPE = ResultCode("40005", "INVALID_PROPERTY_TYPE", 400)
INVALID_SERVICE_ID = ResultCode("40101", "INVALID_SERVICE_ID", 403)
INVALID_TOKEN = ResultCode("40201", "INVALID_TOKEN", 401)
TOO_MANY_REQUEST = ResultCode("40401", "TOO_MANY_REQUEST", 429)
TOO_MANY_EVENTS = ResultCode("40402", "TOO_MANY_EVENTS", 400)
# Beyond the vendor's table, in its pattern (40000 BAD_REQUEST, 50000 INTERNAL_SERVER_ERROR):
# `<HTTP status>00` and the status's name.
METHOD_NOT_ALLOWED = ResultCode("40500", "METHOD_NOT_ALLOWED", 405)
REQUEST_TIMEOUT = ResultCode("40800", "REQUEST_TIMEOUT", 408)
PAYLOAD_TOO_LARGE = ResultCode("41300", "PAYLOAD_TOO_LARGE", 413)
UNSUPPORTED_MEDIA_TYPE = ResultCode("41500", "UNSUPPORTED_MEDIA_TYPE", 415)
INTERNAL_SERVER_ERROR = ResultCode("50000", "INTERNAL_SERVER_ERROR", 500)
SERVICE_UNAVAILABLE = ResultCode("50300", "SERVICE_UNAVAILABLE", 503)

# The front door's own errors whose vendor code is not just their status's (below).
_GENERIC: dict[str, ResultCode] = {
    "invalid": VALIDATION_FAILURE,
    "too_many_events": TOO_MANY_EVENTS,
    "unauthorized": INVALID_TOKEN,
    "forbidden": INVALID_TOKEN._replace(status=403),  # a public key
}
# Any other error, by its HTTP status (a malformed body, a 405, a rate limit ...).
_BY_STATUS = {
    result.status: result
    for result in (
        BAD_REQUEST,
        METHOD_NOT_ALLOWED,
        REQUEST_TIMEOUT,
        PAYLOAD_TOO_LARGE,
        UNSUPPORTED_MEDIA_TYPE,
        TOO_MANY_REQUEST,
        INTERNAL_SERVER_ERROR,
        SERVICE_UNAVAILABLE,
    )
}
# The codes an event's problem may have, by code.
_EVENT_RESULTS = {
    result.code: result
    for result in (
        VALIDATION_FAILURE,
        INVALID_EVENT_LOG_ID,
        UNREGISTERED_EVENT,
        INVALID_PROPERTY_TYPE,
    )
}


class EventProblem(msgspec.Struct, frozen=True, order=True):
    """Why the event at `index` was refused, with its own code; the `data` of a 4000x."""

    index: int
    code: str
    field: str
    message: str


# `true` (the vendor's 20000 and 40402), a sentence, or each refused event's problem.
Data = bool | str | list[EventProblem]


class Reply(msgspec.Struct, frozen=True):
    """The vendor's envelope of every answer, in its field order."""

    status: bool
    code: str
    message: str
    data: Data


class ImportApiError(GatewayError):
    """A failure with one of this vendor's own codes; `data` is what the answer carries."""

    def __init__(
        self,
        result: ResultCode,
        detail: str,
        *,
        data: Data | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.result = result
        self.code = result.message.lower()  # what the log line of the refusal says
        self.status = status or result.status
        self.title = result.message
        self.data = detail if data is None else data


class _Shell(msgspec.Struct, frozen=True):
    """A request with its parts undecoded: for finding every problem once one is known."""

    common: msgspec.Raw
    events: list[msgspec.Raw]


_SHELL_DECODER = msgspec.json.Decoder(_Shell)
_COMMON_DECODER = msgspec.json.Decoder(Common)
_ENCODER = msgspec.json.Encoder()
_OK_BODY = _ENCODER.encode(Reply(status=True, code=OK.code, message=OK.message, data=True))


async def post_events(request: web.Request) -> web.Response:
    """Validate a request, answer 20000 once Redis has its events.

    Steps: authenticate the `access_token`; check it belongs to `service_id`; read the body
    within limits; decode and validate (identity, limits, UUIDs, registration, property
    types); hand the body as received to the enqueuer.
    """
    gateway, request_id, received_ns = begin_request(request)
    token = request.headers.get(TOKEN_HEADER)
    if not token:
        raise ImportApiError(INVALID_TOKEN, f"no {TOKEN_HEADER} header")
    key = await gateway.keys.authenticate(token, allow=ALLOWED_KEYS)
    structlog.contextvars.bind_contextvars(account=key.account)
    service_id = request.query.get("service_id")
    if not service_id:
        raise ImportApiError(INVALID_SERVICE_ID, "service_id query parameter missing", status=400)
    if service_id != key.account:
        raise ImportApiError(INVALID_SERVICE_ID, "the access_token is not this service_id's")
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
    )
    await gateway.enqueuer.submit(part)
    log.debug("request.accepted", accepted=count)
    return web.Response(
        body=_OK_BODY, content_type="application/json", headers={"X-Request-Id": request_id}
    )


def validate(body: bytes, view: AccountView, checks: EventChecks) -> int:
    """How many events the request holds, once all are found valid. All or nothing.

    Raises:
        MalformedBodyError: empty or not JSON (40000, line and column named).
        ImportApiError: anything else, with its code; event problems are listed in `data`.
    """
    if not body.strip():
        raise MalformedBodyError("empty body; send {common, events}")
    common, events, problems = _decode(body)
    if not common.identity.canonical():
        raise ImportApiError(MISSING_IDENTITY, _NO_IDENTITY)
    if any(p.code == TOO_MANY_EVENTS.code for p in problems):
        raise _too_many(f"an event has more than {MAX_ITEMS} event_items")
    problems.extend(p for i, event in events if (p := _check(i, event, view, checks)))
    if problems:
        note_rejected(len({p.index for p in problems}))
        problems.sort()
        first = problems[0]
        result = _EVENT_RESULTS[first.code]
        raise ImportApiError(result, f"event {first.index}: {first.message}", data=problems)
    return len(events)


def _decode(body: bytes) -> tuple[Common, list[tuple[int, ImportEvent]], list[EventProblem]]:
    """The request's identity, its valid events by index, and the problems of the others.

    Fast path: the whole request in one decode. On any invalid part, part by part, so that
    every problem is listed.
    """
    try:
        request = REQUEST_DECODER.decode(body)
    except msgspec.ValidationError:
        pass  # found below, with every other problem
    except (msgspec.DecodeError, RecursionError) as exc:
        raise malformed_json(body, exc) from None
    else:
        _check_count(len(request.events))
        return request.common, list(enumerate(request.events)), []
    try:
        shell = _SHELL_DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise _shape_error(exc, "") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        # The fast path stopped at a wrong type before reaching the bad syntax or depth.
        raise malformed_json(body, exc) from None
    _check_count(len(shell.events))
    try:
        common = _COMMON_DECODER.decode(shell.common)
    except msgspec.ValidationError as exc:
        raise _shape_error(exc, "common") from None
    checked = decode_each(shell.events, EVENT_DECODER)
    problems = [
        _decode_problem(rejected.index, error)
        for rejected in checked.rejected
        for error in rejected.errors
    ]
    return common, checked.valid, problems


def _check_count(count: int) -> None:
    if count > MAX_EVENTS:
        raise _too_many(f"{count} events; at most {MAX_EVENTS} per request")
    if count == 0:
        raise ImportApiError(VALIDATION_FAILURE, "events is empty; send at least one event")


def _too_many(detail: str) -> ImportApiError:
    # The seed's exact body: data is `true`, whatever the reason.
    return ImportApiError(TOO_MANY_EVENTS, detail, data=True)


def _shape_error(exc: msgspec.ValidationError, within: str) -> ImportApiError:
    """The request (or its `common`) is not the documented shape: no identity at all is
    MISSING_IDENTITY, anything else VALIDATION_FAILURE."""
    _, error = field_error(exc)
    field = ".".join(part for part in (within, error.field) if part)
    absent = "missing required field" in error.message or "got `null`" in error.message
    if field in ("common", "common.identity") and absent:
        return ImportApiError(MISSING_IDENTITY, _NO_IDENTITY)
    where = f"{field}: " if field else ""
    return ImportApiError(VALIDATION_FAILURE, f"{where}{error.message}")


_NO_IDENTITY = (
    "common.identity needs one of external_id, phone_no, email, kakao_user_id, line_user_id"
)


def _decode_problem(index: int, error: FieldError) -> EventProblem:
    if error.field == "event_log_id":  # missing, or not a UUID
        result = INVALID_EVENT_LOG_ID
    elif error.field == "event_items" and "length <=" in error.message:
        result = TOO_MANY_EVENTS
    else:
        result = VALIDATION_FAILURE
    return EventProblem(index=index, code=result.code, field=error.field, message=error.message)


def _check(
    index: int, event: ImportEvent, view: AccountView, checks: EventChecks
) -> EventProblem | None:
    """A decoded event's problem: its time too far ahead or back, too many properties,
    not registered, or properties that don't match the definition."""
    too_much = (
        checks.timestamp(event.event_datetime, "event_datetime")
        or checks.properties(event.event_properties or {}, "event_properties")
        or checks.items(event.event_items, "event_items")
    )
    if too_much is not None:
        return EventProblem(
            index=index,
            code=VALIDATION_FAILURE.code,
            field=too_much.field,
            message=too_much.message,
        )
    error = view.check_event(
        event.event_name,
        event.event_properties or {},
        builtins=builtin_definitions(DIALECT),
        registered_only=True,  # the vendor loads registered events only
    )
    if error is None:
        return None
    if error.field == "name":
        return EventProblem(
            index=index, code=UNREGISTERED_EVENT.code, field="event_name", message=error.message
        )
    field = "event_" + error.field  # properties.x -> event_properties.x
    return EventProblem(
        index=index, code=INVALID_PROPERTY_TYPE.code, field=field, message=error.message
    )


def render_error(error: GatewayError, request_id: str) -> web.Response:
    """Every error on the import routes, as `{"status": false, "code", "message", "data"}`."""
    if isinstance(error, ImportApiError):
        result, status, data = error.result, error.status, _public(error.data)
    else:
        result = _GENERIC.get(error.code) or _by_status(error.status)
        status = result.status
        data = True if result == TOO_MANY_EVENTS else error.detail
    reply = Reply(status=False, code=result.code, message=result.message, data=data)
    return web.Response(
        body=_ENCODER.encode(reply),
        status=status,
        content_type="application/json",
        headers={"X-Request-Id": request_id},
    )


def _public(data: Data) -> Data:
    """Problems quote what was sent: hashed as the logs and every other answer have it
    (ingest.problems masks `detail`; `data` is this dialect's own)."""
    if isinstance(data, str):
        return redact_text(data)
    if isinstance(data, list):
        return [
            msgspec.structs.replace(p, field=redact_text(p.field), message=redact_text(p.message))
            for p in data
        ]
    return data


def _by_status(status: int) -> ResultCode:
    # A status without an entry still gets a code of the family: `<status>00`.
    return _BY_STATUS.get(status) or ResultCode(f"{status}00", "ERROR", status)


def add_routes(app: web.Application) -> None:
    add_post_endpoint(app, PATH, post_events, name=ROUTE, render=render_error)
