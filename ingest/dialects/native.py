"""Native API: `POST /v1/events`, one event or an array, Bearer key, problem+json errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
import structlog
from aiohttp import web

from ingest.admission import admit
from ingest.body import read_body
from ingest.context import begin_request
from ingest.event_checks import EventChecks
from ingest.metrics import note_rejected
from ingest.problems import (
    EventErrors,
    FieldError,
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
    summarise,
)
from shared.envelope import Part
from shared.event import new_event_id
from shared.formats.native import DIALECT, EVENT_DECODER, NativeEvent, decode_body

if TYPE_CHECKING:
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
    await admit(request, key, DIALECT)  # 503 backpressure, 429 rate limit
    body = await read_body(request, gateway.body_limits)

    view = await gateway.accounts.view(key.account)
    if view is None:
        raise UnauthorizedError("the key's account no longer exists")
    checks = EventChecks.now(gateway.settings)

    def check(event: NativeEvent) -> FieldError | None:
        return check_limits(event) or view.check_event(event.name, event.properties)

    def check_limits(event: NativeEvent) -> FieldError | None:
        return (
            checks.timestamp(event.timestamp)
            or checks.properties(event.properties)
            or checks.properties(event.identity, "identity")
            or checks.items(event.items)
        )

    # An account without definitions that takes any event needs only the limits checked.
    if not view.definitions and view.account.accept_unregistered:
        check = check_limits

    checked = _decode(body, gateway.settings.max_events).check(check)
    events, rejected = checked.valid, checked.rejected
    note_rejected(len(rejected))
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
    accepted = len(events)
    # Dropped before waiting on Redis, so the decoded events die young: kept across the
    # await, every in-flight request's events outlived a GC pass or two and made the
    # collector walk them again and again (measured: GC was ~28% of the front door's CPU).
    del checked, events
    await gateway.enqueuer.submit(part)
    log.debug("request.accepted", accepted=accepted, rejected=len(rejected))
    reply = Accepted(accepted=accepted, rejected=rejected[:MAX_LISTED], request_id=request_id)
    return web.Response(body=_ENCODER.encode(reply), status=202, content_type="application/json")


def _decode(body: bytes, max_events: int) -> Checked[NativeEvent]:
    """Fast path: the whole batch in one decode. On any invalid event, event by event, so
    that every problem is listed.

    Raises:
        MalformedBodyError: not JSON, or not an object or array of objects.
        TooManyEventsError: more than `max_events`.
    """
    if not body.strip():
        raise MalformedBodyError("empty body; send one event object or an array of them")
    try:
        events = decode_body(body)
    except msgspec.ValidationError:
        pass  # some event is invalid: find every one below
    except (msgspec.DecodeError, RecursionError) as exc:
        raise malformed_json(body, exc) from None
    else:
        check_count(len(events), max_events)
        return Checked(list(enumerate(events)), [])
    try:
        # A lone `msgspec.Raw` in a union is ignored (an object was refused as "not an
        # array"): take the object's members raw, and the whole body as its one event.
        raws = msgspec.json.decode(body, type=list[msgspec.Raw] | dict[str, msgspec.Raw])
    except msgspec.ValidationError as exc:
        raise MalformedBodyError(
            f"expected one event object or an array of them: {field_error(exc)[1].message}"
        ) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        # The fast path stopped at a wrong type before reaching the bad syntax or depth.
        raise malformed_json(body, exc) from None
    raw_list = raws if isinstance(raws, list) else [msgspec.Raw(body)]
    check_count(len(raw_list), max_events)
    return decode_each(raw_list, EVENT_DECODER)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/events", post_events, name=ROUTE)
