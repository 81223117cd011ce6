"""Request bodies per dialect, and the event ids they carry (fresh, resent or invalid)."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

# Ids remembered for resending: enough for any duplicate ratio, bounded in memory.
_REMEMBERED_IDS = 100_000
_NAMES = ("page_view", "add_to_cart", "purchase", "signup", "search")
_JSON = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """One HTTP request to send: what it holds and what a correct gateway answers."""

    path: str
    headers: Mapping[str, str]
    body: bytes
    events: int
    duplicates: int  # events whose id was sent before
    invalid: bool  # the gateway must refuse it (4xx)


@dataclass(slots=True)
class EventSource:
    """Native-shaped event dicts: fresh ids, or with `duplicate_ratio` an id already sent.

    Ids are `<prefix>-<n>`, so two sources with different prefixes never collide (one per
    process of a run).
    """

    prefix: str
    duplicate_ratio: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    _next: int = 0
    _sent: deque[str] = field(default_factory=lambda: deque(maxlen=_REMEMBERED_IDS))

    def event(self) -> tuple[dict[str, Any], bool]:
        """(event, whether its id is a resend)."""
        resend = bool(self._sent) and self.rng.random() < self.duplicate_ratio
        if resend:
            event_id = self._sent[self.rng.randrange(len(self._sent))]
        else:
            event_id = f"{self.prefix}-{self._next}"
            self._next += 1
            self._sent.append(event_id)
        n = self.rng.randrange(1000)
        event = {
            "name": _NAMES[n % len(_NAMES)],
            "id": event_id,
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "identity": {"external_id": f"u-{n}"},
            "properties": {"path": f"/p/{n}", "n": n, "ok": True},
        }
        return event, resend

    def events(self, count: int) -> tuple[list[dict[str, Any]], int]:
        """(events, how many of them are resends)."""
        made = [self.event() for _ in range(count)]
        return [e for e, _ in made], sum(resend for _, resend in made)


BodyMaker = Callable[[list[dict[str, Any]], str, bool], LoadRequest]
"""(native-shaped events, API key, make it invalid) -> the request in a dialect's shape."""


def native_request(events: list[dict[str, Any]], key: str, invalid: bool) -> LoadRequest:  # noqa: FBT001 - a BodyMaker
    """`POST /v1/events`: one object for a single event, else an array. Invalid: one event
    gets an empty name, which the strict default refuses as a whole (422)."""
    if invalid:
        events = [*events[:-1], {**events[-1], "name": ""}]
    payload: object = events[0] if len(events) == 1 else events
    return LoadRequest(
        path="/v1/events",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        body=_JSON.encode(payload),
        events=len(events),
        duplicates=0,
        invalid=invalid,
    )


# Dialect name -> body maker. A dialect whose route the front door serves adds itself here.
BODY_MAKERS: dict[str, BodyMaker] = {"native": native_request}


@dataclass(slots=True)
class RequestMaker:
    """The requests of one generator: `batch` events each, `invalid_ratio` of them invalid."""

    dialect: str
    keys: list[str]
    batch: int
    source: EventSource
    invalid_ratio: float = 0.0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.dialect not in BODY_MAKERS:
            known = ", ".join(sorted(BODY_MAKERS))
            raise ValueError(f"unknown dialect {self.dialect!r}; known: {known}")
        if not self.keys:
            raise ValueError("at least one API key is needed")

    def next(self) -> LoadRequest:
        events, resent = self.source.events(self.batch)
        invalid = self.rng.random() < self.invalid_ratio
        key = self.keys[self.rng.randrange(len(self.keys))]
        made = BODY_MAKERS[self.dialect](events, key, invalid)
        return LoadRequest(
            path=made.path,
            headers=made.headers,
            body=made.body,
            events=made.events,
            duplicates=resent,
            invalid=made.invalid,
        )
