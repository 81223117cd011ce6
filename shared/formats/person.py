"""A person created directly (`POST /v1/persons`, `eventgate persons create`): its wire form,
how it is indexed and queued, and the profile rows the workers make of it (no event)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from shared import jobs
from shared.envelope import Batch, Part
from shared.event import new_event_id, utc_from_ns
from shared.formats.native import IdentityValue
from shared.persons import Sighting, attribute_update, identifiers, index_person

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from shared.event import Event
    from shared.settings import Settings

DIALECT = "person"

# A non-blank id of at most 128 characters; any other character is fine ("/", "+", "@").
PersonId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"\S")]


class PersonIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A person as `POST /v1/persons` takes it. `attributes` go to its profile rows."""

    id: PersonId
    external_id: IdentityValue | None = None
    email: IdentityValue | None = None
    phone: IdentityValue | None = None
    attributes: dict[str, Any] = {}

    def identity(self) -> dict[str, str]:
        """The person's identifiers as an event's identity would hold them."""
        sent = {"external_id": self.external_id, "email": self.email, "phone": self.phone}
        return {"person_id": self.id} | {k: v for k, v in sent.items() if v is not None}


PERSON_DECODER = msgspec.json.Decoder(PersonIn)
_ENCODER = msgspec.json.Encoder()


def encode_person(person: PersonIn) -> bytes:
    return _ENCODER.encode(person)


async def create_person(
    client: aioredis.Redis, settings: Settings, account: str, person: PersonIn
) -> bool:
    """Index the person at once and queue its profile rows (`eventgate persons create`; the
    front door does the same through its group commit). True if the person is new.

    Raises:
        PersonError: no such account.
        PersonConflictError: an identifier already belongs to another person.
    """
    created = await index_person(client, account, person.id, person.identity())
    part = Part(
        account=account,
        dialect=DIALECT,
        request_id=new_event_id(),
        received_ns=time.time_ns(),
        count=0,  # no event: only profile rows
        body=encode_person(person),
    )
    async with client.pipeline(transaction=True) as pipe:
        queues = jobs.ShardQueues(settings)
        queues.add_jobs(pipe, queues.queue_for(account), [Batch(parts=[part])])
        await pipe.execute()
    return created


def normalise(_part: Part) -> list[Event]:
    """A created person is no event: nothing for the `events` table."""
    return []


def profiles(part: Part) -> list[Sighting]:
    """The person, seen when it was created, with the attributes it was created with."""
    person = PERSON_DECODER.decode(part.body)
    created = utc_from_ns(part.received_ns)
    return [
        Sighting(
            account=part.account,
            identifiers=identifiers(person.identity()),
            first_seen=created,
            last_seen=created,
            attributes=attribute_update(person.attributes),
        )
    ]
