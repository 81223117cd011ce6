"""The catalog dialect's wire format (seeds 000/001) and its normalisation into canonical events.

An event is a flat object: `type` names it, `timestamp` dates it, `customerCode` is the
person, and every other field is a property of that type (`productCode`, `quantity` ...).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from shared.event import Event, utc, utc_from_ns

if TYPE_CHECKING:
    from shared.envelope import Part

DIALECT = "catalog"
MAX_EVENTS = 100  # "You can load up to 100 events at once"

# The fields with a meaning of their own; the rest of an event are its properties.
TYPE, TIMESTAMP, CUSTOMER_CODE = "type", "timestamp", "customerCode"
# A line-item list under this name becomes the canonical `items` (EventPurchase).
ITEMS = "itemsInCart"
IDENTITY_KEY = "customer_code"


class CatalogHead(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of an event that are not properties; unknown fields are its properties."""

    type: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    # No offset means UTC; msgspec reads 0-9 fractional digits.
    timestamp: datetime | None = None
    customerCode: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None  # noqa: N815 - the vendor's name


# One object or an array: decoded to plain values, since an event's fields are open-ended.
BODY_DECODER = msgspec.json.Decoder(list[Any] | dict[str, Any])


def decode_body(body: bytes) -> list[Any]:
    """The events of a body, each still to be checked to be an object.

    Raises:
        msgspec.DecodeError: malformed JSON (ValidationError: neither an object nor an array).
    """
    decoded = BODY_DECODER.decode(body)
    return decoded if isinstance(decoded, list) else [decoded]


def read_head(event: dict[str, Any]) -> CatalogHead:
    """Raises:
    msgspec.ValidationError: `type` missing, or a known field of the wrong type.
    """
    return msgspec.convert(event, CatalogHead)


def properties_of(event: dict[str, Any]) -> dict[str, Any]:
    """What a definition checks: every field but `type` and `timestamp` (customerCode
    included, since the built-in definitions require it)."""
    return {k: v for k, v in event.items() if k not in (TYPE, TIMESTAMP)}


def normalise(part: Part) -> list[Event]:
    """The canonical events of one validated catalog request; ids were minted at the front
    door (the vendor has none)."""
    received_at = utc_from_ns(part.received_ns)
    events: list[Event] = []
    for index, event in enumerate(decode_body(part.body)):
        head = read_head(event)
        properties, items = _split_items(
            {k: v for k, v in event.items() if k not in (TYPE, TIMESTAMP, CUSTOMER_CODE)}
        )
        events.append(
            Event(
                account=part.account,
                event_id=part.ids[index],
                name=head.type,
                occurred_at=utc(head.timestamp) if head.timestamp else received_at,
                received_at=received_at,
                source=DIALECT,
                identity={IDENTITY_KEY: head.customerCode} if head.customerCode else {},
                properties=properties,
                items=items,
            )
        )
    return events


def _split_items(properties: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`itemsInCart`, when it is a list of objects, is the event's line items."""
    items = properties.get(ITEMS)
    if isinstance(items, list) and all(isinstance(item, dict) for item in items):
        return {k: v for k, v in properties.items() if k != ITEMS}, items
    return properties, []
