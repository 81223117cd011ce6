"""Backoff: how long to wait before trying a failing sink again, per attempt and per sink."""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


def full_jitter(attempt: int, *, base_s: float, cap_s: float) -> float:
    """A uniform wait up to `base_s * 2**attempt` (at most `cap_s`): retries of many clients
    spread out instead of arriving together (AWS's "full jitter")."""
    ceiling: float = min(cap_s, base_s * 2.0 ** min(attempt, 32))
    return random.uniform(0, ceiling)  # noqa: S311 - timing, not secrets


def equal_jitter(attempt: int, *, base_s: float, cap_s: float) -> float:
    """Half the exponential wait for sure, half at random: a floor, so a process probing a
    dead sink never retries at once, and still spread."""
    ceiling: float = min(cap_s, base_s * 2.0 ** min(attempt, 32))
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - timing, not secrets


def retry_after_s(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds an HTTP `Retry-After` asks for (delta-seconds or an HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Breaker:
    """One sink's state in one worker process: after a failure, no attempt before a backoff
    (or the sink's Retry-After) has passed, so workers do not hammer a sink that is down
    nor spin through the queue failing every job at once."""

    def __init__(
        self,
        *,
        base_s: float = 1.0,
        cap_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self._clock = clock
        self.failures = 0
        self._closed_at = 0.0  # clock time from which attempts may go again

    def remaining_s(self) -> float:
        return max(0.0, self._closed_at - self._clock())

    def failed(self, retry_after: float | None = None) -> float:
        """Count a failure; returns the wait it sets."""
        wait = equal_jitter(self.failures, base_s=self.base_s, cap_s=self.cap_s)
        wait = max(wait, retry_after or 0.0)
        self.failures += 1
        self._closed_at = self._clock() + wait
        return wait

    def succeeded(self) -> None:
        self.failures = 0
        self._closed_at = 0.0
