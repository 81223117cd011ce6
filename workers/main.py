"""Running a worker process: sink, Redis checks, and rq's loop restarted after outages."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING

import redis
import structlog
from rq import Queue
from rq.worker import DequeueStrategy

from shared.envelope import EnvelopeSerializer
from shared.errors import ConfigError
from shared.jobs import shard_queues
from workers import jobs
from workers.limits import ProcessLimits
from workers.processor import BatchProcessor
from workers.sinks import open_sinks_when_up
from workers.worker import GatewayWorker

if TYPE_CHECKING:
    from shared.settings import Settings

log = structlog.get_logger("workers.main")

_MAX_BACKOFF_S = 30.0


def check_eviction_policy(client: redis.Redis) -> None:
    """Refuse a Redis that may evict keys: an evicted job hash is skipped by rq silently.

    Raises:
        ConfigError: maxmemory-policy is not noeviction.
    """
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.exceptions.ResponseError:
        # Managed Redis may forbid CONFIG; the operator's documentation is then the guard.
        log.warning("redis.policy_unknown", hint="make sure maxmemory-policy is noeviction")
        return
    if policy not in (None, "noeviction", b"noeviction"):
        raise ConfigError(
            f"Redis maxmemory-policy is {policy!r}: it may evict queued events. "
            "Set `maxmemory-policy noeviction` in its configuration."
        )


def run_worker(settings: Settings, redis_url: str, *, burst: bool = False) -> None:
    """Work the queue until SIGTERM/SIGINT (finishing the job in hand), or until it is
    empty with `burst`. Redis outages restart rq's loop with backoff instead of exiting."""
    client = redis.Redis.from_url(redis_url, health_check_interval=10)
    check_eviction_policy(client)
    # Set by SIGTERM/SIGINT whenever it comes: during a job, between rq loops or in a backoff.
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    sinks = open_sinks_when_up(settings.sink_url, stopping)  # a sink down at start: wait
    if sinks is None:
        return
    processor = BatchProcessor(
        sinks,
        client,
        ProcessLimits(client, settings),
        retry_window_s=settings.sink_retry_for_s,
        marker_ttl_s=settings.sink_marker_ttl_s,
        backoff_max_s=settings.sink_backoff_max_s,
        stopping=stopping,
    )
    jobs.install(processor)
    queues = [
        Queue(name, connection=client, serializer=EnvelopeSerializer)
        for name in shard_queues(settings)
    ]
    level = "DEBUG" if settings.log_level == "debug" else "WARNING"
    backoff = 1.0
    try:
        while not stopping.is_set():
            worked = False
            try:
                # rq's Worker talks to Redis as soon as it is made: inside the try.
                worker = GatewayWorker(
                    queues,
                    connection=client,
                    heartbeat_s=settings.job_heartbeat_s,
                    max_riders=settings.worker_max_riders,
                    stopping=stopping,
                    linger_s=max(getattr(s, "linger_s", 0.0) for s in sinks),
                )
                log.info("worker.started", name=worker.name, queues=len(queues))
                worked = worker.work(
                    burst=burst, logging_level=level, dequeue_strategy=DequeueStrategy.ROUND_ROBIN
                )
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                log.warning("worker.redis_lost", error=str(exc))
            if burst:
                break
            # rq leaves its loop on errors it does not handle (Redis gone mid-job).
            backoff = 1.0 if worked else min(backoff * 2, _MAX_BACKOFF_S)
            if not stopping.is_set():
                log.warning("worker.restarting", after_s=backoff)
                stopping.wait(backoff)
    finally:
        jobs.install(None)
        for sink in sinks:
            sink.close()
        log.info("worker.stopped")
