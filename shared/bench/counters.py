"""The benchmark's clock of what got where (the per-account counters), and emptying its queue."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import redis

from shared import jobs, keys


@dataclass(frozen=True, slots=True)
class Counts:
    accepted: int
    done: int  # persisted + duplicate: through the sink

    @property
    def backlog(self) -> int:
        return self.accepted - self.done


def counts(client: redis.Redis, account: str) -> Counts:
    raw = client.hmget(keys.counters(account), ["accepted", "persisted", "duplicate"])
    accepted, persisted, duplicate = (int(v or 0) for v in raw)
    return Counts(accepted, persisted + duplicate)


def wait_done(client: redis.Redis, account: str, events: int, timeout_s: float) -> float | None:
    """perf_counter time when `events` of the account were through the sink; None on timeout."""
    deadline = time.perf_counter() + timeout_s
    while (now := time.perf_counter()) < deadline:
        if counts(client, account).done >= events:
            return now
        time.sleep(0.002)
    return None


def wait_drained(client: redis.Redis, account: str, timeout_s: float) -> bool:
    """Whether everything the account had accepted got through the sink in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if counts(client, account).backlog <= 0:
            return True
        time.sleep(0.02)
    return False


def discard_queue(client: redis.Redis, queue: str) -> None:
    """Drop what waits in the queue, and its job hashes (only ours: renamed away first)."""
    parked = f"eg:bench:discard:{secrets.token_hex(4)}"
    try:
        client.rename(jobs.queue_key(queue), parked)
    except redis.ResponseError:  # no such key: nothing waits
        return
    ids = [i.decode() if isinstance(i, bytes) else i for i in client.lrange(parked, 0, -1)]
    for start in range(0, len(ids), 1000):
        client.unlink(*(jobs.job_key(i) for i in ids[start : start + 1000]))
    client.unlink(parked)
