"""What a load run counts: answers by class, events, and a mergeable latency histogram."""

from __future__ import annotations

import math

import msgspec

# Latency buckets grow by 2 %: percentiles within 2 % of the truth at any scale, from 10 us
# to minutes, in a few hundred counters that add up across processes.
_GROWTH = 1.02
_LOG_GROWTH = math.log(_GROWTH)
_FLOOR_US = 10.0

OUTCOMES = ("2xx", "4xx", "429", "503", "5xx", "error")


def outcome(status: int | None) -> str:
    """The column an answer counts in; None is a connection error or timeout."""
    if status is None:
        return "error"
    if status in (429, 503):
        return str(status)
    if 200 <= status < 300:  # noqa: PLR2004 - HTTP classes
        return "2xx"
    if 400 <= status < 500:  # noqa: PLR2004
        return "4xx"
    return "5xx"


class Histogram(msgspec.Struct, kw_only=True):
    """Counts per logarithmic latency bucket; merged by adding."""

    counts: dict[int, int] = {}

    @staticmethod
    def bucket(seconds: float) -> int:
        us = max(seconds * 1e6, _FLOOR_US)
        return int(math.log(us / _FLOOR_US) / _LOG_GROWTH)

    def record(self, seconds: float) -> None:
        b = self.bucket(seconds)
        self.counts[b] = self.counts.get(b, 0) + 1

    def merge(self, other: Histogram) -> None:
        for b, n in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentile(self, q: float) -> float:
        """The `q`-th percentile (0-100) in seconds (a bucket's upper edge); 0 if empty."""
        total = self.total
        if not total:
            return 0.0
        rank = max(1, math.ceil(total * q / 100))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return _FLOOR_US * _GROWTH ** (b + 1) / 1e6
        return 0.0  # unreachable: seen ends at total


class Stats(msgspec.Struct, kw_only=True):
    """Counters of one run (or one process of it); `merge` adds another's."""

    sent: int = 0
    answers: dict[str, int] = {}  # outcome -> requests
    events_sent: int = 0
    events_accepted: int = 0  # events of 2xx answers
    duplicates_sent: int = 0
    invalid_sent: int = 0
    unexpected: int = 0  # an invalid request accepted, or a valid one refused with 4xx
    latency: Histogram = msgspec.field(default_factory=Histogram)
    elapsed_s: float = 0.0

    def record(
        self,
        status: int | None,
        seconds: float,
        *,
        events: int,
        duplicates: int,
        invalid: bool,
    ) -> None:
        kind = outcome(status)
        self.sent += 1
        self.answers[kind] = self.answers.get(kind, 0) + 1
        self.events_sent += events
        self.duplicates_sent += duplicates
        self.invalid_sent += invalid
        if kind == "2xx":
            self.events_accepted += events
        if (invalid and kind == "2xx") or (not invalid and kind == "4xx"):
            self.unexpected += 1
        if status is not None:
            self.latency.record(seconds)

    def merge(self, other: Stats) -> None:
        self.sent += other.sent
        for kind, n in other.answers.items():
            self.answers[kind] = self.answers.get(kind, 0) + n
        self.events_sent += other.events_sent
        self.events_accepted += other.events_accepted
        self.duplicates_sent += other.duplicates_sent
        self.invalid_sent += other.invalid_sent
        self.unexpected += other.unexpected
        self.latency.merge(other.latency)
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)

    def summary(self) -> dict[str, float | int]:
        """Flat figures for people and machines."""
        elapsed = self.elapsed_s or 1e-9
        return {
            "elapsed_s": round(self.elapsed_s, 3),
            "sent": self.sent,
            **{kind: self.answers.get(kind, 0) for kind in OUTCOMES},
            "requests_per_s": round(self.sent / elapsed, 1),
            "events_sent": self.events_sent,
            "events_accepted": self.events_accepted,
            "events_accepted_per_s": round(self.events_accepted / elapsed, 1),
            "duplicates_sent": self.duplicates_sent,
            "invalid_sent": self.invalid_sent,
            "unexpected": self.unexpected,
            "latency_p50_ms": round(self.latency.percentile(50) * 1000, 3),
            "latency_p90_ms": round(self.latency.percentile(90) * 1000, 3),
            "latency_p99_ms": round(self.latency.percentile(99) * 1000, 3),
            "latency_max_ms": round(self.latency.percentile(100) * 1000, 3),
        }
