"""Figures kept in Redis for dashboards: per-account counters, queues, workers, sink latency.

Written where they happen (accepted in the front door's enqueue MULTI, persisted and duplicate
and the sink latency in the worker's per-batch pipeline), so every process on every host adds
to the same numbers and no restart resets them; read here by /metrics, /v1/stats and the CLI.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from shared import jobs, keys

if TYPE_CHECKING:
    import redis
    import redis.asyncio as aioredis

# The accounting identity, per account: every accepted event is in exactly one of these.
IDENTITY = "accepted = persisted + duplicate + deferred + dead_lettered + in_queue"
# Fields of keys.counters(account); a field nobody writes yet reads as 0.
COUNTER_FIELDS = ("accepted", "persisted", "duplicate", "deferred", "dead_lettered", "rate_limited")

# rq's own keys (rq is pinned to 3.0): its worker registry, and each queue's job registries.
RQ_WORKERS = "rq:workers"
RQ_REGISTRIES = {"started": "rq:wip:{}", "scheduled": "rq:scheduled:{}", "failed": "rq:failed:{}"}
_RQ_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # rq's `enqueued_at`, as shared.jobs writes it too

# Upper bounds (seconds) of the sink write latency buckets; +Inf follows the last.
SINK_WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BUCKET_FIELDS = [(float(b), f"le:{b:g}") for b in SINK_WRITE_BUCKETS] + [(math.inf, "le:+Inf")]


class AccountFigures(msgspec.Struct, frozen=True, kw_only=True):
    """One account's counters; `in_queue` is what the others leave of `accepted`."""

    account: str
    accepted: int = 0
    persisted: int = 0
    duplicate: int = 0
    deferred: int = 0
    dead_lettered: int = 0
    in_queue: int = 0
    rate_limited: int = 0


class QueueFigures(msgspec.Struct, frozen=True, kw_only=True):
    queue: str
    backlog_jobs: int
    oldest_job_age_s: float  # 0 when the queue is empty
    started_jobs: int
    scheduled_jobs: int  # retries waiting for their backoff
    failed_jobs: int


class Bucket(msgspec.Struct, frozen=True):
    le: str  # "0.005", ..., "+Inf", as Prometheus writes it
    count: int  # cumulative


class Latency(msgspec.Struct, frozen=True, kw_only=True):
    count: int
    sum_s: float
    p50_s: float | None  # estimated from the buckets, as Prometheus's histogram_quantile
    p99_s: float | None
    buckets: list[Bucket]


class GatewayFigures(msgspec.Struct, frozen=True, kw_only=True):
    """What belongs to no account: queues, workers, sinks, requests of every front door."""

    queues: list[QueueFigures]
    workers_alive: int
    sink_write: Latency
    requests: dict[str, dict[str, int]]  # dialect -> HTTP status -> requests
    rejected: dict[str, int]  # dialect -> events refused as invalid


def record_sink_write(pipe: redis.client.Pipeline, seconds: float) -> None:
    """Add one sink write's duration to the histogram in Redis: three commands queued on the
    pipeline the worker executes for its batch anyway."""
    field = next(name for bound, name in _BUCKET_FIELDS if seconds <= bound)
    pipe.hincrby(keys.SINK_WRITE, "count", 1)
    pipe.hincrbyfloat(keys.SINK_WRITE, "sum", seconds)
    pipe.hincrby(keys.SINK_WRITE, field, 1)


def account_figures(account: str, raw: list[Any]) -> AccountFigures:
    """Figures from the COUNTER_FIELDS values of an account's counters hash (None: 0)."""
    values = dict(zip(COUNTER_FIELDS, (int(v or 0) for v in raw), strict=True))
    in_queue = values["accepted"] - sum(
        values[f] for f in ("persisted", "duplicate", "deferred", "dead_lettered")
    )
    return AccountFigures(account=account, in_queue=in_queue, **values)


def total(figures: list[AccountFigures], name: str = "*") -> AccountFigures:
    """The sum of every figure over `figures`."""
    fields = (*COUNTER_FIELDS, "in_queue")
    sums = {f: sum(getattr(a, f) for a in figures) for f in fields}
    return AccountFigures(account=name, **sums)


async def read_accounts(
    client: aioredis.Redis, names: list[str] | None = None
) -> list[AccountFigures]:
    """The counters of `names`, or of every account, in name order; one or two round trips."""
    if names is None:
        names = sorted(_text(n) for n in await client.hkeys(keys.ACCOUNTS))
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            _ = pipe.hmget(keys.counters(name), list(COUNTER_FIELDS))
        replies = await pipe.execute()
    return [account_figures(name, raw) for name, raw in zip(names, replies, strict=True)]


async def read_gateway(client: aioredis.Redis, queue: str) -> GatewayFigures:
    """The queue `queue` and its shards (`queue.N`), as rq's `rq:queues` lists them; the rq
    workers alive; the sink latency and the request counts. Three round trips.
    """
    async with client.pipeline(transaction=False) as pipe:
        _ = pipe.smembers(jobs.QUEUES_KEY)
        _ = pipe.smembers(RQ_WORKERS)
        _ = pipe.hgetall(keys.SINK_WRITE)
        _ = pipe.hgetall(keys.FRONT_DOOR_COUNTS)
        queue_keys, worker_keys, sink_write, counts = await pipe.execute()
    names = (_text(k).removeprefix(jobs.queue_key("")) for k in queue_keys)
    queues = sorted(n for n in names if n == queue or n.startswith(f"{queue}."))
    workers = list(worker_keys)
    async with client.pipeline(transaction=False) as pipe:
        for name in queues:
            _ = pipe.llen(jobs.queue_key(name))
            _ = pipe.lindex(jobs.queue_key(name), 0)
            for template in RQ_REGISTRIES.values():
                _ = pipe.zcard(template.format(name))
        for worker in workers:
            _ = pipe.exists(worker)  # rq's worker hash expires when its heartbeats stop
        replies = await pipe.execute()
    per_queue = 2 + len(RQ_REGISTRIES)
    rows = [replies[i * per_queue : (i + 1) * per_queue] for i in range(len(queues))]
    alive = sum(replies[len(queues) * per_queue :])
    ages = await _head_ages(client, [row[1] for row in rows])
    return GatewayFigures(
        queues=[
            QueueFigures(
                queue=name,
                backlog_jobs=row[0],
                oldest_job_age_s=age,
                started_jobs=row[2],
                scheduled_jobs=row[3],
                failed_jobs=row[4],
            )
            for name, row, age in zip(queues, rows, ages, strict=True)
        ],
        workers_alive=alive,
        sink_write=latency(sink_write),
        **_front_door_counts(counts),
    )


async def read_all(
    client: aioredis.Redis, queue: str
) -> tuple[list[AccountFigures], GatewayFigures]:
    """Every account's figures and the gateway's (`queue` and its shards), concurrently."""
    return await asyncio.gather(read_accounts(client), read_gateway(client, queue))


async def _head_ages(client: aioredis.Redis, heads: list[bytes | None]) -> list[float]:
    """Seconds since each head job was enqueued (0 for an empty queue or a vanished job)."""
    ages = [0.0] * len(heads)
    waiting = [(i, head.decode()) for i, head in enumerate(heads) if head is not None]
    if not waiting:
        return ages
    async with client.pipeline(transaction=False) as pipe:
        for _, job_id in waiting:
            _ = pipe.hget(jobs.job_key(job_id), "enqueued_at")
        stamps = await pipe.execute()
    now = datetime.now(UTC)
    for (i, _), stamp in zip(waiting, stamps, strict=True):
        try:
            enqueued = datetime.strptime(stamp.decode(), _RQ_TIME).replace(tzinfo=UTC)
        except (AttributeError, ValueError):  # gone (None), or not rq's format
            continue
        ages[i] = max(0.0, (now - enqueued).total_seconds())
    return ages


def latency(raw: dict[bytes, bytes]) -> Latency:
    """The histogram kept by record_sink_write, with cumulative buckets."""
    cumulative, buckets = 0, []
    for bound, field in _BUCKET_FIELDS:
        cumulative += int(raw.get(field.encode(), 0))
        buckets.append((bound, cumulative))
    return Latency(
        count=int(raw.get(b"count", 0)),
        sum_s=float(raw.get(b"sum", 0.0)),
        p50_s=quantile(0.5, buckets),
        p99_s=quantile(0.99, buckets),
        buckets=[
            Bucket(name.removeprefix("le:"), n)
            for (_, name), (_, n) in zip(_BUCKET_FIELDS, buckets, strict=True)
        ],
    )


def quantile(q: float, buckets: list[tuple[float, int]]) -> float | None:
    """The q-quantile of cumulative (upper bound, count) buckets, interpolated linearly
    within its bucket as Prometheus's histogram_quantile does; None without observations."""
    count = buckets[-1][1] if buckets else 0
    if count == 0:
        return None
    rank = q * count
    lower, below = 0.0, 0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bound: that bound is all we know
            if cumulative == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (cumulative - below)
        lower, below = bound, cumulative
    return lower


def _front_door_counts(raw: dict[bytes, bytes]) -> dict[str, Any]:
    requests: dict[str, dict[str, int]] = {}
    rejected: dict[str, int] = {}
    for field, value in raw.items():
        kind, _, rest = field.decode().partition(":")
        if kind == "requests":
            dialect, _, status = rest.rpartition(":")
            requests.setdefault(dialect, {})[status] = int(value)
        elif kind == "rejected":
            rejected[rest] = int(value)
    return {"requests": requests, "rejected": rejected}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
