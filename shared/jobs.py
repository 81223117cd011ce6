"""rq job records, written by the front door without rq's blocking client.

rq's `enqueue` is synchronous; the front door's event loop must never wait on it, so the
flusher writes the same hash and list entries in one async pipeline. The template comes
from rq's own `Job.to_dict()`, so the fields follow the pinned rq version; a test runs
the jobs written this way through a real rq worker.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import redis
from rq.job import Job, JobStatus, Retry

from shared.envelope import JOB_FUNC, Batch, EnvelopeSerializer, encode_batch
from shared.event import new_event_id

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from shared.settings import Settings

JobFields = Mapping[str, str | bytes | int]


def queue_key(queue: str) -> str:
    return f"rq:queue:{queue}"


QUEUES_KEY = "rq:queues"  # rq's set of known queues; `rq info` lists from it


def job_key(job_id: str) -> str:
    return f"rq:job:{job_id}"


def shard_queue(queue: str, shard: int) -> str:
    """Shard 0 keeps the plain name: with one shard, the queue is the one rq users expect."""
    return queue if shard == 0 else f"{queue}.{shard}"


def shard_queues(settings: Settings) -> list[str]:
    return [shard_queue(settings.queue, shard) for shard in range(settings.shards)]


def shard_of(account: str, shards: int, override: int | None = None) -> int:
    """The shard an account's events go to: its own setting, else a stable hash."""
    if override is not None:
        return override % shards
    return zlib.crc32(account.encode()) % shards


def doorbell_key(queue: str) -> str:
    """A list the front door rings once per job it queues: idle workers on several shard
    queues block on it (a worker can block on one list only, and BLMOVE is one list)."""
    return f"eg:doorbell:{queue}"


# Tokens kept on the doorbell: enough to wake every idle worker, never a growing list.
DOORBELL_DEPTH = 64


def retry_intervals(retries: int) -> list[int]:
    """Exponential backoff between attempts, capped at a minute: 1, 2, 4 ... 60 s."""
    return [min(2**i, 60) for i in range(retries)]


def job_template(settings: Settings, queue: str | None = None) -> dict[str, str | bytes | int]:
    """The fields rq 3 writes for a queued eventgate job, minus the per-job ones.

    No `ttl`: an expiring job hash would make rq skip the job silently. `result_ttl=0`
    deletes the hash only once the batch succeeded.
    """
    # An unconnected client: Job.create wants one but nothing is sent.
    unconnected = redis.Redis()
    job = Job.create(
        JOB_FUNC,
        args=(b"",),
        connection=unconnected,
        serializer=EnvelopeSerializer,
        timeout=settings.job_timeout_s,
        result_ttl=0,
        retry=Retry(max=settings.job_retries, interval=retry_intervals(settings.job_retries)),
        origin=queue or settings.queue,  # where rq puts the job back on a retry
    )
    # Queued on a pipeline that is never executed: only the status field is wanted.
    job.set_status(JobStatus.QUEUED, pipeline=unconnected.pipeline())
    fields = job.to_dict()
    for per_job in ("created_at", "data", "description"):
        fields.pop(per_job, None)
    return fields


def job_fields(
    template: Mapping[str, str | bytes | int], data: bytes, events: int, now: datetime | None = None
) -> dict[str, str | bytes | int]:
    """A complete rq job hash for one envelope. `data` is stored uncompressed: rq falls back
    to raw bytes when zlib finds none, and compression cost ~130 us a job (measured)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        **template,
        "created_at": stamp,
        "enqueued_at": stamp,
        "data": data,
        "description": f"batch of {events} events",
    }


def queue_batches(
    pipe: aioredis.client.Pipeline | redis.client.Pipeline,
    queue: str,
    template: Mapping[str, str | bytes | int],
    batches: list[Batch],
    doorbell: str = "",
) -> list[str]:
    """Add to `pipe` (a MULTI, so the jobs appear at once or not at all) the commands that
    queue one rq job per batch on `queue`; returns the job ids."""
    job_ids = []
    # Pipeline methods only queue commands (redis-py types them as awaitables).
    _ = pipe.sadd(QUEUES_KEY, queue_key(queue))
    for batch in batches:
        job_id = new_event_id()
        events = sum(part.count for part in batch.parts)
        fields = job_fields(template, encode_batch(batch), events)
        _ = pipe.hset(job_key(job_id), mapping=fields)  # type: ignore[arg-type]
        job_ids.append(job_id)
    _ = pipe.rpush(queue_key(queue), *job_ids)
    if doorbell:
        _ = pipe.rpush(doorbell, *(["1"] * len(job_ids)))
        _ = pipe.ltrim(doorbell, -DOORBELL_DEPTH, -1)
    return job_ids


class ShardQueues:
    """The shard queues of a deployment: which one an account's jobs go to, each with its
    rq job template (a job's `origin` is where rq puts it back on a retry)."""

    def __init__(self, settings: Settings) -> None:
        self.names = shard_queues(settings)
        self.templates = {name: job_template(settings, name) for name in self.names}
        self.doorbell = doorbell_key(settings.queue)

    def queue_for(self, account: str, override: int | None = None) -> str:
        return self.names[shard_of(account, len(self.names), override)]

    def add_jobs(
        self,
        pipe: aioredis.client.Pipeline | redis.client.Pipeline,
        queue: str,
        batches: list[Batch],
    ) -> list[str]:
        """Queue one rq job per batch on `queue` (a shard of this deployment), in `pipe`."""
        return queue_batches(pipe, queue, self.templates[queue], batches, self.doorbell)
