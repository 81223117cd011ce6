"""The bulk dialect's wire format (seed 004), a JSON:API document, and its normalisation.

One profile and up to 1000 events:
`{"data": {"type": "event-bulk-create", "attributes": {"profile": {"data": {"type":
"profile", "attributes": {...}}}, "events": {"data": [{"type": "event", "attributes":
{"metric": {"data": {"type": "metric", "attributes": {"name"}}}, "time", "value",
"value_currency", "unique_id", "properties"}}]}}}}`.

Attributes are strict (a misspelt `unique_id` would silently lose deduplication); the
resource objects around them may carry JSON:API's other members (`id`, `links`, `meta`).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from shared.event import Event, utc, utc_from_ns
from shared.formats.native import EventId, IdentityValue, Name
from shared.persons import Sighting, attribute_update, identifiers

if TYPE_CHECKING:
    from shared.envelope import Part

DIALECT = "bulk"
MAX_EVENTS = 1000  # "Accepts a maximum of 1000 events per request."

Text = Annotated[str, msgspec.Meta(max_length=1024)]
CurrencyCode = Annotated[str, msgspec.Meta(pattern="^[A-Za-z]{3}$")]
_STRICT: dict[str, Any] = {"frozen": True, "kw_only": True, "forbid_unknown_fields": True}


class MetricAttributes(msgspec.Struct, **_STRICT):
    name: Name
    service: Text | None = None


class Metric(msgspec.Struct, frozen=True):
    type: Literal["metric"]
    attributes: MetricAttributes


class MetricRelationship(msgspec.Struct, frozen=True):
    data: Metric


class EventAttributes(msgspec.Struct, **_STRICT):
    metric: MetricRelationship
    time: datetime | None = None  # no offset: UTC; absent: the received time
    value: float | None = None
    value_currency: CurrencyCode | None = None
    unique_id: EventId | None = None  # the dedupe key; minted at the front door if absent
    properties: dict[str, Any] = {}


class BulkEvent(msgspec.Struct, frozen=True):
    type: Literal["event"]
    attributes: EventAttributes


class Location(msgspec.Struct, **_STRICT):
    address1: Text | None = None
    address2: Text | None = None
    city: Text | None = None
    country: Text | None = None
    latitude: Text | float | None = None
    longitude: Text | float | None = None
    region: Text | None = None
    zip: Text | None = None
    timezone: Text | None = None
    ip: Text | None = None


# The profile attributes that identify the person; their names are the identity keys.
IDENTIFIERS = ("email", "phone_number", "external_id", "anonymous_id", "_kx")


class ProfileAttributes(msgspec.Struct, **_STRICT):
    email: IdentityValue | None = None
    phone_number: IdentityValue | None = None
    external_id: IdentityValue | None = None
    anonymous_id: IdentityValue | None = None
    kx: IdentityValue | None = msgspec.field(default=None, name="_kx")
    first_name: Text | None = None
    last_name: Text | None = None
    organization: Text | None = None
    locale: Text | None = None
    title: Text | None = None
    image: Text | None = None
    location: Location | None = None
    properties: dict[str, Any] = {}  # custom profile properties


class PatchProperties(msgspec.Struct, **_STRICT):
    unset: str | list[str] = []


class ProfileMeta(msgspec.Struct, frozen=True, kw_only=True):
    patch_properties: PatchProperties | None = None


class ProfileResource(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["profile"]
    id: IdentityValue | None = None  # the vendor's profile id: our person id
    attributes: ProfileAttributes
    meta: ProfileMeta | None = None

    def identity(self) -> dict[str, str]:
        """The canonical identity: the identifiers sent, the profile id as `person_id`."""
        attrs = self.attributes
        sent = {
            "person_id": self.id,
            "email": attrs.email,
            "phone_number": attrs.phone_number,
            "external_id": attrs.external_id,
            "anonymous_id": attrs.anonymous_id,
            "_kx": attrs.kx,
        }
        return {k: v for k, v in sent.items() if v is not None}

    def update(self) -> dict[str, Any]:
        """The profile attributes to store: custom properties and the named ones (which win
        over a custom property of the same name), and `unset` ones as None."""
        named = msgspec.to_builtins(self.attributes)
        for key in (*IDENTIFIERS, "properties"):
            named.pop(key, None)
        unset = self.meta.patch_properties.unset if self.meta and self.meta.patch_properties else []
        return attribute_update(
            {**self.attributes.properties, **named}, [unset] if isinstance(unset, str) else unset
        )


class ProfileRelationship(msgspec.Struct, frozen=True):
    data: ProfileResource


class EventList(msgspec.Struct, frozen=True):
    data: list[BulkEvent]


class RawEventList(msgspec.Struct, frozen=True):
    data: list[msgspec.Raw]


class BulkAttributes(msgspec.Struct, **_STRICT):
    profile: ProfileRelationship
    events: EventList


class RawBulkAttributes(msgspec.Struct, **_STRICT):
    profile: ProfileRelationship
    events: RawEventList


class BulkData(msgspec.Struct, frozen=True):
    type: Literal["event-bulk-create"]
    attributes: BulkAttributes


class RawBulkData(msgspec.Struct, frozen=True):
    type: Literal["event-bulk-create"]
    attributes: RawBulkAttributes


class BulkDocument(msgspec.Struct, frozen=True):
    data: BulkData

    @property
    def profile(self) -> ProfileResource:
        return self.data.attributes.profile.data

    @property
    def events(self) -> list[BulkEvent]:
        return self.data.attributes.events.data


class RawBulkDocument(msgspec.Struct, frozen=True):
    """The document with its events still undecoded, to check them one by one."""

    data: RawBulkData

    @property
    def profile(self) -> ProfileResource:
        return self.data.attributes.profile.data

    @property
    def events(self) -> list[msgspec.Raw]:
        return self.data.attributes.events.data


# Built once, reused by every request and batch.
DOCUMENT_DECODER = msgspec.json.Decoder(BulkDocument)
RAW_DOCUMENT_DECODER = msgspec.json.Decoder(RawBulkDocument)
EVENT_DECODER = msgspec.json.Decoder(BulkEvent)


class _ProfileOnly(msgspec.Struct, frozen=True):
    profile: ProfileRelationship


class _ProfileData(msgspec.Struct, frozen=True):
    attributes: _ProfileOnly


class _ProfileDocument(msgspec.Struct, frozen=True):
    data: _ProfileData


# Reads the profile and skips the events unparsed: the worker's second look at a body.
_PROFILE_DECODER = msgspec.json.Decoder(_ProfileDocument)


def normalise(part: Part) -> list[Event]:
    """The canonical events of a validated bulk request; all share the profile's identity."""
    received_at = utc_from_ns(part.received_ns)
    document = DOCUMENT_DECODER.decode(part.body)
    identity = document.profile.identity()
    events = []
    for index, event in enumerate(document.events):
        attrs = event.attributes
        metric = attrs.metric.data.attributes
        properties = attrs.properties
        if metric.service is not None:
            # The vendor's `$`-prefixed names are its own; nothing else has a place for it.
            properties = {**properties, "$service": metric.service}
        events.append(
            Event(
                account=part.account,
                event_id=attrs.unique_id or part.ids[index],
                name=metric.name,
                occurred_at=utc(attrs.time) if attrs.time else received_at,
                received_at=received_at,
                source=DIALECT,
                identity=identity,
                properties=properties,
                value=attrs.value,
                currency=attrs.value_currency.upper() if attrs.value_currency else None,
            )
        )
    return events


def profiles(part: Part) -> list[Sighting]:
    """The profile's attributes, for the person its identifiers name, as of receipt."""
    profile = _PROFILE_DECODER.decode(part.body).data.attributes.profile.data
    update = profile.update()
    if not update:
        return []  # the events' identity is sighting enough
    received_at = utc_from_ns(part.received_ns)
    return [
        Sighting(
            account=part.account,
            identifiers=identifiers(profile.identity()),
            first_seen=received_at,
            last_seen=received_at,
            attributes=update,
        )
    ]
