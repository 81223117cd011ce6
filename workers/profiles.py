"""Person profiles from a batch: every event's identity and every profile update, resolved
to persons through the Redis index, upserted into the sink's `profiles` table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared import keys
from shared.event import new_event_id
from shared.persons import ID, Profile, Sighting, identifiers, index_field
from shared.scripts import lua

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from datetime import datetime

    import redis

    from shared.event import Event
    from workers.sinks.base import Sink


class ProfileRecorder:
    """Turns a batch's sightings into profile rows: one Redis round trip (a script call per
    account, pipelined) and one sink statement per batch, whatever the batch holds."""

    def __init__(self, sink: Sink, client: redis.Redis) -> None:
        self._sink = sink
        self._client = client
        self._resolve = client.register_script(lua("resolve_persons"))

    def record(
        self, events_by_account: Mapping[str, Sequence[Event]], updates: Iterable[Sighting]
    ) -> int:
        """Steps: gather each distinct identity of the events (with when it was seen) and
        the profile updates; find or make each one's person in the index; upsert a row per
        identifier. Idempotent, so a retried batch changes nothing more. Returns the rows.

        Raises:
            redis.exceptions.RedisError: the index cannot be read (rq retries the batch).
            SinkUnavailableError, SinkRejectedError: as `Sink.upsert_profiles`.
        """
        sightings = [*sightings_of(events_by_account), *updates]
        if not sightings:
            return 0
        persons = self._resolve_persons(sightings)
        return self._sink.upsert_profiles(
            [
                p
                for sighting, found in zip(sightings, persons, strict=True)
                for p in rows(sighting, found)
            ]
        )

    def _resolve_persons(self, sightings: Sequence[Sighting]) -> list[list[str]]:
        """Per sighting: its person, then the person each of its identifiers belongs to."""
        by_account: dict[str, list[int]] = {}
        for number, sighting in enumerate(sightings):
            by_account.setdefault(sighting.account, []).append(number)
        with self._client.pipeline(transaction=False) as pipe:
            for account, numbers in by_account.items():
                args: list[str] = []
                for number in numbers:
                    found = sightings[number].identifiers
                    own_id = next((v for k, v in found if k == ID), None)
                    args += [own_id or new_event_id(), str(len(found))]
                    args += [index_field(k, v) for k, v in found]
                self._resolve(keys=[keys.persons(account)], args=args, client=pipe)
            replies = pipe.execute()
        persons: list[list[str]] = [[] for _ in sightings]
        for numbers, reply in zip(by_account.values(), replies, strict=True):
            ids = [r.decode() if isinstance(r, bytes) else str(r) for r in reply]
            for number in numbers:
                size = len(sightings[number].identifiers) + 1
                persons[number], ids = ids[:size], ids[size:]
        return persons


def sightings_of(events_by_account: Mapping[str, Sequence[Event]]) -> list[Sighting]:
    """Each distinct identity of the events, with the first and last time it was seen.

    A bulk request's events share one identity: its identifiers are worked out once.
    """
    seen: dict[tuple[str, tuple[tuple[str, object], ...]], tuple[datetime, datetime]] = {}
    for account, events in events_by_account.items():
        for event in events:
            if not event.identity:
                continue
            key = (account, tuple(event.identity.items()))
            when = seen.get(key)
            at = event.occurred_at
            seen[key] = (min(when[0], at), max(when[1], at)) if when else (at, at)
    sightings = []
    for (account, identity), (first, last) in seen.items():
        found = identifiers(dict(identity))
        if found:
            sightings.append(
                Sighting(account=account, identifiers=found, first_seen=first, last_seen=last)
            )
    return sightings


def rows(sighting: Sighting, persons: Sequence[str]) -> list[Profile]:
    """The profile rows of a resolved sighting: one per identifier, and the person's own
    `ID` row, which gathers every attribute the person was seen with. An identifier that
    belongs to another person keeps it, and gets no attributes of this one."""
    person, owners = persons[0], persons[1:]
    found = list(zip(sighting.identifiers, owners, strict=True))
    if (ID, person) not in sighting.identifiers:
        found.append(((ID, person), person))
    return [
        Profile(
            account=sighting.account,
            identifier_type=kind,
            identifier=value,
            person_id=owner,
            attributes=sighting.attributes if owner == person else {},
            first_seen=sighting.first_seen,
            last_seen=sighting.last_seen,
        )
        for (kind, value), owner in found
    ]
