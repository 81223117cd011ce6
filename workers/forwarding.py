"""Guarding sinks without a unique key (HTTP forward, JSON Lines) with Redis markers, so a
re-run batch does not send again what the sink acknowledged.

Per event and sink, a marker says "p:<batch key>" (sent in that batch, not acknowledged yet)
or "d" (acknowledged; "n" until the job that carries the event has counted it). A batch is
claimed before it is sent, atomically (Lua), and its events are kept until acknowledged: a
retry, whatever jobs ride along with it then, sends the same batch again with the same
idempotency key, so the receiver can drop the repeat. Markers written before the send never
make a retried batch look like a duplicate of itself: they name the batch, and a batch
recognises its own. What stays at-least-once: a crash between the sink's acknowledgement
and the "d" markers sends the batch once more (same key).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import msgspec

from shared import keys
from shared.event import Event
from shared.scripts import lua
from workers.sinks.base import (
    SinkRefusedError,
    SinkRejectedError,
    SinkUnavailableError,
    WriteResult,
    batch_key,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    import redis

    from workers.sinks.base import Sink

_DELIVERED = b"d"
_UNCOUNTED = b"n"  # acknowledged in a batch another job's retry sent; not counted yet
_ACKNOWLEDGED = (_DELIVERED, _UNCOUNTED)
_PENDING = b"p:"
_EVENTS = msgspec.msgpack.Encoder()
_EVENTS_DECODER = msgspec.msgpack.Decoder(list[Event])


def sink_id(name: str) -> str:
    """A short, stable id for a sink in per-event keys (its name may be a long URL)."""
    return hashlib.sha256(name.encode()).hexdigest()[:12]


class ForwardGuard:
    """Writes to one unkeyed sink through its markers."""

    def __init__(
        self, client: redis.Redis, sink: Sink, *, pending_ttl_s: int, delivered_ttl_s: int
    ) -> None:
        self.sink = sink
        self._client = client
        self._id = sink_id(sink.name)
        self._pending_ttl_s = pending_ttl_s
        self._delivered_ttl_s = delivered_ttl_s
        self._claim = client.register_script(lua("forward_claim"))
        self._release = client.register_script(lua("forward_release"))

    def write(self, events: Sequence[Event]) -> WriteResult:
        """Send the events the sink has not acknowledged yet, in batches of at most
        `sink.max_events`; `new` counts those sent now, `duplicate` the others.

        Steps: read the events' markers; batches some of them were sent in and not
        acknowledged go again as they were; the rest is cut into new batches, each claimed
        (markers and events stored) before it is sent; acknowledged events are marked "d".

        Raises:
            SinkUnavailableError: the sink failed, or another batch holds some of the events
                (in flight elsewhere): try again later; markers stay for the retry.
            SinkRejectedError, SinkRefusedError: the sink refused a batch; its markers are
                released (nothing of it was stored).
        """
        unique = list({(e.account, e.event_id): e for e in reversed(events)}.values())[::-1]
        duplicate = len(events) - len(unique)
        pending: dict[str, list[Event]] = {}
        fresh: list[Event] = []
        uncounted: list[Event] = []
        for event, state in zip(unique, self._states(unique), strict=True):
            if state == _DELIVERED:
                duplicate += 1
            elif state == _UNCOUNTED:
                uncounted.append(event)
            elif state is not None and state.startswith(_PENDING):
                pending.setdefault(state[len(_PENDING) :].decode(), []).append(event)
            else:
                fresh.append(event)
        new = self._count(uncounted)
        for key, mine in pending.items():
            batch = self._stored_batch(key)
            if batch is None:  # acknowledged meanwhile by another run, or expired
                fresh += mine
                continue
            self._send(key, batch, mine)
            new += len(mine)
        size = self.sink.max_events or len(fresh) or 1
        for start in range(0, len(fresh), size):
            batch = fresh[start : start + size]
            key = batch_key(batch)
            self._claim_batch(key, batch)
            self._send(key, batch, batch)
            new += len(batch)
        return WriteResult(new=new, duplicate=duplicate)

    def undelivered(self, events: Sequence[Event]) -> list[Event]:
        """The events the sink has not acknowledged: what goes to the dead letters when the
        retry window is over. Markers stay: a replay within their TTL sends a batch that was
        in flight again as it was (same key), so the receiver can still drop a repeat."""
        states = self._states(events)
        return [e for e, s in zip(events, states, strict=True) if s not in _ACKNOWLEDGED]

    def _states(self, events: Sequence[Event]) -> list[bytes | None]:
        if not events:
            return []
        found: list[bytes | None] = self._client.mget([self._key(e) for e in events])  # type: ignore[assignment]
        return found

    def _stored_batch(self, key: str) -> list[Event] | None:
        data: bytes | None = self._client.get(keys.forward_batch(self._id, key))  # type: ignore[assignment]
        return None if data is None else _EVENTS_DECODER.decode(data)

    def _claim_batch(self, key: str, batch: list[Event]) -> None:
        taken = self._claim(
            keys=[*map(self._key, batch), keys.forward_batch(self._id, key)],
            args=[_PENDING + key.encode(), self._pending_ttl_s, _EVENTS.encode(batch)],
        )
        if taken:
            raise SinkUnavailableError(
                f"{len(taken)} event(s) are in flight to {self.sink.name} in another batch"
            )

    def _send(self, key: str, batch: list[Event], mine: Sequence[Event]) -> None:
        """Send a claimed batch; once acknowledged, mark `mine` (counted by this call) "d"
        and the batch's other events (another job's, riding in it) "n": counted as new by
        their own job, which then marks them "d"."""
        try:
            self.sink.write_batch(batch)
        except (SinkRejectedError, SinkRefusedError):
            self._release_batch(key, batch)
            raise
        counted = {(e.account, e.event_id) for e in mine}
        with self._client.pipeline(transaction=True) as pipe:
            for event in batch:
                state = _DELIVERED if (event.account, event.event_id) in counted else _UNCOUNTED
                pipe.set(self._key(event), state, ex=self._delivered_ttl_s)
            pipe.delete(keys.forward_batch(self._id, key))
            pipe.execute()

    def _count(self, events: Sequence[Event]) -> int:
        """Events acknowledged in another job's batch: new for this one, now counted."""
        if events:
            with self._client.pipeline(transaction=False) as pipe:
                for event in events:
                    pipe.set(self._key(event), _DELIVERED, ex=self._delivered_ttl_s)
                pipe.execute()
        return len(events)

    def _release_batch(self, key: str, batch: Sequence[Event]) -> None:
        self._release(
            keys=[*map(self._key, batch), keys.forward_batch(self._id, key)],
            args=[_PENDING + key.encode()],
        )

    def _key(self, event: Event) -> str:
        return keys.forwarded(event.account, self._id, event.event_id)
