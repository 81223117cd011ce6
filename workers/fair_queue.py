"""Taking turns over the shard queues without giving up rq's atomic pop.

rq pops several queues with BLPOP: a worker killed right after the pop loses the job
(measured). Only its single-queue path moves the job atomically to an intermediate list
(BLMOVE). This queue class moves from each shard in turn with LMOVE, the same atomic move,
and when every shard is empty blocks on the doorbell list the front door rings once per job
it queues (a lost token only costs one wait). The worker rotates the shards after every
job (rq's round-robin strategy), so a backlog in one shard delays another shard's jobs by
at most one job per shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.utils import as_text

from shared.jobs import doorbell_key

if TYPE_CHECKING:
    from collections.abc import Iterable

    import redis
    from rq.job import Job
    from rq.serializers import Serializer
    from rq.timeouts import BaseDeathPenalty


class FairQueue(Queue):
    @classmethod
    def dequeue_any(  # noqa: PLR0913, PLR0917 - rq's signature
        cls,
        queues: Iterable[Queue],
        timeout: int | None,
        connection: redis.Redis,
        job_class: type[Job] | None = None,
        serializer: Serializer | str | None = None,
        death_penalty_class: type[BaseDeathPenalty] | None = None,
    ) -> tuple[Job, Queue] | None:
        ordered = list(queues)
        if len(ordered) == 1:  # rq's own BLMOVE path is the same atomic move
            return super().dequeue_any(
                ordered, timeout, connection, job_class, serializer, death_penalty_class
            )
        # Shard 0 carries the plain queue name, the prefix of all the others.
        doorbell = doorbell_key(min(queue.name for queue in ordered))
        while True:
            for queue in ordered:
                popped = connection.lmove(queue.key, queue.intermediate_queue_key)
                if popped is None:
                    continue
                job_id = as_text(popped)
                found = cls._fetch_dequeued_job(
                    connection,
                    queue.key,
                    job_id,
                    job_class=job_class,
                    serializer=serializer,
                    death_penalty_class=death_penalty_class,
                )
                if found is not None:
                    return found
                # The hash is gone (rq skips such ids): don't leave it for maintenance.
                connection.lrem(queue.intermediate_queue_key, 1, job_id)
                break
            else:
                if timeout is None:
                    return None
                if connection.blpop([doorbell], timeout) is None:
                    raise DequeueTimeout(timeout, doorbell)
