"""Replaying dead letters (`eventgate dlq replay`, which runs `python -m workers.replay`):
each entry's events written again to its own sink, exactly once like the rest.

A replayed event meets what any retried one does: a keyed sink's unique key, or a forward
sink's markers (an event it acknowledged is not sent again; a batch left in flight is sent
again as it was, with its key). The entry goes only once its events are written, with the
account counters moved from dead_lettered to persisted / duplicate in the same script;
events the sink still refuses are bisected out and stay dead-lettered.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
import structlog

from shared.dead_letters import DeadLetter, DeadLetters, entry_id
from shared.errors import ConfigError
from shared.logging import configure_logging
from shared.redis_server import redis_url_for
from shared.settings import settings_or_exit
from workers.bisection import write_bisecting
from workers.forwarding import ForwardGuard
from workers.profiles import ProfileRecorder
from workers.sinks import open_sinks
from workers.sinks.base import SinkError, SinkRefusedError, SinkUnavailableError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from shared.event import Event
    from workers.sinks.base import Sink, WriteResult

log = structlog.get_logger("workers.replay")


@dataclass(frozen=True, slots=True)
class Replayed:
    entry: str
    outcome: str  # replayed | refused | unavailable | no-sink | gone
    new: int = 0
    duplicate: int = 0
    refused: int = 0
    detail: str = ""


class Replayer:
    """Writes dead letters back to the sinks of this process's settings."""

    def __init__(
        self,
        sinks: Sequence[Sink],
        client: redis.Redis,
        *,
        pending_ttl_s: int,
        delivered_ttl_s: int,
    ) -> None:
        self.sinks = {s.name: s for s in sinks}
        self.letters = DeadLetters(client)
        self._client = client
        self._guards = {
            s.name: ForwardGuard(
                client, s, pending_ttl_s=pending_ttl_s, delivered_ttl_s=delivered_ttl_s
            )
            for s in sinks
            if not s.keyed
        }

    def select(
        self, entries: Sequence[str], *, sink: str | None = None, account: str | None = None
    ) -> list[str]:
        """The ids named, or every entry (of `sink`, of `account`) if none is named."""
        if entries:
            return list(entries)
        return [
            letter.id
            for letter in self.letters.list(limit=1_000_000)
            if (sink is None or letter.sink == sink)
            and (account is None or letter.account == account)
        ]

    def replay(self, entry: str) -> Replayed:
        """Write one entry's events to its sink; remove it if they all went in.

        Raises:
            redis.exceptions.RedisError: Redis unreachable; nothing is lost (the entry stays
                until its events are written and it is removed, in that order).
        """
        letter = self.letters.get(entry)
        if letter is None:
            return Replayed(entry, "gone")
        sink = self.sinks.get(letter.sink)
        if sink is None:
            return Replayed(entry, "no-sink", detail=f"{letter.sink} is not in EVENTGATE_SINK")
        guard = self._guards.get(sink.name)
        write: Callable[[Sequence[Event]], WriteResult] = guard.write if guard else sink.write_batch
        try:
            result, refused = write_bisecting(write, letter.events)
        except (SinkUnavailableError, SinkRefusedError) as exc:
            kind = "refused" if isinstance(exc, SinkRefusedError) else letter.kind
            self._keep(letter, letter.events, kind, f"replay: {exc}")
            outcome = "refused" if kind == "refused" else "unavailable"
            return Replayed(entry, outcome, detail=str(exc))
        still = 0
        for bad in refused:
            still += len(bad.events)
            self._keep(letter, bad.events, "rejected", bad.reason)
        if refused and entry_id(letter.sink, refused[0].events) == letter.id:
            return Replayed(entry, "refused", refused=still, detail=refused[0].reason)
        refused_ids = {id(e) for bad in refused for e in bad.events}
        self._profiles(sink, [e for e in letter.events if id(e) not in refused_ids])
        self.letters.remove(letter, replayed=(result.new, result.duplicate))
        return Replayed(entry, "replayed", result.new, result.duplicate, still)

    def _keep(self, letter: DeadLetter, events: Sequence[Event], kind: str, reason: str) -> None:
        """Dead-letter these events again: the same entry (attempts + 1) when they are all of
        its events, else an entry of their own."""
        self.letters.add(
            sink=letter.sink,
            events=events,
            kind=kind,
            reason=reason,
            first_failure=letter.first_failure,
            counted=letter.counted,
            copy=False,
        )

    def _profiles(self, sink: Sink, events: list[Event]) -> None:
        """The profiles the written events' identities make, as a worker would have."""
        if not sink.keeps_profiles or not events:
            return
        try:
            ProfileRecorder(sink, self._client).record({events[0].account: events}, [])
        except SinkError as exc:
            # Derived data: the events are in; a profile row comes with the next sighting.
            log.warning("replay.profiles_failed", sink=sink.name, error=str(exc))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eventgate dlq replay", description=__doc__)
    parser.add_argument("entries", nargs="*", help="entry ids (default: every entry)")
    parser.add_argument("--sink", help="only entries of this sink")
    parser.add_argument("--account", help="only entries of this account")
    args = parser.parse_args(argv)
    settings = settings_or_exit()
    configure_logging(settings)
    with redis_url_for(settings) as url:
        client = redis.Redis.from_url(url)
        try:
            sinks = open_sinks(settings.sink_url)
        except (ConfigError, SinkUnavailableError) as exc:
            raise SystemExit(f"eventgate: cannot open the sinks: {exc}") from None
        try:
            replayer = Replayer(
                sinks,
                client,
                pending_ttl_s=settings.sink_retry_for_s + 3600,
                delivered_ttl_s=settings.sink_marker_ttl_s,
            )
            results = [
                replayer.replay(e)
                for e in replayer.select(args.entries, sink=args.sink, account=args.account)
            ]
        finally:
            for sink in sinks:
                sink.close()
    for r in results:
        figures = f"{r.new} new, {r.duplicate} duplicate" if r.outcome == "replayed" else ""
        refused = f", {r.refused} still refused" if r.refused else ""
        detail = f": {r.detail}" if r.detail and r.outcome != "replayed" else ""
        sys.stdout.write(f"{r.entry}  {r.outcome}  {figures}{refused}{detail}\n")
    sys.stdout.write(f"{sum(r.outcome == 'replayed' for r in results)}/{len(results)} replayed\n")
    if any(r.outcome not in {"replayed", "gone"} for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
