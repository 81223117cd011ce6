"""`GET /metrics` (Prometheus text) and `GET /v1/stats` (JSON): the figures kept in Redis by
every process, with this front door's own metrics.

/metrics is unauthenticated, as exporters are (keep it off the public internet); /v1/stats
takes a private key: an account's key sees its own account's figures and nothing else, an
operator key (`eventgate keys create ACCOUNT --operator`) sees every account and the gateway.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec
import redis.exceptions
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ingest.context import GATEWAY, begin_request
from ingest.dialects.native import bearer
from ingest.metrics import METRICS
from ingest.problems import ServiceUnavailableError
from shared.stats import (
    IDENTITY,
    AccountFigures,
    GatewayFigures,
    Latency,
    QueueFigures,
    read_accounts,
    read_all,
    total,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from shared.accounts import KeyKind

log = structlog.get_logger("ingest.stats")

ALLOWED_KEYS: frozenset[KeyKind] = frozenset({"private"})

Figures = tuple[list[AccountFigures], GatewayFigures]


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    """/v1/stats. The gateway's figures are null for an account's key."""

    scope: str  # "operator" or "account"
    account: str  # the key's
    taken_at: datetime
    identity: str  # the accounting identity every account row satisfies
    totals: AccountFigures  # over `accounts`
    accounts: list[AccountFigures]
    queues: list[QueueFigures] | None
    workers_alive: int | None
    sink_write: Latency | None
    requests: dict[str, dict[str, int]] | None  # every front door's, by dialect and status
    rejected: dict[str, int] | None  # invalid events refused, by dialect


_ENCODER = msgspec.json.Encoder()
_UNAVAILABLE = {"Retry-After": "1"}


async def get_stats(request: web.Request) -> web.Response:
    """The figures the key may see.

    Raises:
        UnauthorizedError, ForbiddenError: no private key.
        ServiceUnavailableError: Redis unreachable.
    """
    gateway, _, _ = begin_request(request)
    key = await gateway.keys.authenticate(bearer(request), allow=ALLOWED_KEYS)
    structlog.contextvars.bind_contextvars(account=key.account)
    try:
        if key.operator:
            accounts, figures = await read_all(gateway.redis, gateway.settings.queue)
        else:
            accounts, figures = await read_accounts(gateway.redis, [key.account]), None
    except (redis.exceptions.RedisError, OSError):
        raise ServiceUnavailableError(
            "the figures are unavailable: Redis is unreachable", headers=_UNAVAILABLE
        ) from None
    stats = Stats(
        scope="operator" if key.operator else "account",
        account=key.account,
        taken_at=datetime.now(UTC),
        identity=IDENTITY,
        totals=total(accounts),
        accounts=accounts,
        queues=figures.queues if figures else None,
        workers_alive=figures.workers_alive if figures else None,
        sink_write=figures.sink_write if figures else None,
        requests=figures.requests if figures else None,
        rejected=figures.rejected if figures else None,
    )
    return web.Response(
        body=_ENCODER.encode(stats),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


class RedisFigures:
    """A prometheus-client collector of the figures kept in Redis, as last read."""

    def __init__(self) -> None:
        self.figures: Figures | None = None

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "eventgate_redis_up",
            "Whether this scrape could read the figures kept in Redis (1) or not (0).",
            value=0 if self.figures is None else 1,
        )
        if self.figures is None:
            return
        accounts, gateway = self.figures
        yield from _account_families(accounts)
        yield from _queue_families(gateway.queues)
        yield GaugeMetricFamily(
            "eventgate_workers_alive",
            "rq workers whose heartbeat is current (rq's worker registry).",
            value=gateway.workers_alive,
        )
        yield _histogram(
            "eventgate_sink_write_seconds",
            "Duration of one sink write (one account's events of a batch), every worker's.",
            gateway.sink_write,
        )


# (name, help, type, field of AccountFigures); counters get `_total` from the family.
_ACCOUNT_METRICS = (
    (
        "eventgate_events_persisted",
        "Events written to the sink (new rows).",
        "counter",
        "persisted",
    ),
    ("eventgate_events_duplicate", "Events the sink already had.", "counter", "duplicate"),
    (
        "eventgate_requests_rate_limited",
        "Requests refused by the rate limit (429), where the limiter counts them.",
        "counter",
        "rate_limited",
    ),
    (
        "eventgate_events_deferred_pending",
        "Events deferred by the processing rate limit, waiting to run again.",
        "gauge",
        "deferred",
    ),
    (
        "eventgate_events_dead_lettered",
        "Events in the dead-letter registry.",
        "gauge",
        "dead_lettered",
    ),
    (
        "eventgate_events_in_queue",
        "Events in the queue: accepted - persisted - duplicate - deferred - dead_lettered.",
        "gauge",
        "in_queue",
    ),
)


def _account_families(accounts: list[AccountFigures]) -> Iterator[Metric]:
    for name, text, kind, field in _ACCOUNT_METRICS:
        family: Metric
        if kind == "counter":
            family = CounterMetricFamily(
                name, f"{text} Every process's, by account.", labels=["account"]
            )
        else:
            family = GaugeMetricFamily(name, f"{text} By account.", labels=["account"])
        for account in accounts:
            family.add_metric([account.account], getattr(account, field))
        yield family


def _queue_families(queues: list[QueueFigures]) -> Iterator[Metric]:
    backlog = GaugeMetricFamily(
        "eventgate_queue_backlog_jobs", "Jobs waiting in the queue.", labels=["queue"]
    )
    age = GaugeMetricFamily(
        "eventgate_queue_oldest_job_age_seconds",
        "Age of the job at the head of the queue (0 if empty): how far workers lag.",
        labels=["queue"],
    )
    jobs = GaugeMetricFamily(
        "eventgate_queue_jobs",
        "Jobs in rq's registries of the queue: started, scheduled (retry backoff), failed.",
        labels=["queue", "state"],
    )
    for queue in queues:
        backlog.add_metric([queue.queue], queue.backlog_jobs)
        age.add_metric([queue.queue], queue.oldest_job_age_s)
        jobs.add_metric([queue.queue, "started"], queue.started_jobs)
        jobs.add_metric([queue.queue, "scheduled"], queue.scheduled_jobs)
        jobs.add_metric([queue.queue, "failed"], queue.failed_jobs)
    yield from (backlog, age, jobs)


def _histogram(name: str, text: str, latency: Latency) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name,
        text,
        buckets=[(bucket.le, bucket.count) for bucket in latency.buckets],
        sum_value=latency.sum_s,
    )


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus text: this process's metrics and the figures kept in Redis."""
    gateway = request.app[GATEWAY]
    collector = request.app[REDIS_FIGURES]
    try:
        collector.figures = await read_all(gateway.redis, gateway.settings.queue)
    except (redis.exceptions.RedisError, OSError) as exc:
        log.warning("metrics.redis_unavailable", error=str(exc))
        collector.figures = None
    # Synchronous from here: a concurrent scrape cannot swap the figures mid-way.
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


REDIS_FIGURES = web.AppKey("redis_figures", RedisFigures)


def add_routes(app: web.Application) -> None:
    collector = RedisFigures()
    app[METRICS].registry.register(collector)
    app[REDIS_FIGURES] = collector
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/v1/stats", get_stats)
