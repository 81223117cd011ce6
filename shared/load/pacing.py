"""When to send: a target rate with periodic bursts, and the bounds every run must have."""

from __future__ import annotations

from dataclasses import dataclass

# A run never lasts longer than this, whatever was asked (an hour).
MAX_DURATION_S = 3600.0


class UnboundedRunError(ValueError):
    """A run without a time or count limit, or past the caps: refused before it starts."""


@dataclass(frozen=True, slots=True)
class Burst:
    """`factor` times the rate for `seconds`, every `every` seconds (the first after `every`)."""

    factor: float
    seconds: float
    every: float

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.seconds <= 0 or self.every <= self.seconds:
            raise ValueError(
                "a burst needs factor > 0, seconds > 0 and every > seconds "
                f"(got {self.factor:g}x for {self.seconds:g} s every {self.every:g} s)"
            )

    def active(self, elapsed: float) -> bool:
        return elapsed >= self.every and elapsed % self.every < self.seconds


def check_bounds(duration_s: float | None, requests: int | None) -> float:
    """The run's time limit: `duration_s`, else the cap (a count-only run still ends).

    Raises:
        UnboundedRunError: neither a duration nor a request count, or either out of range.
    """
    if duration_s is None and requests is None:
        raise UnboundedRunError("refusing an unbounded run: give --duration or --requests")
    if requests is not None and requests < 1:
        raise UnboundedRunError(f"--requests must be at least 1 (got {requests})")
    if duration_s is None:
        return MAX_DURATION_S
    if not 0 < duration_s <= MAX_DURATION_S:
        raise UnboundedRunError(
            f"--duration must be in (0, {MAX_DURATION_S:g}] seconds (got {duration_s:g})"
        )
    return duration_s


class Pacer:
    """Send times for a target rate in requests/s (bursts included), or none at max speed.

    Times are seconds since the run started. Slots are handed out in order: a sender that
    falls behind sends its late slots at once, so the average rate holds (open loop), as
    long as the concurrency allows.
    """

    __slots__ = ("_burst", "_next", "_rate")

    def __init__(self, rate: float | None, burst: Burst | None = None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be positive (got {rate:g})")
        if burst is not None and rate is None:
            raise ValueError("bursts need a target rate (--rate)")
        self._rate = rate
        self._burst = burst
        self._next = 0.0

    def rate_at(self, elapsed: float) -> float | None:
        if self._rate is None:
            return None
        if self._burst is not None and self._burst.active(elapsed):
            return self._rate * self._burst.factor
        return self._rate

    def next_slot(self) -> float:
        """When the next request is due; 0 at max speed (always due)."""
        slot = self._next
        rate = self.rate_at(slot)
        if rate is not None:
            self._next = slot + 1.0 / rate
        return slot


def expected_requests(rate: float, duration_s: float, burst: Burst | None = None) -> float:
    """How many requests a paced run of `duration_s` sends (for checks and estimates)."""
    if burst is None:
        return rate * duration_s
    full, rest = divmod(duration_s, burst.every)
    bursts = max(full - 1, 0) * burst.seconds + (min(rest, burst.seconds) if full >= 1 else 0)
    return rate * duration_s + rate * (burst.factor - 1) * bursts
