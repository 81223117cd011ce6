"""Helpers tests share: reading back what the front door queued."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared import jobs
from shared.envelope import Batch, decode_batch

if TYPE_CHECKING:
    import fakeredis


async def queued_batches(client: fakeredis.FakeAsyncRedis, queue: str = "unit") -> list[Batch]:
    """Every batch envelope waiting in the rq queue, in order."""
    job_ids = await client.lrange(jobs.queue_key(queue), 0, -1)
    batches = []
    for job_id in job_ids:
        data = await client.hget(jobs.job_key(job_id.decode()), "data")
        batches.append(decode_batch(data))
    return batches
