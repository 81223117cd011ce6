"""The people dialect's wire format (seed 002) and its normalisation into canonical events.

One event per request: the person and the event definition are in the path, so the body is
only `{"properties": {...} | null}`. The front door keeps the path's parts in the part's
`context` and mints the event id the answer names (`ids[0]`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from shared.event import Event, utc_from_ns
from shared.persons import identity_key

if TYPE_CHECKING:
    from shared.envelope import Part

DIALECT = "people"

# Part.context keys: the path's definition and person, and the query's identifier type.
DEFINITION, PERSON, IDENTIFIER_TYPE = "definitionId", "personId", "identifierType"
# A line-item list under this name becomes the canonical `items`, as in the catalog dialect.
ITEMS = "itemsInCart"


class PeopleBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The request body. Strict: a misspelt `properties` gets a 400, not an empty event."""

    properties: dict[str, Any] | None = None


BODY_DECODER = msgspec.json.Decoder(PeopleBody)


def split_items(properties: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(properties, items): a list of objects under `itemsInCart` moves to the items."""
    items = properties.get(ITEMS)
    if isinstance(items, list) and items and all(isinstance(i, dict) for i in items):
        return {k: v for k, v in properties.items() if k != ITEMS}, items
    return properties, []


def normalise(part: Part) -> list[Event]:
    """The one canonical event of a validated people request, dated when it was received
    (the vendor's `occurredTime`)."""
    received_at = utc_from_ns(part.received_ns)
    properties, items = split_items(BODY_DECODER.decode(part.body).properties or {})
    kind = part.context[IDENTIFIER_TYPE]
    return [
        Event(
            account=part.account,
            event_id=part.ids[0],
            name=part.context[DEFINITION],
            occurred_at=received_at,
            received_at=received_at,
            source=DIALECT,
            identity={identity_key(kind): part.context[PERSON]},
            properties=properties,
            items=items,
        )
    ]
