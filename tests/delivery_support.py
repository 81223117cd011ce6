"""Driving real rq workers over fakeredis through sinks that fail on cue: queueing jobs as the
front door does, running burst workers, and fast-forwarding retries' backoff."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec
from rq import Queue

from shared import jobs, keys
from shared.envelope import Batch, EnvelopeSerializer, Part, encode_batch
from workers import jobs as worker_jobs
from workers.worker import GatewayWorker

if TYPE_CHECKING:
    import fakeredis

    from shared.settings import Settings
    from workers.processor import BatchProcessor


def queue_job(
    client: fakeredis.FakeRedis,
    settings: Settings,
    job_id: str,
    events: list[dict[str, Any]],
    account: str = "acme",
) -> None:
    """One job of native events on the queue, as the front door writes it."""
    part = Part(
        account=account,
        dialect="native",
        request_id=job_id,
        received_ns=time.time_ns(),
        count=len(events),
        body=msgspec.json.encode(events),
    )
    fields = jobs.job_fields(
        jobs.job_template(settings), encode_batch(Batch(parts=[part])), len(events)
    )
    client.hset(jobs.job_key(job_id), mapping=fields)
    client.rpush(jobs.queue_key(settings.queue), job_id)
    client.hincrby(keys.counters(account), "accepted", len(events))


def native(ids: list[str], **fields: Any) -> list[dict[str, Any]]:
    return [{"name": "sale", "id": i, **fields} for i in ids]


def quick(processor: BatchProcessor) -> BatchProcessor:
    """Backoffs of milliseconds, so tests do not wait out real ones."""
    for breaker in processor.delivery.breakers.values():
        breaker.base_s, breaker.cap_s = 0.01, 0.02
    processor.delivery._pause_cap_s = 0.05
    return processor


def run_burst(
    client: fakeredis.FakeRedis, settings: Settings, processor: BatchProcessor, max_riders: int = 9
) -> None:
    """Every job waiting now, once, through eventgate's rq worker."""
    worker_jobs.install(processor)
    try:
        queue = Queue(settings.queue, connection=client, serializer=EnvelopeSerializer)
        worker = GatewayWorker([queue], connection=client, heartbeat_s=2, max_riders=max_riders)
        worker.work(burst=True, logging_level="WARNING")
    finally:
        worker_jobs.install(None)


def scheduled(client: fakeredis.FakeRedis, settings: Settings) -> list[str]:
    return [j.decode() for j in client.zrange(f"rq:scheduled:{settings.queue}", 0, -1)]


def release_scheduled(client: fakeredis.FakeRedis, settings: Settings) -> int:
    """Retries waiting out their backoff go back to the queue now (time fast-forwarded)."""
    waiting = scheduled(client, settings)
    for job_id in waiting:
        client.zrem(f"rq:scheduled:{settings.queue}", job_id)
        client.hset(jobs.job_key(job_id), "status", "queued")
        client.rpush(jobs.queue_key(settings.queue), job_id)
    return len(waiting)


def drain(
    client: fakeredis.FakeRedis,
    settings: Settings,
    processor: BatchProcessor,
    *,
    rounds: int = 30,
    between: Any = None,
) -> int:
    """Run bursts, releasing retries between them, until no job is left; the rounds taken.
    `between(round)` runs before each round (to heal a sink on cue)."""
    for n in range(rounds):
        if between is not None:
            between(n)
        run_burst(client, settings, processor)
        if not release_scheduled(client, settings) and not client.llen(
            jobs.queue_key(settings.queue)
        ):
            return n + 1
    raise AssertionError(f"jobs still retried after {rounds} rounds")


def counters(client: fakeredis.FakeRedis, account: str = "acme") -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(keys.counters(account)).items()}
