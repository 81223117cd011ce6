"""Riders: waiting jobs a worker takes along with the job rq gave it, to write them together.

rq costs ~20 Redis round trips per job (~15 ms with AOF fsync on every write), so jobs of
~100 events (one producer request each under paced traffic) capped a worker near 2k
events/s. A rider is moved atomically (LMOVE) from the queue to the queue's intermediate
list, like any popped job: if the worker dies, maintenance puts it back after a heartbeat
(`GatewayWorker._recover_stranded`), and while the worker lives its heartbeat keeps riders
from looking stranded. On success a rider's hash and list entry go in one MULTI; on failure
it goes back to the head of the queue and runs on its own, with its own retries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared import jobs
from shared.scripts import lua

if TYPE_CHECKING:
    import redis
    from rq import Queue


@dataclass(frozen=True, slots=True)
class Rider:
    job_id: str
    data: bytes


class RiderClaims:
    """Claims, finishes and releases riders on one Redis connection."""

    def __init__(self, connection: redis.Redis, max_riders: int, linger_s: float = 0.0) -> None:
        self._connection = connection
        self.max_riders = max_riders
        # A sink's linger (forward sinks' `linger_ms`): with fewer waiting jobs than
        # max_riders, wait this long once for more to arrive, so batches fill up.
        self.linger_s = linger_s
        self._requeue = connection.register_script(lua("requeue_stranded"))

    def claim(self, queue: Queue) -> list[Rider]:
        """Move up to `max_riders` waiting jobs to the intermediate list and read them."""
        if self.max_riders < 1:
            return []
        job_ids = self._move(queue, self.max_riders)
        if self.linger_s > 0 and len(job_ids) < self.max_riders:
            time.sleep(self.linger_s)
            job_ids += self._move(queue, self.max_riders - len(job_ids))
        if not job_ids:
            return []
        intermediate = queue.intermediate_queue.key
        with self._connection.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(jobs.job_key(job_id), "data")
            datas: list[bytes | None] = pipe.execute()
        riders = [Rider(i, d) for i, d in zip(job_ids, datas, strict=True) if d is not None]
        vanished = [i for i, d in zip(job_ids, datas, strict=True) if d is None]
        if vanished:  # hashes gone (finished by a twin): nothing to run
            with self._connection.pipeline(transaction=False) as pipe:
                for job_id in vanished:
                    pipe.lrem(intermediate, 1, job_id)
                pipe.execute()
        return riders

    def _move(self, queue: Queue, count: int) -> list[str]:
        """Move up to `count` waiting jobs to the queue's intermediate list; their ids."""
        with self._connection.pipeline(transaction=False) as pipe:
            for _ in range(count):
                pipe.lmove(queue.key, queue.intermediate_queue.key, "LEFT", "RIGHT")
            return [j.decode() for j in pipe.execute() if j is not None]

    def keep_alive(self, queue: Queue, riders: list[Rider]) -> None:
        """Forget when maintenance first saw the riders in the intermediate list, so it
        never takes them for stranded while this worker lives (heartbeat)."""
        if riders:
            self._connection.delete(*(self._first_seen_key(queue, r) for r in riders))

    def finish(self, queue: Queue, riders: list[Rider]) -> None:
        """The riders' events are written: drop their jobs at once."""
        if not riders:
            return
        with self._connection.pipeline(transaction=True) as pipe:
            for rider in riders:
                pipe.lrem(queue.intermediate_queue.key, 1, rider.job_id)
                pipe.delete(jobs.job_key(rider.job_id), self._first_seen_key(queue, rider))
            pipe.execute()

    def release(self, queue: Queue, riders: list[Rider]) -> None:
        """Put riders back at the head of the queue, in their order, each to run on its own."""
        for rider in reversed(riders):  # each goes to the head: the last one first
            self._requeue(keys=[queue.intermediate_queue.key, queue.key], args=[rider.job_id])

    @staticmethod
    def _first_seen_key(queue: Queue, rider: Rider) -> str:
        return queue.intermediate_queue.get_first_seen_key(rider.job_id)
