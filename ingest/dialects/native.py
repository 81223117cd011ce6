"""Native API: `POST /v1/events`, one event or an array, Bearer key, problem+json errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
import structlog
from aiohttp import web

from ingest.body import read_body
from ingest.context import begin_request
from ingest.problems import (
    EventErrors,
    FieldError,
    InvalidEventsError,
    MalformedBodyError,
    TooManyEventsError,
)
from ingest.validation import (
    MAX_LISTED,
    check_timestamp,
    field_error,
    future_limit,
    malformed_json,
    summarise,
)
from shared.envelope import Part
from shared.event import new_event_id
from shared.formats.native import DIALECT, EVENT_DECODER, NativeEvent, decode_body

if TYPE_CHECKING:
    from datetime import datetime

    from shared.accounts import KeyKind

log = structlog.get_logger("ingest.native")

ROUTE = "native"
# Public (browser) keys may write events; that is all this route does.
ALLOWED_KEYS: frozenset[KeyKind] = frozenset({"private", "public"})


class Accepted(msgspec.Struct, frozen=True):
    accepted: int
    rejected: list[EventErrors]
    request_id: str


_ENCODER = msgspec.json.Encoder()


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token if scheme.lower() == "bearer" else None


async def post_events(request: web.Request) -> web.Response:
    """Validate a batch, enqueue its valid events, answer 202 once Redis has them.

    Steps: authenticate; read the body within limits; decode and validate (fast path:
    the whole batch at once; on any error, event by event to list every problem);
    mint ids for events without one; hand the body as received to the enqueuer.
    """
    gateway, request_id, received_ns = begin_request(request)
    key = await gateway.keys.authenticate(bearer(request), allow=ALLOWED_KEYS)
    structlog.contextvars.bind_contextvars(account=key.account)
    strict = request.query.get("strict", "true").lower() not in ("false", "0", "no")
    body = await read_body(request, gateway.body_limits)

    events, rejected = _validate(body, gateway.settings.max_events, gateway.settings.max_future_s)
    if rejected and (strict or not events):
        raise InvalidEventsError(summarise(rejected), events=rejected[:MAX_LISTED])

    ids = {i: new_event_id() for i, event in events if event.id is None}
    part = Part(
        account=key.account,
        dialect=DIALECT,
        request_id=request_id,
        received_ns=received_ns,
        count=len(events),
        body=body,
        ids=ids,
        skip=[e.index for e in rejected],
    )
    await gateway.enqueuer.submit(part)
    log.debug("request.accepted", accepted=len(events), rejected=len(rejected))
    reply = Accepted(accepted=len(events), rejected=rejected[:MAX_LISTED], request_id=request_id)
    return web.Response(body=_ENCODER.encode(reply), status=202, content_type="application/json")


def _validate(
    body: bytes, max_events: int, max_future_s: int
) -> tuple[list[tuple[int, NativeEvent]], list[EventErrors]]:
    """(index, event) of the valid events and the errors of the others.

    Raises:
        MalformedBodyError: not JSON, or not an object or array of objects.
        TooManyEventsError: more than `max_events`.
    """
    if not body.strip():
        raise MalformedBodyError("empty body; send one event object or an array of them")
    try:
        decoded = list(enumerate(decode_body(body)))
    except msgspec.ValidationError:
        decoded = []  # some event is invalid: find every one below
    except msgspec.DecodeError as exc:
        raise malformed_json(body, exc) from None
    else:
        _check_count(len(decoded), max_events)
        return _check_timestamps(decoded, max_future_s)
    return _validate_each(body, max_events, max_future_s)


def _validate_each(
    body: bytes, max_events: int, max_future_s: int
) -> tuple[list[tuple[int, NativeEvent]], list[EventErrors]]:
    try:
        raws = msgspec.json.decode(body, type=list[msgspec.Raw] | msgspec.Raw)
    except msgspec.ValidationError as exc:
        raise MalformedBodyError(
            f"expected one event object or an array of them: {field_error(exc)[1].message}"
        ) from None
    raw_list = raws if isinstance(raws, list) else [raws]
    _check_count(len(raw_list), max_events)
    valid: list[tuple[int, NativeEvent]] = []
    rejected: list[EventErrors] = []
    for index, raw in enumerate(raw_list):
        try:
            valid.append((index, EVENT_DECODER.decode(raw)))
        except msgspec.ValidationError as exc:
            rejected.append(EventErrors(index=index, errors=[field_error(exc)[1]]))
    checked, late = _check_timestamps(valid, max_future_s)
    return checked, sorted(rejected + late, key=lambda e: e.index)


def _check_count(count: int, max_events: int) -> None:
    if count > max_events:
        raise TooManyEventsError(f"{count} events; at most {max_events} per request")
    if count == 0:
        raise MalformedBodyError("empty array; send at least one event")


def _check_timestamps(
    events: list[tuple[int, NativeEvent]], max_future_s: int
) -> tuple[list[tuple[int, NativeEvent]], list[EventErrors]]:
    limit: datetime = future_limit(max_future_s)
    valid: list[tuple[int, NativeEvent]] = []
    rejected: list[EventErrors] = []
    for index, event in events:
        error: FieldError | None = check_timestamp(event.timestamp, limit)
        if error is None:
            valid.append((index, event))
        else:
            rejected.append(EventErrors(index=index, errors=[error]))
    return valid, rejected


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/events", post_events, name=ROUTE)
