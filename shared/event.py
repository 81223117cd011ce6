"""The canonical event: the one record every dialect becomes before it reaches a sink."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import uuid_utils

# Property values are whatever JSON the producer sent; definitions (not this type) narrow them.
Properties = dict[str, Any]
Item = dict[str, Any]


class Event(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """One event as sinks store it; the `events` table has exactly these columns.

    New fields go last, with defaults, so older sinks and readers keep working.
    """

    account: str
    event_id: str  # dedupe key: the producer's id, else a UUIDv7 minted at the front door
    name: str
    occurred_at: datetime  # UTC
    received_at: datetime  # UTC, set by the front door
    source: str  # the dialect it came in by
    identity: dict[str, str] = {}
    properties: Properties = {}
    items: list[Item] = []
    value: float | None = None
    currency: str | None = None


def new_event_id() -> str:
    """A UUIDv7: time-ordered, so ids minted together sort and index together."""
    return str(uuid_utils.uuid7())


def utc(dt: datetime) -> datetime:
    """The same instant in UTC; a naive datetime is taken to be UTC already."""
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def utc_from_ns(ns: int) -> datetime:
    """A UTC datetime from nanoseconds since the epoch (the envelope's clock)."""
    return datetime.fromtimestamp(ns / 1e9, tz=UTC)
