"""A batch's way from queue envelope to sink rows, counted per account."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec
import structlog

from shared.envelope import EnvelopeError, decode_batch
from shared.formats import deferred, normalise, read_profiles
from workers.delivery import Delivery, Unit, envelope_id
from workers.limits import ProcessLimits, hold_back

if TYPE_CHECKING:
    import threading

    import redis

    from shared.event import Event
    from workers.sinks.base import Sink, SinkUnavailableError

log = structlog.get_logger("workers.batch")


class PoisonBatchError(Exception):
    """The batch can never succeed (corrupt or unknown format); retrying is pointless."""


class BatchProcessor:
    """Normalises a batch and writes it to the sinks; one per worker process, so the sink
    connections are reused across jobs."""

    def __init__(  # noqa: PLR0913 - the worker's settings, all but three keyword-only
        self,
        sinks: Sink | Sequence[Sink],
        client: redis.Redis,
        limits: ProcessLimits | None = None,
        *,
        retry_window_s: int = 86_400,
        marker_ttl_s: int = 86_400,
        backoff_max_s: float = 30.0,
        stopping: threading.Event | None = None,
    ) -> None:
        self.sinks = list(sinks) if isinstance(sinks, Sequence) else [sinks]
        self.sink = self.sinks[0]
        self._client = client
        self.limits = limits  # processing rate limits (workers/limits.py); None: none
        # EVENTGATE_SINK_RETRY_FOR_S: how long a job is retried for an unavailable sink.
        self.retry_window_s = retry_window_s
        self.delivery = Delivery(
            self.sinks,
            client,
            retry_window_s=retry_window_s,
            marker_ttl_s=marker_ttl_s,
            backoff_max_s=backoff_max_s,
            stopping=stopping,
        )

    def process(self, envelopes: Sequence[bytes]) -> list[int]:
        """Write the events of a job's envelope and of the riders' after it, together.

        Steps: decode every envelope and normalise its parts into canonical events; hold
        back what is over an account's processing rate; deliver the rest to every sink
        (workers/delivery.py: each account's events in one call per sink, a sink's unique key
        or markers making a retried or resent event a duplicate, never a second row; the
        profiles; the counts, with the deferred jobs).

        Returns the indexes of riders that cannot be read: left out, for their own job.

        Raises:
            PoisonBatchError: the job's own envelope cannot be read; never retried.
            DeliveryError: a sink is unavailable; rq retries the job for it, with backoff.
        """
        started = time.perf_counter()
        units, unreadable = self._units(envelopes)
        by_account, prepaid = _fresh_and_prepaid(units)
        # Over an account's rate: by_account keeps what fits now, the rest is deferred.
        deferral = hold_back(self.limits, by_account, prepaid)
        with deferral:
            # The deferred jobs are queued with the counts, once every sink has the rest.
            totals = self.delivery.deliver(_kept(units, by_account), on_commit=deferral.queue)
        log.info(
            "batch.flushed",
            accounts=len(by_account),
            **totals,
            deferred=deferral.held,
            envelopes=len(envelopes),
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return unreadable

    def give_up(self, data: bytes, error: SinkUnavailableError) -> int:
        """The job's retry window is over: dead-letter its own envelope's events for the
        sinks that still lack them (riders run on their own). Returns the events.

        Raises:
            redis.exceptions.RedisError: nothing is lost; the job fails and runs again.
        """
        units, _ = self._units([data])
        return self.delivery.give_up(units, error)

    @staticmethod
    def _units(envelopes: Sequence[bytes]) -> tuple[list[Unit], list[int]]:
        """Each envelope's events per account (deferred parts apart), with the profile
        updates besides their identities, and the indexes of the riders that cannot be read.

        Raises:
            PoisonBatchError: the first envelope (the job's own) cannot be read.
        """
        units: dict[tuple[str, str, bool], Unit] = {}
        unreadable: list[int] = []
        for index, data in enumerate(envelopes):
            try:
                parts = [(p, normalise(p), read_profiles(p)) for p in decode_batch(data).parts]
            except (EnvelopeError, msgspec.DecodeError, KeyError, RecursionError) as exc:
                if index == 0:
                    raise PoisonBatchError(f"unreadable batch: {exc}") from exc
                unreadable.append(index)
                continue
            envelope = envelope_id(data)
            for part, events, updates in parts:
                prepaid = part.dialect == deferred.DIALECT
                key = (envelope, part.account, prepaid)
                unit = units.setdefault(key, Unit(envelope, part.account, [], [], prepaid))
                unit.events.extend(events)
                unit.updates.extend(updates)
        return list(units.values()), unreadable


def _fresh_and_prepaid(
    units: Sequence[Unit],
) -> tuple[dict[str, list[Event]], dict[str, list[Event]]]:
    """The fresh events by account, and the deferred ones (paid for already), for
    `hold_back`."""
    fresh: dict[str, list[Event]] = {}
    prepaid: dict[str, list[Event]] = {}
    for unit in units:
        (prepaid if unit.prepaid else fresh).setdefault(unit.account, []).extend(unit.events)
    return fresh, prepaid


def _kept(units: Sequence[Unit], by_account: dict[str, list[Event]]) -> list[Unit]:
    """The units with only the events `hold_back` left in `by_account` (the others are
    deferred): the same event objects, so kept by identity."""
    kept = {id(event) for events in by_account.values() for event in events}
    trimmed = [
        dataclasses.replace(unit, events=[e for e in unit.events if id(e) in kept])
        for unit in units
    ]
    return [unit for unit in trimmed if unit.events or unit.updates]
