"""The dead-letter registry: events a sink refused for good, or that waited out the retry
window, kept in Redis with why, until replayed or purged (`eventgate dlq`).

One entry holds the canonical events that failed on one sink for one account: a poison
event alone, or a job's events once its retries ran out. rq's FailedJobRegistry still holds
what no sink ever saw (an envelope no worker can read, a crash the retries did not cure).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

import msgspec

from shared import keys
from shared.event import Event
from shared.scripts import lua

if TYPE_CHECKING:
    from collections.abc import Sequence

    import redis

# rejected: the sink refused these events' data (found by bisecting the batch);
# refused: the sink refuses every batch (credentials, URL); exhausted: the sink stayed
# unavailable for the whole retry window.
Kind = Literal["rejected", "refused", "exhausted"]

_EVENTS = msgspec.msgpack.Encoder()
_EVENTS_DECODER = msgspec.msgpack.Decoder(list[Event])
# The hash fields besides `events`, for listing without reading every event.
_FIELDS = (
    "sink",
    "account",
    "kind",
    "reason",
    "attempts",
    "first_failure",
    "last_failure",
    "count",
    "counted",
)


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """One entry; `events` is empty when listed (read with `get`)."""

    id: str
    sink: str
    account: str
    kind: str
    reason: str
    attempts: int
    first_failure: datetime
    last_failure: datetime
    count: int
    # Whether its events are in the account's `dead_lettered` counter: only the first sink's
    # outcome is counted per account, so that the counters add up to `accepted`.
    counted: bool
    events: list[Event] = []


def entry_id(sink: str, events: Sequence[Event]) -> str:
    """The same events failing on the same sink make the same entry."""
    pairs = [[e.account, e.event_id] for e in events]
    return "dl-" + hashlib.sha256(msgspec.msgpack.encode([sink, pairs])).hexdigest()[:32]


class DeadLetters:
    """The registry on one (sync) Redis client."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._add = client.register_script(lua("dead_letter_add"))
        self._remove = client.register_script(lua("dead_letter_remove"))

    def add(  # noqa: PLR0913 - an entry has this many facts
        self,
        *,
        sink: str,
        events: Sequence[Event],
        kind: Kind | str,
        reason: str,
        attempts: int = 1,
        first_failure: datetime | None = None,
        counted: bool,
        copy: bool = True,
    ) -> str:
        """Dead-letter `events` (all of one account) for `sink`; returns the entry id. The
        same events again on the same sink update the entry (attempts, last failure, reason)
        rather than adding one; if `copy` (another job's events: a producer's resend) they
        are counted as duplicates, as a sink would count them.

        Raises:
            redis.exceptions.RedisError: not stored; the caller's job fails and is retried.
        """
        now = datetime.now(UTC)
        first = first_failure or now
        account = events[0].account
        entry = entry_id(sink, events)
        fields: dict[str, str | bytes] = {
            "sink": sink,
            "account": account,
            "kind": kind,
            "reason": reason[:2000],
            "first_failure": first.isoformat(),
            "last_failure": now.isoformat(),
            "count": str(len(events)),
            "counted": "1" if counted else "0",
            "events": _EVENTS.encode(list(events)),
        }
        args: list[str | bytes | int | float] = [
            entry,
            now.timestamp(),
            len(events),
            "1" if counted else "0",
            attempts,
            "1" if copy else "0",
        ]
        for name, value in fields.items():
            args += [name, value]
        self._add(
            keys=[keys.dead_letter(entry), keys.DEAD_LETTERS, keys.counters(account)], args=args
        )
        return entry

    def list(self, limit: int = 1000) -> list[DeadLetter]:
        """The oldest `limit` entries, without their events."""
        found: list[bytes] = self._client.zrange(keys.DEAD_LETTERS, 0, limit - 1)  # type: ignore[assignment]
        ids = [i.decode() for i in found]
        with self._client.pipeline(transaction=False) as pipe:
            for entry in ids:
                pipe.hmget(keys.dead_letter(entry), _FIELDS)
            rows = pipe.execute()
        return [
            _entry(entry, dict(zip(_FIELDS, row, strict=True)))
            for entry, row in zip(ids, rows, strict=True)
            if row[0] is not None  # removed between the two reads
        ]

    def get(self, entry: str) -> DeadLetter | None:
        """The entry with its events, or None."""
        raw: dict[bytes, bytes] = self._client.hgetall(keys.dead_letter(entry))  # type: ignore[assignment]
        if not raw:
            return None
        fields: dict[str, bytes | None] = {k.decode(): v for k, v in raw.items()}
        return _entry(entry, fields, _EVENTS_DECODER.decode(raw[b"events"]))

    def remove(self, letter: DeadLetter, *, replayed: tuple[int, int] | None = None) -> bool:
        """Remove an entry: after a replay wrote its events (`replayed`: how many were new,
        how many the sink had), or purged (None). False if it was gone already."""
        new, duplicate = replayed or (0, 0)
        done = self._remove(
            keys=[
                keys.dead_letter(letter.id),
                keys.DEAD_LETTERS,
                keys.counters(letter.account),
            ],
            args=[letter.id, "1" if replayed else "0", new, duplicate],
        )
        return bool(done)

    def count(self) -> int:
        return int(self._client.zcard(keys.DEAD_LETTERS))


def _entry(
    entry: str, fields: dict[str, bytes | None], events: list[Event] | None = None
) -> DeadLetter:
    def text(name: str) -> str:
        value = fields.get(name)
        return value.decode() if isinstance(value, bytes) else ""

    return DeadLetter(
        id=entry,
        sink=text("sink"),
        account=text("account"),
        kind=text("kind"),
        reason=text("reason"),
        attempts=int(text("attempts") or 0),
        first_failure=datetime.fromisoformat(text("first_failure")),
        last_failure=datetime.fromisoformat(text("last_failure")),
        count=int(text("count") or 0),
        counted=text("counted") == "1",
        events=events or [],
    )
