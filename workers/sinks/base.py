"""What every sink implements, the errors it raises, and the rows the SQL sinks share."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import msgspec

from shared.event import utc

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    from shared.event import Event
    from shared.persons import Profile


class WriteResult(NamedTuple):
    """What one `write_batch` did: rows it stored, and events already there (or repeated)."""

    new: int
    duplicate: int


class SinkError(Exception):
    """A sink could not store a batch."""


class SinkUnavailableError(SinkError):
    """Transient: the sink is down, busy or too slow; the same batch may succeed later.

    `retry_after` is how long the sink asked us to wait (an HTTP Retry-After), if it did.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SinkRejectedError(SinkError):
    """Permanent: the sink refuses this data; retrying the same batch cannot succeed, but a
    part of it may (the worker bisects the batch to find the events refused)."""


class SinkRefusedError(SinkError):
    """Permanent: the sink refuses every batch (bad credentials, wrong URL), whatever the
    events; bisecting cannot help, so the batch is dead-lettered whole."""


class Sink(Protocol):
    # What the worker's delivery needs to know of a sink (see workers/delivery.py):
    # `name` identifies it in progress markers and dead letters: stable across restarts,
    # never a password. `keyed`: a unique key on (account, event_id) makes a repeated write
    # harmless (SQL); otherwise Redis markers guard it (forward, files). `keeps_profiles`:
    # it has a `profiles` table. `max_events`: events per write, None for any number.
    name: str
    keyed: bool
    keeps_profiles: bool
    max_events: int | None

    def write_batch(self, events: Sequence[Event]) -> WriteResult:
        """Store the events, all or none: a keyed sink at most once per (account, event_id);
        another as a batch (the worker's markers keep it from being sent twice).

        Raises:
            SinkUnavailableError: nothing was stored; try again later.
            SinkRejectedError: nothing was stored; the data itself is refused.
            SinkRefusedError: nothing was stored; the sink refuses any batch.
        """

    def upsert_profiles(self, profiles: Sequence[Profile]) -> int:
        """Create or update one `profiles` row per (account, identifier type, identifier)
        in one statement: attributes merged at the top level (a None unsets one), seen
        times widened, the stored person id kept. Returns the rows written.

        Raises:
            SinkUnavailableError: nothing was stored; try again later.
            SinkRejectedError: nothing was stored; the data itself is refused.
        """

    def close(self) -> None: ...


# The columns an Event fills, in `event_row` order; `stored_at` is the sink's own.
COLUMNS = (
    "account",
    "event_id",
    "name",
    "occurred_at",
    "received_at",
    "source",
    "identity",
    "properties",
    "items",
    "value",
    "currency",
)

Row = tuple[str, str, str, str, str, str, str, str, str, float | None, str | None]

_json = msgspec.json.Encoder()


def timestamp(dt: datetime) -> str:
    """ISO-8601 in UTC with microseconds, e.g. 2025-11-18T07:21:16.527000+00:00.

    A fixed width keeps text timestamps (SQLite) sorting in time order.
    """
    return utc(dt).isoformat(timespec="microseconds")


def event_row(event: Event) -> Row:
    """The event as `COLUMNS` values: timestamps as `timestamp` text, JSON as text."""
    return (
        event.account,
        event.event_id,
        event.name,
        timestamp(event.occurred_at),
        timestamp(event.received_at),
        event.source,
        _json.encode(event.identity).decode(),
        _json.encode(event.properties).decode(),
        _json.encode(event.items).decode(),
        # Struct init does not check types, and a stray int among floats makes
        # PostgreSQL's array adaptation refuse the whole batch.
        None if event.value is None else float(event.value),
        event.currency,
    )


# The `profiles` columns, in `profile_row` order: one row per identifier of a person.
PROFILE_COLUMNS = (
    "account",
    "identifier_type",
    "identifier",
    "person_id",
    "attributes",
    "first_seen",
    "last_seen",
)

ProfileRow = tuple[str, str, str, str, str, str, str]


def profile_row(profile: Profile) -> ProfileRow:
    """The profile as `PROFILE_COLUMNS` values: timestamps as `timestamp` text, JSON as text."""
    return (
        profile.account,
        profile.identifier_type,
        profile.identifier,
        profile.person_id,
        _json.encode(profile.attributes).decode(),
        timestamp(profile.first_seen),
        timestamp(profile.last_seen),
    )


class EventRecord(msgspec.Struct, frozen=True, gc=False):
    """The event as forward and file sinks write it: the `events` columns, by name, with
    `timestamp` strings, so every sink shows the same values."""

    account: str
    event_id: str
    name: str
    occurred_at: str
    received_at: str
    source: str
    identity: dict[str, str]
    properties: dict[str, Any]
    items: list[dict[str, Any]]
    value: float | None
    currency: str | None


def event_record(event: Event) -> EventRecord:
    return EventRecord(
        event.account,
        event.event_id,
        event.name,
        timestamp(event.occurred_at),
        timestamp(event.received_at),
        event.source,
        event.identity,
        event.properties,
        event.items,
        None if event.value is None else float(event.value),
        event.currency,
    )


def batch_key(events: Sequence[Event]) -> str:
    """A batch's idempotency key: the same events, in the same order, make the same key, so
    a batch sent again after a timeout or a crash is recognised by the receiver.

    Length-prefixed (msgpack), so no choice of accounts and ids makes two batches collide.
    """
    pairs = [[e.account, e.event_id] for e in events]
    return "eg-" + hashlib.sha256(msgspec.msgpack.encode(pairs)).hexdigest()[:40]
