"""Jobs the front door writes run through eventgate's rq worker into a real SQLite sink."""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING

import msgspec
from rq import Queue
from rq.registry import FailedJobRegistry

from shared import jobs
from shared.envelope import Batch, EnvelopeSerializer, Part, encode_batch
from shared.settings import Settings
from workers import jobs as worker_jobs
from workers.processor import BatchProcessor
from workers.sinks.sqlite import SqliteSink
from workers.worker import GatewayWorker

if TYPE_CHECKING:
    from pathlib import Path


def rows(sink_path: Path) -> list[tuple[str, str, str, str]]:
    with sqlite3.connect(sink_path) as db:
        return db.execute(
            "SELECT account, event_id, name, properties FROM events ORDER BY event_id"
        ).fetchall()


async def test_accepted_events_land_once_in_the_sink(gateway, key, run_worker, sink_path):
    """202 -> rq job -> real worker -> one row per event, with the producer's properties."""
    client = await gateway()
    events = [
        {"name": "sale", "id": "a", "properties": {"sku": "N1", "qty": 2}},
        {"name": "view", "id": "b"},
    ]
    response = await client.post(
        "/v1/events", json=events, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status == 202
    run_worker()
    stored = rows(sink_path)
    assert [(r[0], r[1], r[2]) for r in stored] == [("acme", "a", "sale"), ("acme", "b", "view")]
    assert json.loads(stored[0][3]) == {"sku": "N1", "qty": 2}


async def test_resent_events_are_duplicates_not_rows(
    gateway, key, run_worker, sink_path, fake_redis
):
    """A producer resending the same ids gets 202 twice; the sink holds each once."""
    client = await gateway()
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(2):
        await client.post("/v1/events", json=[{"name": "x", "id": "same"}], headers=headers)
    run_worker()
    assert len(rows(sink_path)) == 1
    counts = await fake_redis.hgetall("eg:count:{acme}")
    assert counts == {b"accepted": b"2", b"persisted": b"1", b"duplicate": b"1"}


async def test_minted_ids_survive_a_retried_job(gateway, key, run_worker, sink_path, sync_redis):
    """The same job run twice (a retry after a crash) stores its id-less events once."""
    client = await gateway()
    await client.post(
        "/v1/events", json=[{"name": "no-id"}] * 3, headers={"Authorization": f"Bearer {key}"}
    )
    [job_id] = sync_redis.lrange(jobs.queue_key("unit"), 0, -1)
    data = sync_redis.hget(jobs.job_key(job_id.decode()), "data")
    run_worker()
    # Enqueue the very same envelope again, as a retry would.
    sync_redis.hset(
        jobs.job_key("again"),
        mapping=jobs.job_fields(
            jobs.job_template(msgspec.structs.replace(Settings(), queue="unit")), data, 3
        ),
    )
    sync_redis.rpush(jobs.queue_key("unit"), "again")
    run_worker()
    assert len(rows(sink_path)) == 3


def test_unreadable_batch_goes_to_failed_without_retries(sync_redis, run_worker, settings):
    """A poison envelope is not retried 25 times: it is parked as failed at once."""
    template = jobs.job_template(settings)
    sync_redis.hset(jobs.job_key("poison"), mapping=jobs.job_fields(template, b"garbage", 1))
    sync_redis.rpush(jobs.queue_key(settings.queue), "poison")
    run_worker()
    failed = FailedJobRegistry(settings.queue, connection=sync_redis)
    assert failed.get_job_ids() == ["poison"]


def test_unknown_dialect_is_poison(sync_redis, run_worker, settings):
    part = Part(account="a", dialect="martian", request_id="r", received_ns=0, count=1, body=b"{}")
    template = jobs.job_template(settings)
    data = encode_batch(Batch(parts=[part]))
    sync_redis.hset(jobs.job_key("m"), mapping=jobs.job_fields(template, data, 1))
    sync_redis.rpush(jobs.queue_key(settings.queue), "m")
    run_worker()
    assert FailedJobRegistry(settings.queue, connection=sync_redis).get_job_ids() == ["m"]


def queue_native(sync_redis, settings, job_id: str, ids: list[str]) -> None:
    """Put one job of native events on the queue, as the front door would."""
    body = msgspec.json.encode([{"name": "e", "id": i} for i in ids])
    part = Part(
        account="acme",
        dialect="native",
        request_id=job_id,
        received_ns=0,
        count=len(ids),
        body=body,
    )
    data = encode_batch(Batch(parts=[part]))
    sync_redis.hset(
        jobs.job_key(job_id), mapping=jobs.job_fields(jobs.job_template(settings), data, len(ids))
    )
    sync_redis.rpush(jobs.queue_key(settings.queue), job_id)


def test_waiting_jobs_ride_along_and_are_written_together(
    sync_redis, run_worker, sink_path, settings
):
    """Riders' events land once, their jobs are gone, and nothing stays in the lists."""
    for n in range(5):
        queue_native(sync_redis, settings, f"job{n}", [f"{n}-{i}" for i in range(3)])
    run_worker(max_riders=9)
    assert len(rows(sink_path)) == 15
    assert sync_redis.llen(jobs.queue_key(settings.queue)) == 0
    assert sync_redis.llen(f"{jobs.queue_key(settings.queue)}:intermediate") == 0
    assert sync_redis.keys("rq:job:*") == []
    counts = sync_redis.hgetall("eg:count:{acme}")
    assert counts[b"persisted"] == b"15"


def test_an_unreadable_rider_is_left_to_fail_alone(sync_redis, run_worker, sink_path, settings):
    """A corrupt job taken as a rider neither spoils the others nor gets lost: it goes back
    to the queue, runs on its own and is parked as failed."""
    queue_native(sync_redis, settings, "good1", ["a"])
    sync_redis.hset(
        jobs.job_key("bad"), mapping=jobs.job_fields(jobs.job_template(settings), b"garbage", 1)
    )
    sync_redis.rpush(jobs.queue_key(settings.queue), "bad")
    queue_native(sync_redis, settings, "good2", ["b"])
    run_worker(max_riders=9)
    assert sorted(r[1] for r in rows(sink_path)) == ["a", "b"]
    assert FailedJobRegistry(settings.queue, connection=sync_redis).get_job_ids() == ["bad"]


def test_riders_go_back_to_the_queue_when_the_sink_fails(sync_redis, settings, sink_path):
    """A sink that refuses the write leaves every rider queued, at the head, to run again."""
    for n in range(3):
        queue_native(sync_redis, settings, f"job{n}", [f"{n}"])
    SqliteSink(sink_path).close()  # the table exists before the lock is taken
    locker = sqlite3.connect(sink_path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # the sink's write times out: SinkUnavailableError
    worker_jobs.install(BatchProcessor(SqliteSink(sink_path, busy_timeout_ms=50), sync_redis))
    try:
        queue = Queue(settings.queue, connection=sync_redis, serializer=EnvelopeSerializer)
        worker = GatewayWorker([queue], connection=sync_redis, heartbeat_s=2, max_riders=9)
        worker.work(burst=True, max_jobs=1, logging_level="WARNING")
    finally:
        worker_jobs.install(None)
        locker.execute("ROLLBACK")
        locker.close()
    # job0 was the job (now scheduled for a retry); its riders are back, in order.
    assert sync_redis.lrange(jobs.queue_key(settings.queue), 0, -1) == [b"job1", b"job2"]
    assert sync_redis.llen(f"{jobs.queue_key(settings.queue)}:intermediate") == 0
