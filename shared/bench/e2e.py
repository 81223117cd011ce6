"""Sections 3 and 4: sustained events/s end to end with the queue flat, accept->persisted
latency at half that rate, and how it grows with workers."""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from shared import accounts
from shared.bench.counters import Counts, counts, discard_queue, wait_drained
from shared.load.runner import LoadConfig, generate

if TYPE_CHECKING:
    from collections.abc import Callable

    import redis

    from shared.bench.sinks import BenchSink
    from shared.bench.stack import Service, Stack

BATCH = 100  # events per request, as producers batch
# The queue counts as flat if it grew by at most this many events, or this share of the
# events accepted while measuring: group commit and jobs make it move in steps.
FLAT_EVENTS = 1000
FLAT_SHARE = 0.05
DRAIN_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class Paced:
    """One paced run: what was offered, accepted and stored per second while measuring."""

    offered: float
    accepted: float
    stored: float
    growth: int  # queue backlog growth, events
    flat: bool


class EndToEnd:
    """A front door and its workers, fed at a set rate by the load generator in this
    process; throughput and backlog read from the per-account counters."""

    def __init__(  # noqa: PLR0913 - the stack's parts
        self,
        stack: Stack,
        client: redis.Redis,
        sink: BenchSink,
        front_door: Service,
        *,
        duration_s: float,
        concurrency: int,
    ) -> None:
        self._stack = stack
        self._client = client
        self._sink = sink
        self._front_door = front_door
        self._duration_s = duration_s
        self._concurrency = concurrency
        self.trace: list[Paced] = []  # every paced run, for the report

    def run(self, rate: float) -> Paced:
        """Offer `rate` events/s for the run's duration (less if the queue clearly grows)."""
        account, key = self._new_key()
        paced = asyncio.run(self._paced(account, key, rate))
        self.trace.append(paced)
        if not paced.flat or not wait_drained(self._client, account, DRAIN_TIMEOUT_S):
            # Behind: drop what is left rather than wait for it (a fresh account per run),
            # and give the worker time to finish the job in hand.
            discard_queue(self._client, self._stack.queue)
            time.sleep(0.3)
        return paced

    def sustained(self, guess: float, rounds: int, tick: Callable[[], None] | None = None) -> float:
        """The highest offered rate found (events/s) at which the queue stays flat.

        Starts at `guess`; a run whose queue grew moves to just under the rate the workers
        did store in it, a flat one upwards, then it bisects.
        """
        flat_at, grew_at = 0.0, math.inf
        rate, stored = guess, 0.0
        for _ in range(rounds):
            paced = self.run(rate)
            if tick is not None:
                tick()
            stored = paced.stored
            if paced.flat:
                flat_at = max(flat_at, rate)
                rate = rate * 1.3 if math.isinf(grew_at) else (flat_at + grew_at) / 2
            else:
                grew_at = min(grew_at, rate)
                under = 0.95 * min(paced.stored, paced.accepted)
                rate = under if under > flat_at else (flat_at + grew_at) / 2
        # Never 0: a machine too loaded to store anything in the search still gets its
        # latency measured, at one request a second.
        return max(flat_at or 0.9 * stored, float(BATCH))

    def latency_ms(self, rate: float) -> tuple[float, float, bool]:
        """(p50, p99) of stored_at - received_at over a run at `rate` events/s, and whether
        every event was stored within the drain timeout (if not, the figures cover those
        that were, and understate the latency).

        Raises:
            RuntimeError: the run stored no rows at all.
        """
        account, key = self._new_key()
        asyncio.run(self._paced(account, key, rate, abort=False))
        drained = wait_drained(self._client, account, DRAIN_TIMEOUT_S * 2)
        latencies = sorted(self._sink.latencies_ms(account))
        if not drained:
            discard_queue(self._client, self._stack.queue)
        if len(latencies) < 2:  # noqa: PLR2004 - quantiles need two
            raise RuntimeError("the latency run stored no rows")
        quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
        return quantiles[49], quantiles[98], drained

    def _new_key(self) -> tuple[str, str]:
        account = f"e2e-{secrets.token_hex(4)}"

        async def make() -> str:
            client = aioredis.Redis.from_url(self._stack.redis_url)
            try:
                await accounts.create_account(client, account)
                return await accounts.create_key(client, account, "private")
            finally:
                await client.aclose()

        return account, asyncio.run(make())

    async def _paced(self, account: str, key: str, rate: float, *, abort: bool = True) -> Paced:
        config = LoadConfig(
            url=self._front_door.url,
            keys=(key,),
            batch=BATCH,
            rate=rate / BATCH,
            concurrency=self._concurrency,
            duration_s=self._duration_s,
            prefix=f"e2e-{account}",
        )
        sending = asyncio.create_task(generate(config))
        warm_up = min(1.0, self._duration_s / 4)
        await asyncio.sleep(warm_up)
        first, began = counts(self._client, account), time.perf_counter()
        last = first
        while not sending.done():
            await asyncio.sleep(0.1)
            last = counts(self._client, account)
            if abort and _growth(first, last) > 3 * _tolerance(first, last, rate):
                sending.cancel()  # clearly not flat: no need to wait for the end
                break
        elapsed = time.perf_counter() - began
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        growth = _growth(first, last)
        accepted = (last.accepted - first.accepted) / elapsed
        stored = (last.done - first.done) / elapsed
        flat = growth <= _tolerance(first, last, rate) and accepted >= 0.9 * rate
        return Paced(rate, accepted, stored, growth, flat)


def _growth(first: Counts, last: Counts) -> int:
    return last.backlog - first.backlog


def _tolerance(first: Counts, last: Counts, rate: float) -> float:
    accepted = last.accepted - first.accepted
    return max(FLAT_EVENTS, FLAT_SHARE * accepted, 0.1 * rate)
