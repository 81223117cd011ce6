"""The front door's own metrics: counts of this process, exposed through prometheus-client,
and the request counts it adds to Redis about once a second, so that /v1/stats shows every
front door's.

The hot path pays two or three dict increments per request (and a histogram bisect per
enqueue); nothing here talks to Redis per request.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import itertools
from typing import TYPE_CHECKING

import redis.exceptions
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from shared import keys

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Mapping

    import redis.asyncio as aioredis
    from aiohttp.typedefs import Middleware

    from ingest.problems import Handler

log = structlog.get_logger("ingest.metrics")

# How often a front door adds its request counts to Redis.
PUSH_INTERVAL_S = 1.0
ENQUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
GROUP_REQUESTS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
GROUP_EVENTS_BUCKETS = (1, 10, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000)

# Set by a dialect when it refuses events as invalid; read once the request is answered.
_REJECTED: contextvars.ContextVar[int] = contextvars.ContextVar("rejected_events", default=0)


def note_rejected(count: int) -> None:
    """Record that `count` events of the current request failed validation (each counted
    once, whether the request was refused whole or, native strict=false, in part)."""
    _REJECTED.set(count)


class _Histogram:
    """A histogram for one event loop's use: a bisect and two additions per observation
    (prometheus-client's takes a lock per bucket and per sum)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, text: str) -> HistogramMetricFamily:
        cumulative = list(itertools.accumulate(self.counts))
        les = [f"{b:g}" for b in self.bounds] + ["+Inf"]
        return HistogramMetricFamily(
            name, text, buckets=list(zip(les, cumulative, strict=True)), sum_value=self.sum
        )


class FrontDoorMetrics:
    """This process's metrics. Counted in plain dicts (one event loop: no locks) and turned
    into Prometheus families when scraped, in a registry of its own per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(self)
        self.requests: dict[tuple[str, int], int] = {}  # (dialect, status) -> answers
        self.accepted: dict[str, int] = {}  # account -> events queued
        self.rejected: dict[str, int] = {}  # dialect -> events refused as invalid
        self.enqueue = _Histogram(ENQUEUE_BUCKETS)
        self.group_requests = _Histogram(GROUP_REQUESTS_BUCKETS)
        self.group_events = _Histogram(GROUP_EVENTS_BUCKETS)
        # Counts not yet added to Redis (keys.FRONT_DOOR_COUNTS), by the same keys.
        self._unpushed_requests: dict[tuple[str, int], int] = {}
        self._unpushed_rejected: dict[str, int] = {}

    def count_request(self, dialect: str, status: int, rejected: int = 0) -> None:
        key = (dialect, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self._unpushed_requests[key] = self._unpushed_requests.get(key, 0) + 1
        if rejected:
            self.rejected[dialect] = self.rejected.get(dialect, 0) + rejected
            self._unpushed_rejected[dialect] = self._unpushed_rejected.get(dialect, 0) + rejected

    def count_flush(self, accepted: Mapping[str, int], requests: int) -> None:
        """One group commit reached Redis: `accepted` events by account, from `requests`."""
        events = 0
        for account, count in accepted.items():
            self.accepted[account] = self.accepted.get(account, 0) + count
            events += count
        self.group_requests.observe(requests)
        self.group_events.observe(events)

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's collector protocol: this process's counts as families."""
        requests = CounterMetricFamily(
            "eventgate_requests",
            "Requests answered by this front door, by dialect (the route's) and HTTP status.",
            labels=["dialect", "status"],
        )
        for (dialect, status), count in sorted(self.requests.items()):
            requests.add_metric([dialect, str(status)], count)
        accepted = CounterMetricFamily(
            "eventgate_events_accepted",
            "Events this front door queued (in Redis before its 2xx), by account.",
            labels=["account"],
        )
        for account, count in sorted(self.accepted.items()):
            accepted.add_metric([account], count)
        rejected = CounterMetricFamily(
            "eventgate_events_rejected",
            "Events this front door refused as invalid, by dialect.",
            labels=["dialect"],
        )
        for dialect, count in sorted(self.rejected.items()):
            rejected.add_metric([dialect], count)
        yield from (requests, accepted, rejected)
        yield self.enqueue.family(
            "eventgate_enqueue_seconds",
            "How long a request waited for Redis to hold its events (group commit included).",
        )
        yield self.group_requests.family(
            "eventgate_group_commit_requests",
            "Requests written together in one group commit (one Redis MULTI).",
        )
        yield self.group_events.family(
            "eventgate_group_commit_events",
            "Events written together in one group commit (one Redis MULTI).",
        )

    async def push(self, client: aioredis.Redis) -> None:
        """Add the request counts since the last push to Redis (one MULTI); on failure they
        wait for the next push."""
        if not self._unpushed_requests and not self._unpushed_rejected:
            return
        requests, self._unpushed_requests = self._unpushed_requests, {}
        rejected, self._unpushed_rejected = self._unpushed_rejected, {}
        try:
            async with client.pipeline(transaction=True) as pipe:
                for (dialect, status), count in requests.items():
                    _ = pipe.hincrby(keys.FRONT_DOOR_COUNTS, f"requests:{dialect}:{status}", count)
                for dialect, count in rejected.items():
                    _ = pipe.hincrby(keys.FRONT_DOOR_COUNTS, f"rejected:{dialect}", count)
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            for key, count in requests.items():
                self._unpushed_requests[key] = self._unpushed_requests.get(key, 0) + count
            for dialect, count in rejected.items():
                self._unpushed_rejected[dialect] = self._unpushed_rejected.get(dialect, 0) + count
            log.debug("metrics.push_failed", error=str(exc))

    def pusher(self, client: aioredis.Redis) -> Callable[[web.Application], AsyncIterator[None]]:
        """A cleanup context that pushes every PUSH_INTERVAL_S, and once more at shutdown.
        Register it before the enqueuer's, so that it ends after the last flush."""

        stopping = asyncio.Event()

        async def push_until_stopped() -> None:
            # Never cancelled mid-push: a Redis command cut off half-way is worth avoiding.
            while not stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), PUSH_INTERVAL_S)
                await self.push(client)

        async def pushing(_app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(push_until_stopped(), name="eventgate-metrics-push")
            yield
            stopping.set()
            await task  # its last push carries the counts of the last requests

        return pushing

    def middleware(self) -> Middleware:
        """Counts every answer of the event and admin APIs by dialect and status (and an
        unknown path as dialect `none`); /metrics, /v1/stats, the dashboard and the health
        probes are not counted."""
        count = self.count_request

        @web.middleware
        async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
            _REJECTED.set(0)  # a kept-alive connection's next request starts afresh
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                _count(request, exc.status, count)
                raise
            _count(request, response.status, count)
            return response

        return count_requests


def _count(request: web.Request, status: int, count: Callable[[str, int, int], None]) -> None:
    match_info = request.match_info
    name = match_info.route.name
    if name is None:
        if match_info.http_exception is None:
            return  # an operator's route (/metrics, /healthz ...)
        dialect = "none"
    else:
        dialect = name.partition(":")[0]  # "catalog:slash" is catalog
    count(dialect, status, _REJECTED.get())


METRICS = web.AppKey("metrics", FrontDoorMetrics)
