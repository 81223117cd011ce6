"""A batch's way from queue envelope to sink rows, counted per account."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec
import structlog

from shared import keys
from shared.envelope import EnvelopeError, decode_batch
from shared.formats import normalise, read_profiles
from workers.profiles import ProfileRecorder

if TYPE_CHECKING:
    from collections.abc import Sequence

    import redis

    from shared.event import Event
    from shared.persons import Sighting
    from workers.sinks.base import Sink

log = structlog.get_logger("workers.batch")


class PoisonBatchError(Exception):
    """The batch can never succeed (corrupt or unknown format); retrying is pointless."""


class BatchProcessor:
    """Normalises a batch and writes it to the sink; one per worker process, so the sink
    connection is reused across jobs."""

    def __init__(self, sink: Sink, client: redis.Redis) -> None:
        self.sink = sink
        self._client = client
        self._profiles = ProfileRecorder(sink, client)

    def process(self, envelopes: Sequence[bytes]) -> list[int]:
        """Write the events of a job's envelope and of the riders' after it, together.

        Steps: decode every envelope and normalise its parts into canonical events; write
        each account's events to the sink in one call (its unique key makes a retried or
        resent event a duplicate, never a second row); upsert the persons the batch shows
        into the profiles (one more call); count new and duplicate events.

        Returns the indexes of riders that cannot be read: left out, for their own job.

        Raises:
            PoisonBatchError: the job's own envelope cannot be read; never retried.
            SinkUnavailableError: the sink is down; rq retries the job with backoff.
        """
        started = time.perf_counter()
        by_account, profile_updates, unreadable = self._events_by_account(envelopes)
        totals = {"persisted": 0, "duplicate": 0, "profiles": 0}
        with self._client.pipeline(transaction=False) as pipe:
            for account, events in by_account.items():
                result = self.sink.write_batch(events)
                pipe.hincrby(keys.counters(account), "persisted", result.new)
                pipe.hincrby(keys.counters(account), "duplicate", result.duplicate)
                totals["persisted"] += result.new
                totals["duplicate"] += result.duplicate
            totals["profiles"] = self._profiles.record(by_account, profile_updates)
            # Counted after the writes: a crash in between makes the retry count these
            # events as duplicates, so persisted + duplicate still adds up to accepted.
            pipe.execute()
        log.info(
            "batch.flushed",
            accounts=len(by_account),
            **totals,
            envelopes=len(envelopes),
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return unreadable

    @staticmethod
    def _events_by_account(
        envelopes: Sequence[bytes],
    ) -> tuple[dict[str, list[Event]], list[Sighting], list[int]]:
        """The events by account, the profile updates besides their identities, and the
        indexes of the riders that cannot be read.

        Raises:
            PoisonBatchError: the first envelope (the job's own) cannot be read.
        """
        by_account: dict[str, list[Event]] = {}
        profile_updates: list[Sighting] = []
        unreadable: list[int] = []
        for index, data in enumerate(envelopes):
            try:
                parts = [(p, normalise(p), read_profiles(p)) for p in decode_batch(data).parts]
            except (EnvelopeError, msgspec.DecodeError, KeyError, RecursionError) as exc:
                if index == 0:
                    raise PoisonBatchError(f"unreadable batch: {exc}") from exc
                unreadable.append(index)
                continue
            for part, events, updates in parts:
                by_account.setdefault(part.account, []).extend(events)
                profile_updates.extend(updates)
        return by_account, profile_updates, unreadable
