"""A job's events into every sink: each sink with its own progress and backoff, so one that
fails neither blocks nor duplicates the others; poison events bisected out; what fails for
good dead-lettered."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from shared import keys, stats
from shared.dead_letters import DeadLetters
from shared.event import Event
from shared.persons import Sighting
from workers.backoff import Breaker
from workers.bisection import write_bisecting
from workers.forwarding import ForwardGuard
from workers.profiles import ProfileRecorder
from workers.progress import Progress
from workers.retries import current_attempt
from workers.sinks.base import (
    SinkRefusedError,
    SinkRejectedError,
    SinkUnavailableError,
    WriteResult,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import redis

    from shared.dead_letters import Kind
    from workers.sinks.base import Sink

log = structlog.get_logger("workers.delivery")

# How long progress and in-flight markers outlive the retry window (clock skew, slow runs).
_MARGIN_S = 3600


def envelope_id(data: bytes) -> str:
    """An envelope's identity: its bytes, so every run of its job (and a rider's) agrees."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class Unit:
    """One envelope's events of one account, and the profile updates they came with."""

    envelope: str
    account: str
    events: list[Event]
    updates: list[Sighting] = field(default_factory=list)
    # Deferred events queued again (paid for when held back; see workers/limits.py).
    prepaid: bool = False


@dataclass(slots=True)
class _Written:
    """What one sink did with a job: per account, and what it cost."""

    counts: dict[str, WriteResult] = field(default_factory=dict)
    dead_lettered: int = 0
    profiles: int = 0
    seconds: list[float] = field(default_factory=list)


class DeliveryError(SinkUnavailableError):
    """Some sinks were unavailable; the others' progress is kept for the retry."""

    def __init__(self, failed: dict[str, SinkUnavailableError]) -> None:
        waits = [e.retry_after for e in failed.values() if e.retry_after is not None]
        super().__init__(
            "; ".join(f"{name}: {exc}" for name, exc in failed.items()),
            retry_after=max(waits) if waits else None,
        )
        self.failed = failed


class _BackingOffError(SinkUnavailableError):
    """Not tried: the sink's backoff has not passed (not a failure of its own)."""


class Delivery:
    """The sinks of one worker process, the first one the account counters follow."""

    def __init__(  # noqa: PLR0913 - the knobs of delivery, all keyword-only
        self,
        sinks: Sequence[Sink],
        client: redis.Redis,
        *,
        retry_window_s: int,
        marker_ttl_s: int,
        backoff_max_s: float = 30.0,
        stopping: threading.Event | None = None,
    ) -> None:
        names = [s.name for s in sinks]
        if not sinks or len(set(names)) != len(names):
            raise ValueError(f"sinks need distinct names: {names}")
        self.sinks = list(sinks)
        # Only the first sink's outcome is counted per account (persisted, duplicate,
        # dead_lettered), so that the counters add up to `accepted` whatever the others do.
        self.primary = names[0]
        self._client = client
        self._letters = DeadLetters(client)
        self._progress = Progress(client, names, ttl_s=retry_window_s + _MARGIN_S)
        self._guards = {
            s.name: ForwardGuard(
                client, s, pending_ttl_s=retry_window_s + _MARGIN_S, delivered_ttl_s=marker_ttl_s
            )
            for s in sinks
            if not s.keyed
        }
        self._profiles = {s.name: ProfileRecorder(s, client) for s in sinks if s.keeps_profiles}
        # After a failure a sink is tried again after a backoff of up to `backoff_max_s`;
        # a job meeting a sink in backoff waits it out when no other sink could use the
        # time: that holds one job while the rest stay queued, where failing at once would
        # spin through the queue (EVENTGATE_SINK_BACKOFF_MAX_S; well under the job timeout,
        # and a stop cuts the wait short).
        self.breakers = {name: Breaker(cap_s=backoff_max_s) for name in names}
        self._stopping = stopping or threading.Event()
        self._pause_cap_s = backoff_max_s

    def deliver(
        self,
        units: Sequence[Unit],
        *,
        on_commit: Callable[[redis.client.Pipeline], None] | None = None,
    ) -> dict[str, int]:
        """Write the units to every sink that does not have them yet.

        Steps: read which sinks already have which envelopes (a retried job); per sink, wait
        out or skip its backoff, then write each account's events (bisecting a rejected
        batch; the refused events are dead-lettered) and upsert the profiles; one MULTI
        then counts the first sink's outcome per account and, if a sink failed, records the
        progress of those that did not, for the retry. `on_commit` adds its commands to
        that MULTI when every sink succeeded (deferred jobs, their counts).

        Returns totals for the log line.

        Raises:
            DeliveryError: some sinks were unavailable; the job is retried for them only.
        """
        envelopes = {u.envelope for u in units}
        done = self._progress.done(envelopes)
        written: dict[str, _Written] = {}
        failed: dict[str, SinkUnavailableError] = {}
        for sink in self.sinks:
            todo = [u for u in units if u.envelope not in done.get(sink.name, ())]
            if not todo:
                continue
            breaker = self.breakers[sink.name]
            try:
                self._wait_for(sink)
                written[sink.name] = self._write(sink, todo)
            except _BackingOffError as exc:
                failed[sink.name] = exc
            except SinkUnavailableError as exc:
                wait = breaker.failed(exc.retry_after)
                failed[sink.name] = exc
                log.warning("sink.unavailable", sink=sink.name, error=str(exc), wait_s=wait)
            else:
                breaker.succeeded()
        self._commit(envelopes, written, failed, stale=bool(done), on_commit=on_commit)
        if failed:
            raise DeliveryError(failed)
        first = written.get(self.primary, _Written())
        return {
            "persisted": sum(r.new for r in first.counts.values()),
            "duplicate": sum(r.duplicate for r in first.counts.values()),
            "dead_lettered": sum(w.dead_lettered for w in written.values()),
            "profiles": sum(w.profiles for w in written.values()),
        }

    def give_up(self, units: Sequence[Unit], error: SinkUnavailableError) -> int:
        """The retry window is over: dead-letter, for each sink that still failed, the
        units' events it does not have. Returns the events dead-lettered.

        Raises:
            redis.exceptions.RedisError: nothing is lost; the job fails and runs again.
        """
        failed = error.failed if isinstance(error, DeliveryError) else {}
        envelopes = {u.envelope for u in units}
        done = self._progress.done(envelopes)
        count = 0
        for sink in self.sinks:
            if failed and sink.name not in failed:
                continue
            todo = [u for u in units if u.envelope not in done.get(sink.name, ())]
            for events in _by_account(todo).values():
                guard = self._guards.get(sink.name)
                left = guard.undelivered(events) if guard else events
                if left:
                    reason = str(failed.get(sink.name, error))
                    self._dead_letter(sink, left, "exhausted", reason)
                    count += len(left)
        with self._client.pipeline(transaction=True) as pipe:
            self._progress.clear(pipe, envelopes)
            pipe.execute()
        return count

    def _wait_for(self, sink: Sink) -> None:
        """Return once the sink's backoff has passed: at once if it has; waiting (up to the
        cap) if no other sink could do anything meanwhile.

        Raises:
            _BackingOffError: still backing off (another sink is healthy, so the job goes
                back for later rather than hold the worker; or the wait was cut short).
        """
        breaker = self.breakers[sink.name]
        wait = breaker.remaining_s()
        if wait <= 0:
            return
        others_healthy = any(
            b.remaining_s() <= 0 for name, b in self.breakers.items() if name != sink.name
        )
        if not others_healthy:
            log.info("sink.backing_off", sink=sink.name, wait_s=round(wait, 2))
            self._stopping.wait(min(wait, self._pause_cap_s))
            wait = breaker.remaining_s()
            if wait <= 0 and not self._stopping.is_set():
                return
        raise _BackingOffError(f"backing off after failures ({wait:.1f} s left)", retry_after=wait)

    def _write(self, sink: Sink, units: Sequence[Unit]) -> _Written:
        """Each account's events in one write (bisected if rejected), then the profiles.

        Raises:
            SinkUnavailableError: as the sink's write.
        """
        guard = self._guards.get(sink.name)
        write: Callable[[Sequence[Event]], WriteResult] = guard.write if guard else sink.write_batch
        by_account = _by_account(units)
        written = _Written()
        for account, events in by_account.items():
            started = time.perf_counter()
            try:
                result, refused = write_bisecting(write, events)
            except SinkRefusedError as exc:
                self._dead_letter(sink, events, "refused", str(exc))
                written.dead_lettered += len(events)
                continue
            written.seconds.append(time.perf_counter() - started)
            for bad in refused:
                self._dead_letter(sink, bad.events, "rejected", bad.reason)
                written.dead_lettered += len(bad.events)
            written.counts[account] = result
        recorder = self._profiles.get(sink.name)
        if recorder is not None:
            updates = [s for u in units for s in u.updates]
            try:
                written.profiles = recorder.record(by_account, updates)
            except (SinkRejectedError, SinkRefusedError) as exc:
                # Profiles are derived data: losing one update beats holding the events.
                log.error("profiles.rejected", sink=sink.name, error=str(exc))  # noqa: TRY400 - expected, no traceback
        return written

    def _dead_letter(self, sink: Sink, events: Sequence[Event], kind: Kind, reason: str) -> None:
        attempt = current_attempt()
        entry = self._letters.add(
            sink=sink.name,
            events=events,
            kind=kind,
            reason=reason,
            attempts=attempt.number,
            first_failure=attempt.first_failure or datetime.now(UTC),
            counted=sink.name == self.primary,
        )
        log.warning(
            "batch.dead_lettered",
            sink=sink.name,
            account=events[0].account,
            events=len(events),
            kind=kind,
            entry=entry,
            reason=reason[:200],
        )

    def _commit(
        self,
        envelopes: set[str],
        written: dict[str, _Written],
        failed: dict[str, SinkUnavailableError],
        *,
        stale: bool,
        on_commit: Callable[[redis.client.Pipeline], None] | None,
    ) -> None:
        """One MULTI: the first sink's counts, the write latencies, and the progress kept
        for a retry (or cleared once every sink has the job). Counted after the writes: a
        crash in between makes the retry count these events as duplicates, so persisted +
        duplicate still covers accepted."""
        with self._client.pipeline(transaction=True) as pipe:
            first = written.get(self.primary)
            for account, result in (first.counts if first else {}).items():
                pipe.hincrby(keys.counters(account), "persisted", result.new)
                pipe.hincrby(keys.counters(account), "duplicate", result.duplicate)
            for outcome in written.values():
                for seconds in outcome.seconds:
                    stats.record_sink_write(pipe, seconds)
            if failed:
                for name in written:
                    self._progress.mark(pipe, name, envelopes)
            else:
                if stale:
                    self._progress.clear(pipe, envelopes)
                if on_commit is not None:
                    on_commit(pipe)
            pipe.execute()


def _by_account(units: Sequence[Unit]) -> dict[str, list[Event]]:
    by_account: dict[str, list[Event]] = {}
    for unit in units:
        by_account.setdefault(unit.account, []).extend(unit.events)
    return by_account
