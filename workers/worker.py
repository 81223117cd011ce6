"""The rq worker eventgate runs, with rq's crash-safety holes closed.

Measured on rq 3.0: a SIGKILLed worker's job waited 808 s before it ran again; a
SimpleWorker sends no heartbeat during a job; a job popped but not yet started stayed
stranded for a minute or more; a maintenance lock held by a killed worker blocked
recovery for 15 minutes. This subclass:

- runs jobs in-process (SimpleWorker: ~3.4x the jobs/s of forking, and no work horse
  that could outlive a killed parent and run beside a second copy of its job);
- heartbeats from a thread while a job runs, with a TTL of `job_heartbeat_s`, so a dead
  worker's job is found within seconds and a slow one is not mistaken for dead;
- runs maintenance every `job_heartbeat_s`, under a lock that expires by itself:
  abandoned jobs are retried (every job carries rq Retry), jobs stranded between pop
  and start go back to the head of the queue, due retries are enqueued.

Whatever runs twice because of this is harmless: the sink's unique key on
(account, event_id) makes every event land once.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import redis
import structlog
from rq import Queue, SimpleWorker
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job
from rq.registry import StartedJobRegistry, clean_registries
from rq.utils import now
from rq.worker import WorkerStatus
from rq.worker_registration import clean_worker_registry

from shared.envelope import EnvelopeSerializer
from shared.scripts import lua
from workers import jobs
from workers.fair_queue import FairQueue
from workers.riders import Rider, RiderClaims

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType

log = structlog.get_logger("workers.worker")


class GatewayWorker(SimpleWorker):
    def __init__(  # noqa: PLR0913 - all but the queues keyword-only
        self,
        queues: Sequence[Queue | str],
        *,
        connection: redis.Redis,
        heartbeat_s: int,
        max_riders: int = 0,
        stopping: threading.Event | None = None,
        linger_s: float = 0.0,
    ) -> None:
        super().__init__(
            # rq wants instances of its queue class; names and plain Queues are welcome here.
            [
                FairQueue(
                    str(q if isinstance(q, str) else q.name),
                    connection=connection,
                    serializer=EnvelopeSerializer,
                )
                for q in queues
            ],
            connection=connection,
            serializer=EnvelopeSerializer,
            # The idle wait on the queue is worker_ttl - 15 s; keep it one heartbeat long so
            # idle workers run maintenance too.
            worker_ttl=heartbeat_s + 15,
            job_monitoring_interval=heartbeat_s,
            maintenance_interval=heartbeat_s,
            queue_class=FairQueue,
        )
        self.heartbeat_s = heartbeat_s
        # Shared with whoever runs this worker, so a stop outlives this rq loop.
        self.stopping = stopping or threading.Event()
        self._requeue_stranded = connection.register_script(lua("requeue_stranded"))
        self.riders = RiderClaims(connection, max_riders, linger_s)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: finish the job in hand, then leave (rq's warm shutdown)."""
        self.stopping.set()
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:  # noqa: ARG002, FBT001, FBT002
        """rq leaves a multi-queue worker's job in the intermediate list (its BLPOP path has
        none); FairQueue moved it there, so take it out as the job starts, always."""
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)

    def handle_job_success(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: StartedJobRegistry,
        execution: Execution,
    ) -> None:
        if self._finished_elsewhere(job, execution):
            return
        super().handle_job_success(job, queue, started_job_registry, execution)

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: StartedJobRegistry | None = None,
        exc_string: str = "",
        execution: Execution | None = None,
    ) -> None:
        if self._finished_elsewhere(job, execution):
            return
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)

    def _finished_elsewhere(self, job: Job, execution: Execution | None) -> bool:
        """A job whose hash is gone was finished by another run of it (two workers on one
        recovered batch; rq deletes a finished job at once): done, not failed. rq's success
        step would fail on the missing hash and its retry write it back for a third run."""
        # rq's end-of-run heartbeat HSETs the key back with only `last_heartbeat` in it.
        if self.connection.hexists(job.key, "status"):
            return False
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            pipe.delete(job.key)
            pipe.execute()
        log.info("job.finished_elsewhere", job_id=job.id)
        return True

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:  # noqa: ARG002
        """How long the job stays 'started' without a heartbeat (rq adds 60 s)."""
        return self.heartbeat_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        if job.started_at is not None:
            self._forget_dead_executions(job)
        execution = self.prepare_execution(job)
        riders = self.riders.claim(queue)
        stop = threading.Event()
        beat = threading.Thread(
            target=self._beat,
            args=(job, execution, queue, riders, stop),
            name="heartbeat",
            daemon=True,
        )
        beat.start()
        try:
            with jobs.riding(riders) as ride:
                succeeded = self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        if succeeded:
            self.riders.finish(queue, [r for r in riders if r not in ride.unreadable])
            self.riders.release(queue, ride.unreadable)
        else:
            self.riders.release(queue, riders)
        self.set_state(WorkerStatus.IDLE)

    def _forget_dead_executions(self, job: Job) -> None:
        """A job that ran before may still list its dead run: rq keeps the listing 60 s
        longer than the run's record, and fails the next run's success step on it
        ("Execution ... not found in Redis"). Drop listed runs whose record is gone."""
        registry = ExecutionRegistry(job_id=job.id, connection=self.connection)
        gone = [
            execution_id
            for execution_id in registry.get_execution_ids()
            if not self.connection.exists(Execution(execution_id, job.id, self.connection).key)
        ]
        if gone:
            self.connection.zrem(registry.key, *gone)

    def _beat(
        self,
        job: Job,
        execution: Execution,
        queue: Queue,
        riders: list[Rider],
        stop: threading.Event,
    ) -> None:
        while not stop.wait(self.heartbeat_s / 3):
            try:
                self.maintain_heartbeats(job, execution)
                self.riders.keep_alive(queue, riders)
            except redis.exceptions.RedisError as exc:
                log.warning("worker.heartbeat_failed", error=str(exc))

    def clean_registries(self) -> None:
        for queue in self.queues:
            lock = f"eg:maintenance:{queue.name}"
            # Not released: its expiry spaces maintenance runs across all workers, and a
            # worker killed mid-maintenance holds it for one heartbeat, not 15 minutes.
            if self.connection.set(lock, self.name, nx=True, px=self.heartbeat_s * 1000):
                clean_registries(queue, self._exc_handlers)
                clean_worker_registry(queue)
                self._recover_stranded(queue)
                self._enqueue_due_retries(queue)
        self.last_cleaned_at = now()  # type: ignore[assignment]  # rq annotates it None

    def _recover_stranded(self, queue: Queue) -> None:
        """Jobs popped into the intermediate list by a worker that died before starting them."""
        intermediate = queue.intermediate_queue
        started = queue.started_job_registry
        for job_id in intermediate.get_job_ids():
            if job_id in started or intermediate.set_first_seen(job_id):
                continue
            first_seen = intermediate.get_first_seen(job_id)
            if first_seen is None or (now() - first_seen).total_seconds() < self.heartbeat_s:
                continue
            if self._requeue_stranded(keys=[intermediate.key, queue.key], args=[job_id]):
                log.warning("job.requeued_stranded", job_id=job_id, queue=queue.name)

    def _enqueue_due_retries(self, queue: Queue) -> None:
        """Retries rq scheduled for later (backoff) whose time has come."""
        registry = queue.scheduled_job_registry
        job_ids = registry.get_jobs_to_schedule()
        if not job_ids:
            return
        fetched = Job.fetch_many(job_ids, connection=self.connection, serializer=self.serializer)
        with self.connection.pipeline() as pipe:
            for job in fetched:
                if job is not None:
                    queue.enqueue_job(job, pipeline=pipe)
            pipe.zrem(registry.key, *job_ids)
            pipe.execute()
