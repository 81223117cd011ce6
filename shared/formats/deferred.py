"""Events a worker held back over an account's processing rate, queued again as they are.

They are canonical events already (normalised, ids fixed), so the part's body is their
msgpack and normalising is decoding. Their tokens were taken when they were held back
(workers/limits.py), so a worker writes a deferred part at once, whenever it runs.
"""

from __future__ import annotations

import time

import msgspec

from shared.envelope import Part
from shared.event import Event, new_event_id

DIALECT = "deferred"

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(list[Event])


def deferred_part(account: str, events: list[Event]) -> Part:
    """A queue part holding `events` (all of `account`) to be written later."""
    return Part(
        account=account,
        dialect=DIALECT,
        request_id=new_event_id(),
        received_ns=time.time_ns(),
        count=len(events),
        body=_ENCODER.encode(events),
    )


def normalise(part: Part) -> list[Event]:
    return _DECODER.decode(part.body)
