"""The native API's wire format and its normalisation into canonical events."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from shared.event import Event, utc, utc_from_ns

if TYPE_CHECKING:
    from shared.envelope import Part

DIALECT = "native"

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
IdentityKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
IdentityValue = Annotated[str, msgspec.Meta(max_length=1024)]
Currency = Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")]


# gc=False: decoded JSON cannot form reference cycles, and untracked structs keep the
# collector from rescanning every event of every request waiting on its flush.
class NativeEvent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """One event as producers send it; strict at the top level so a typo gets a clear 4xx.
    Properties and items are free-form: unknown keys there are kept."""

    name: Name
    id: EventId | None = None
    timestamp: datetime | None = None
    identity: dict[IdentityKey, IdentityValue] = {}
    properties: dict[str, Any] = {}
    items: list[dict[str, Any]] = []
    value: float | None = None
    currency: Currency | None = None


# One object or an array of them; built once, reused by every request and batch.
BODY_DECODER = msgspec.json.Decoder(list[NativeEvent] | NativeEvent)
EVENT_DECODER = msgspec.json.Decoder(NativeEvent)


def decode_body(body: bytes) -> list[NativeEvent]:
    """Raises:
    msgspec.DecodeError: malformed JSON (ValidationError: wrong shape or types).
    """
    decoded = BODY_DECODER.decode(body)
    return decoded if isinstance(decoded, list) else [decoded]


def normalise(part: Part) -> list[Event]:
    """The canonical events of one validated native request."""
    received_at = utc_from_ns(part.received_ns)
    skip = set(part.skip)
    if skip:
        # The front door accepted only some events; decode those one by one.
        raws = msgspec.json.decode(part.body, type=list[msgspec.Raw] | msgspec.Raw)
        raw_list = raws if isinstance(raws, list) else [raws]
        wire = [(i, EVENT_DECODER.decode(raw)) for i, raw in enumerate(raw_list) if i not in skip]
    else:
        wire = list(enumerate(decode_body(part.body)))
    return [
        Event(
            account=part.account,
            event_id=event.id or part.ids[index],
            name=event.name,
            occurred_at=utc(event.timestamp) if event.timestamp else received_at,
            received_at=received_at,
            source=DIALECT,
            identity=event.identity,
            properties=event.properties,
            items=event.items,
            value=event.value,
            currency=event.currency,
        )
        for index, event in wire
    ]
