"""Graceful shutdown: SIGTERM lets the front door answer and queue what it is handling, and
a worker finish the job in hand, before they exit 0."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from shared import accounts, jobs, keys
from shared.envelope import decode_batch
from shared.errors import ConfigError
from shared.redis_server import find_server_binary, redis_url_for
from shared.settings import load_settings
from tests.processes import Processes
from workers.sinks.sqlite import SqliteSink

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

try:
    find_server_binary()
except ConfigError as exc:
    pytest.skip(f"no Redis server binary to embed: {exc}", allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
QUEUE = "eventgate"
REQUESTS = 200
BATCH = 100
IN_FLIGHT = 16
SIGNAL_AFTER = 40  # answered requests before the front door gets SIGTERM
EXIT_WITHIN_S = 35.0  # ingest.server.SHUTDOWN_TIMEOUT_S, and a little


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test's own (embedded), stopped at teardown."""
    settings = load_settings({"EVENTGATE_DATA_DIR": str(tmp_path / "redis")})
    with redis_url_for(settings) as url:
        yield url


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as client:
        yield client


@pytest.fixture
def processes(tmp_path: Path, redis_url: str) -> Iterator[Processes]:
    """Front door and workers on that Redis; whatever still runs is killed at teardown."""
    procs = Processes(
        tmp_path, redis_url, sink=f"sqlite:///{tmp_path / 'events.db'}", job_heartbeat_s="2"
    )
    yield procs
    procs.close()


async def make_key(redis_url: str) -> str:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await accounts.create_account(client, "shop")
        return await accounts.create_key(client, "shop", "private")
    finally:
        await client.aclose()


def record(name: str, figures: dict[str, object]) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / name).write_text(json.dumps(figures, indent=2) + "\n")


def queued_events(client: redis.Redis) -> tuple[int, list[str]]:
    """The events waiting in the rq queue: the sum of the parts' counts, and their ids."""
    total, ids = 0, []
    for job_id in client.lrange(jobs.queue_key(QUEUE), 0, -1):
        data = client.hget(jobs.job_key(job_id.decode()), "data")
        assert data is not None, f"job {job_id!r} queued without its hash"
        for part in decode_batch(data).parts:
            total += part.count
            ids.extend(event["id"] for event in json.loads(part.body))
    return total, ids


def wait_exit(process, timeout_s: float) -> tuple[int | None, float]:
    """The exit code (None if still running after timeout_s) and the seconds waited."""
    started = time.monotonic()
    while process.poll() is None and time.monotonic() - started < timeout_s:
        time.sleep(0.01)
    return process.poll(), time.monotonic() - started


async def test_front_door_answers_and_queues_in_flight_requests_on_sigterm(
    processes, redis_url, sync_redis
):
    """SIGTERM in the middle of concurrent requests: each is answered 202 or fails to connect,
    every 202 is in the queue, and the front door exits 0."""
    key = await make_key(redis_url)
    processes.start_web()
    web = processes.web
    headers = {"Authorization": f"Bearer {key}"}
    outcomes: dict[int, object] = {}  # request -> status, or the connection error
    exiting: list[asyncio.Task[tuple[int | None, float]]] = []
    sem = asyncio.Semaphore(IN_FLIGHT)

    async def send(session: aiohttp.ClientSession, n: int) -> None:
        events = [{"name": "sale", "id": f"r{n}-e{i}"} for i in range(BATCH)]
        async with sem:
            try:
                async with session.post(
                    f"{processes.url}/v1/events", json=events, headers=headers
                ) as resp:
                    await resp.read()
                    outcomes[n] = resp.status
            except aiohttp.ClientConnectionError as exc:
                outcomes[n] = exc
        if len(outcomes) == SIGNAL_AFTER:  # the others are in flight, or about to be
            web.send_signal(signal.SIGTERM)
            exiting.append(asyncio.create_task(asyncio.to_thread(wait_exit, web, EXIT_WITHIN_S)))

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(send(session, n) for n in range(REQUESTS)))

    code, exit_s = await exiting[0]
    accepted = {n for n, outcome in outcomes.items() if outcome == 202}
    errors = {n: outcome for n, outcome in outcomes.items() if n not in accepted}
    queued_count, queued_ids = queued_events(sync_redis)
    counted = int(sync_redis.hget(keys.counters("shop"), "accepted") or 0)
    accepted_ids = {f"r{n}-e{i}" for n in accepted for i in range(BATCH)}
    figures = {
        "requests": REQUESTS,
        "accepted": len(accepted),
        "accepted_after_sigterm": len(accepted) - SIGNAL_AFTER,
        "connection_errors": len(errors),
        "error_kinds": sorted({type(e).__name__ for e in errors.values()}),
        "queued_events": queued_count,
        "front_door_exit_s": round(exit_s, 3),
    }
    record("shutdown-front-door.json", figures)

    assert len(outcomes) == REQUESTS
    assert code == 0, processes.log("web")
    assert exit_s < EXIT_WITHIN_S
    assert len(accepted) >= SIGNAL_AFTER, figures
    assert all(isinstance(e, aiohttp.ClientConnectionError) for e in errors.values()), errors
    assert errors, f"every request was answered: SIGTERM came too late; {figures}"
    # Every 202 is queued, each event once; a request whose answer was lost may be queued too.
    assert accepted_ids <= set(queued_ids), figures
    assert len(queued_ids) == len(set(queued_ids)) == queued_count, figures
    assert set(queued_ids) <= {f"r{n}-e{i}" for n in outcomes for i in range(BATCH)}
    assert counted == queued_count
    assert "Traceback" not in processes.log("web")


def stored_ids(db: Path) -> list[str]:
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        return [row[0] for row in conn.execute("SELECT event_id FROM events")]


def post(url: str, key: str, events: list[dict[str, object]]) -> int:
    request = urllib.request.Request(
        f"{url}/v1/events",
        data=json.dumps(events).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def wait_until(predicate, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
def sink_lock(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A connection that may hold the sink's write lock; closed (lock released) at teardown."""
    db = tmp_path / "events.db"
    SqliteSink(db).close()  # the schema, in WAL mode, before any worker opens it
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    yield conn
    conn.close()


def test_worker_finishes_the_job_in_hand_on_sigterm(
    processes, redis_url, sync_redis, tmp_path, sink_lock
):
    """SIGTERM while a job waits on the sink's write lock: the worker completes the job once the
    lock is free, then exits 0, leaving it neither started nor requeued."""
    key = asyncio.run(make_key(redis_url))
    processes.start_web()
    worker = processes.start_worker()
    client = sync_redis
    started_jobs = StartedJobRegistry(QUEUE, connection=client)
    wait_until(lambda: client.scard(f"rq:workers:{QUEUE}") > 0, 20, "the worker to register")

    sink_lock.execute("BEGIN EXCLUSIVE")
    ids = [f"held-{i}" for i in range(BATCH)]
    assert post(processes.url, key, [{"name": "sale", "id": i} for i in ids]) == 202
    wait_until(lambda: client.zcard(started_jobs.key) > 0, 10, "the job to start")
    (job_id,) = started_jobs.get_job_ids(cleanup=False)

    worker.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(1.0)
    assert worker.poll() is None, f"the worker left its job: {processes.log('worker-0')}"
    assert sink_lock.execute("SELECT count(*) FROM events").fetchone() == (0,)
    sink_lock.execute("ROLLBACK")
    released = time.monotonic()

    code, _ = wait_exit(worker, 20)
    exited = time.monotonic()
    record(
        "shutdown-worker.json",
        {
            "lock_held_after_sigterm_s": round(released - signalled, 3),
            "exit_after_release_s": round(exited - released, 3),
            "exit_after_sigterm_s": round(exited - signalled, 3),
        },
    )
    assert code == 0, processes.log("worker-0")
    assert released - signalled >= 1.0
    assert sorted(stored_ids(tmp_path / "events.db")) == sorted(ids)
    assert client.zcard(started_jobs.key) == 0
    assert client.llen(jobs.queue_key(QUEUE)) == 0  # not requeued
    assert FailedJobRegistry(QUEUE, connection=client).count == 0
    assert ScheduledJobRegistry(QUEUE, connection=client).count == 0
    assert not client.exists(jobs.job_key(job_id))  # done: result_ttl=0 deleted it
    assert int(client.hget(keys.counters("shop"), "persisted") or 0) == BATCH
    assert "Traceback" not in processes.log("worker-0")
