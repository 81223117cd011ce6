"""Section 2: events/s through one worker process against a plain bulk insert of the same
rows into the same sink, with no queue."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared import jobs
from shared.bench.counters import counts, wait_done
from shared.bench.rows import Workload, job_records, make_workload

if TYPE_CHECKING:
    from collections.abc import Mapping

    import redis

    from shared.bench.sinks import BenchSink
    from shared.bench.stack import Service, Stack

EVENTS_PER_JOB = 1000  # as group commit packs them under load (EVENTGATE_JOB_MAX_EVENTS)
REQUEST_BATCH = 100
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class WorkerRun:
    worker_events_per_s: float
    insert_events_per_s: float

    @property
    def ratio(self) -> float:
        return self.worker_events_per_s / self.insert_events_per_s


class WorkerBench:
    """One worker process on the stack's queue, writing to `sink`; warmed up before use."""

    def __init__(
        self,
        stack: Stack,
        client: redis.Redis,
        sink: BenchSink,
        template: Mapping[str, str | bytes | int],
        jobs_per_run: int,
    ) -> None:
        self._stack = stack
        self._client = client
        self._sink = sink
        self._template = template
        self.workload = make_workload(
            f"worker-{sink.name}",
            jobs_count=jobs_per_run,
            parts=EVENTS_PER_JOB // REQUEST_BATCH,
            batch=REQUEST_BATCH,
        )
        self.worker: Service | None = None

    def start(self) -> Service:
        """Start the worker and wait until it has stored a first small job.

        Raises:
            RuntimeError: the worker did not store it in time.
        """
        self.worker = self._stack.start_worker(self._sink.url, f"worker-{self._sink.name}")
        warm = make_workload(f"warm-{self._sink.name}", jobs_count=1, parts=1, batch=10)
        self._push(warm, warm.events)
        if wait_done(self._client, warm.account, warm.events, READY_TIMEOUT_S) is None:
            raise RuntimeError(
                f"the worker stored nothing:\n{self._stack.log_tail(self.worker.name)}"
            )
        return self.worker

    def stop(self) -> None:
        if self.worker is not None:
            self._stack.stop(self.worker)
            self.worker = None

    def _push(self, workload: Workload, events_per_job: int) -> float:
        """Write the job hashes, then queue them all in one command; when that was sent."""
        records = job_records(self._template, workload.envelopes, events_per_job)
        queue = jobs.queue_key(self._stack.queue)
        with self._client.pipeline(transaction=False) as pipe:
            pipe.sadd(jobs.QUEUES_KEY, queue)
            for job_id, fields in records:
                pipe.hset(jobs.job_key(job_id), mapping=fields)  # type: ignore[arg-type]
            pipe.execute()
        started = time.perf_counter()
        self._client.rpush(queue, *(job_id for job_id, _ in records))
        return started

    def run_worker(self) -> float:
        """Events/s of the worker over the whole workload, the sink emptied first.

        Raises:
            RuntimeError: the worker did not finish within a minute.
        """
        self._sink.clear()
        workload = self.workload
        target = counts(self._client, workload.account).done + workload.events
        started = self._push(workload, EVENTS_PER_JOB)
        finished = wait_done(self._client, workload.account, target, 60.0)
        if finished is None:
            name = self.worker.name if self.worker else "worker"
            raise RuntimeError(f"the worker did not finish:\n{self._stack.log_tail(name)}")
        return workload.events / (finished - started)

    def run_insert(self) -> float:
        """Events/s of a plain bulk insert of the same rows, the sink emptied first."""
        self._sink.clear()
        seconds = self._sink.insert(self.workload.rows, EVENTS_PER_JOB)
        return self.workload.events / seconds

    def run_pair(self, first_worker: bool) -> WorkerRun:  # noqa: FBT001 - alternated by the caller
        """Both, one after the other, in the order given (alternate it to cancel drift)."""
        if first_worker:
            worker = self.run_worker()
            insert = self.run_insert()
        else:
            insert = self.run_insert()
            worker = self.run_worker()
        return WorkerRun(worker, insert)
