"""A sink in memory, for tests: keyed like the SQL sinks or append-only like a forward target,
with failures to order."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers.sinks.base import SinkError, SinkRejectedError, WriteResult

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from shared.event import Event
    from shared.persons import Profile


class MemorySink:
    """`rows` by (account, event_id) when keyed; `received`, every event of every write, in
    order, either way (what an append-only target would hold)."""

    keeps_profiles = False

    def __init__(
        self, name: str = "memory", *, keyed: bool = True, max_events: int | None = None
    ) -> None:
        self.name = name
        self.keyed = keyed
        self.max_events = max_events
        self.rows: dict[tuple[str, str], Event] = {}
        self.received: list[Event] = []
        self.writes = 0
        # Raised by every write while set (e.g. SinkUnavailableError: the sink is down).
        self.fail: SinkError | None = None
        # Events for which the whole write is rejected (SinkRejectedError): poison.
        self.reject: Callable[[Event], bool] = lambda _: False
        self.closed = False

    def write_batch(self, events: Sequence[Event]) -> WriteResult:
        """Raises:
        SinkError: `fail`, or SinkRejectedError if `reject` matches an event.
        """
        self.writes += 1
        if self.fail is not None:
            raise self.fail
        if self.max_events is not None and len(events) > self.max_events:
            raise SinkRejectedError(f"{len(events)} events, more than {self.max_events}")
        bad = [e.event_id for e in events if self.reject(e)]
        if bad:
            raise SinkRejectedError(f"refused event(s) {bad}")
        self.received.extend(events)
        new = 0
        for event in events:
            if (event.account, event.event_id) not in self.rows:
                self.rows[event.account, event.event_id] = event
                new += 1
        if not self.keyed:
            return WriteResult(new=len(events), duplicate=0)
        return WriteResult(new=new, duplicate=len(events) - new)

    def upsert_profiles(self, profiles: Sequence[Profile]) -> int:  # noqa: ARG002 - none kept
        return 0

    def close(self) -> None:
        self.closed = True
