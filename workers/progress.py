"""Each sink's own progress through a job's envelopes, so that a job retried because one
sink failed writes only to the sinks that do not have it yet.

Kept only while it matters: written (with the counters, in one MULTI) when some sink of a
job failed, for the sinks that succeeded; deleted once every sink has the job. A job that
succeeds at once writes none. Without a marker a sink is simply written again: harmless
for a keyed sink (its unique key), and guarded per event for the others (forwarding.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared import keys
from workers.forwarding import sink_id

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    import redis


class Progress:
    def __init__(self, client: redis.Redis, sinks: Sequence[str], *, ttl_s: int) -> None:
        self._client = client
        self._sinks = {name: sink_id(name) for name in sinks}
        self._ttl_s = ttl_s

    def done(self, envelopes: Collection[str]) -> dict[str, set[str]]:
        """Sink name -> the envelopes it already has. One read; none with a single sink
        (nothing to keep apart)."""
        if len(self._sinks) < 2 or not envelopes:  # noqa: PLR2004 - one sink is alone
            return {}
        pairs = [(name, e) for name in self._sinks for e in envelopes]
        found = self._client.mget([self._key(name, e) for name, e in pairs])
        done: dict[str, set[str]] = {}
        for (name, envelope), marker in zip(pairs, found, strict=True):
            if marker is not None:
                done.setdefault(name, set()).add(envelope)
        return done

    def mark(self, pipe: redis.client.Pipeline, sink: str, envelopes: Collection[str]) -> None:
        for envelope in envelopes:
            pipe.set(self._key(sink, envelope), 1, ex=self._ttl_s)

    def clear(self, pipe: redis.client.Pipeline, envelopes: Collection[str]) -> None:
        pipe.delete(*(self._key(name, e) for name in self._sinks for e in envelopes))

    def _key(self, sink: str, envelope: str) -> str:
        return keys.sink_done(self._sinks[sink], envelope)
