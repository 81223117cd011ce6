"""The import dialect's wire format (seed 003) and its normalisation into canonical events.

A request is one person (`common.identity`) and up to 100 events, each with a UUID
`event_log_id` (the dedupe key), a registered `event_name`, `event_datetime`, and optional
`event_properties` and up to 100 `event_items`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from shared.event import Event, utc, utc_from_ns

if TYPE_CHECKING:
    from shared.envelope import Part

DIALECT = "import"
MAX_EVENTS = 100
MAX_ITEMS = 100
# A purchase's total is the canonical event's value (the vendor sends no currency).
VALUE_PROPERTY = "df_total_purchase_amount"

Identifier = Annotated[str, msgspec.Meta(max_length=1024)]


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """Who the events are about; at least one field must be set. Unknown fields are ignored."""

    external_id: Identifier | None = None
    phone_no: Identifier | None = None
    email: Identifier | None = None
    kakao_user_id: Identifier | None = None
    line_user_id: Identifier | None = None

    def canonical(self) -> dict[str, str]:
        """The canonical identity: only what was sent, `phone_no` as `phone`."""
        pairs = (
            ("external_id", self.external_id),
            ("phone", self.phone_no),
            ("email", self.email),
            ("kakao_user_id", self.kakao_user_id),
            ("line_user_id", self.line_user_id),
        )
        return {key: value for key, value in pairs if value}


class Common(msgspec.Struct, frozen=True, kw_only=True):
    identity: Identity


class ImportEvent(msgspec.Struct, frozen=True, kw_only=True):
    event_log_id: uuid.UUID
    event_name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    # No offset means UTC; msgspec reads 0-9 fractional digits.
    event_datetime: datetime
    event_properties: dict[str, Any] | None = None
    # The limit is part of the type, so an event over it is found with the others.
    event_items: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_ITEMS)] | None = None


class ImportRequest(msgspec.Struct, frozen=True, kw_only=True):
    common: Common
    # The 100-event limit is checked by count, not here: it has its own answer (40402).
    events: list[ImportEvent]


REQUEST_DECODER = msgspec.json.Decoder(ImportRequest)
EVENT_DECODER = msgspec.json.Decoder(ImportEvent)


def normalise(part: Part) -> list[Event]:
    """The canonical events of one validated import request."""
    request = REQUEST_DECODER.decode(part.body)
    received_at = utc_from_ns(part.received_ns)
    identity = request.common.identity.canonical()
    return [
        Event(
            account=part.account,
            event_id=str(event.event_log_id),
            name=event.event_name,
            occurred_at=utc(event.event_datetime),
            received_at=received_at,
            source=DIALECT,
            identity=identity,
            properties=event.event_properties or {},
            items=event.event_items or [],
            value=_value(event.event_properties),
        )
        for event in request.events
    ]


def _value(properties: dict[str, Any] | None) -> float | None:
    amount = (properties or {}).get(VALUE_PROPERTY)
    # bool is an int to Python, not an amount.
    if isinstance(amount, (int, float)) and not isinstance(amount, bool):
        return float(amount)
    return None
