"""The event path on the machine's shared Redis and PostgreSQL, used carefully: a queue,
accounts and a schema of each test's own, and every key and the schema removed afterwards.

Front door in-process (aiohttp test client, real redis.asyncio client) -> eventgate's rq
worker in burst mode in-process (real sync redis.Redis) -> SQLite or PostgreSQL sink.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sqlite3
import sys
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from psycopg import sql
from rq import Queue
from rq.job import Job
from rq.utils import now

from ingest.app import make_app
from ingest.server import RUNNER_OPTIONS, redis_client
from shared import accounts, jobs, keys
from shared.envelope import JOB_FUNC, EnvelopeSerializer, decode_batch
from shared.settings import Settings, load_settings
from workers import jobs as worker_jobs
from workers import worker as worker_module
from workers.processor import BatchProcessor
from workers.sinks import PostgresSink, SqliteSink
from workers.worker import GatewayWorker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from workers.sinks import Sink

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REDIS_URL = os.environ.get("EVENTGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
PG_DSN = os.environ.get("EVENTGATE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
HEARTBEAT_S = 2

# The `events` columns DESIGN's canonical event maps to, plus the sink's own stored_at.
EVENT_COLUMNS = {
    "account",
    "event_id",
    "name",
    "occurred_at",
    "received_at",
    "identity",
    "properties",
    "items",
    "value",
    "currency",
    "source",
    "stored_at",
}


# --- what a test owns on the shared Redis, and removing it -------------------------------------


@dataclass
class Owned:
    """Names unique to one test: its queue and accounts all contain `token`."""

    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    accounts: list[str] = field(default_factory=list)
    key_ids: set[str] = field(default_factory=set)
    job_ids: set[str] = field(default_factory=set)
    workers: list[str] = field(default_factory=list)

    @property
    def queue(self) -> str:
        return f"test-{self.token}"

    def account(self) -> str:
        name = f"t{self.token}-{len(self.accounts)}"
        self.accounts.append(name)
        return name

    def note_jobs(self, client: redis.Redis) -> None:
        """Remember every job id the queue and its registries name (job hashes of finished
        jobs are gone, but their ids must be known to clean what rq keeps beside them)."""
        queue_key = jobs.queue_key(self.queue)
        for list_key in (queue_key, f"{queue_key}:intermediate"):
            self.job_ids.update(v.decode() for v in client.lrange(list_key, 0, -1))
        for registry in ("wip", "failed", "finished", "scheduled", "deferred", "canceled"):
            for member in client.zrange(f"rq:{registry}:{self.queue}", 0, -1):
                self.job_ids.add(member.decode().split(":", 1)[0])

    def leftovers(self, client: redis.Redis) -> list[str]:
        """Keys on the server that belong to this test."""
        marks = [self.token, *self.job_ids, *self.workers]
        return [
            name
            for name in (k.decode() for k in client.scan_iter(count=1000))
            if any(mark in name for mark in marks)
        ]

    def remove(self, client: redis.Redis) -> None:
        """Delete every key this test created and its fields in shared hashes and sets;
        nothing else is touched (never FLUSHDB)."""
        self.note_jobs(client)
        for account in self.accounts:
            self.key_ids.update(v.decode() for v in client.smembers(keys.account_keys(account)))
        with client.pipeline(transaction=False) as pipe:
            if self.accounts:
                pipe.hdel(keys.ACCOUNTS, *self.accounts)
            if self.key_ids:
                pipe.hdel(keys.API_KEYS, *self.key_ids)
            pipe.srem(jobs.QUEUES_KEY, jobs.queue_key(self.queue))
            if self.workers:
                pipe.srem("rq:workers", *(f"rq:worker:{name}" for name in self.workers))
            pipe.execute()
        leftovers = self.leftovers(client)
        if leftovers:
            client.delete(*leftovers)


@pytest.fixture
def shared_redis() -> Iterator[redis.Redis]:
    """A sync client of the shared Redis; the test is skipped, with the reason, without one."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3, socket_timeout=15)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {exc}")
    yield client
    client.close()


@pytest.fixture
def owned(shared_redis: redis.Redis) -> Iterator[Owned]:
    mine = Owned()
    yield mine
    mine.remove(shared_redis)
    assert mine.leftovers(shared_redis) == [], "keys left on the shared Redis"
    assert not shared_redis.sismember(jobs.QUEUES_KEY, jobs.queue_key(mine.queue))
    for account in mine.accounts:
        assert not shared_redis.hexists(keys.ACCOUNTS, account)
    for key_id in mine.key_ids:
        assert not shared_redis.hexists(keys.API_KEYS, key_id)


@dataclass
class FrontDoor:
    client: TestClient
    redis: aioredis.Redis
    settings: Settings
    owned: Owned

    async def new_key(self) -> tuple[str, str]:
        """A fresh account of this test's own and a private key of it."""
        account = self.owned.account()
        await accounts.create_account(self.redis, account)
        key = await accounts.create_key(self.redis, account, "private")
        self.owned.key_ids.add(key.split("_", 2)[2].split(".", 1)[0])
        return account, key

    async def post(self, key: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        response = await self.client.post(
            "/v1/events", json=events, headers={"Authorization": f"Bearer {key}"}
        )
        body = await response.json()
        assert response.status == 202, body
        return body


@pytest.fixture
async def front_door(aiohttp_client, tmp_path: Path, owned: Owned) -> AsyncIterator[FrontDoor]:
    settings = load_settings(
        {
            "EVENTGATE_DATA_DIR": str(tmp_path),
            "EVENTGATE_QUEUE": owned.queue,
            "EVENTGATE_SHARDS": "1",
        }
    )
    client = redis_client(settings, REDIS_URL)
    server = TestServer(make_app(settings, client))
    await server.start_server(**RUNNER_OPTIONS)
    test_client = await aiohttp_client(server)
    yield FrontDoor(test_client, client, settings, owned)
    await test_client.close()  # the app flushes and stops first, then its Redis client
    await client.aclose()


def run_worker(client: redis.Redis, owned: Owned, sink: Sink) -> GatewayWorker:
    """Run eventgate's rq worker in burst mode in this process: every job, then return."""
    owned.note_jobs(client)  # finished jobs' hashes are deleted (result_ttl=0)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    worker_jobs.install(BatchProcessor(sink, client))
    try:
        queue = Queue(owned.queue, connection=client, serializer=EnvelopeSerializer)
        worker = GatewayWorker([queue], connection=client, heartbeat_s=HEARTBEAT_S)
        owned.workers.append(worker.name)
        worker.work(burst=True, logging_level="WARNING")
    finally:
        worker_jobs.install(None)
        for signum, handler in handlers.items():  # rq installs its own for the run
            signal.signal(signum, handler)
    return worker


def counters(client: redis.Redis, account: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(keys.counters(account)).items()}


def sqlite_rows(path: Path) -> list[tuple[str, str, str]]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT account, event_id, name FROM events ORDER BY event_id").fetchall()


@pytest.fixture
def sqlite_sink(tmp_path: Path) -> Iterator[SqliteSink]:
    sink = SqliteSink(tmp_path / "events.db")
    yield sink
    sink.close()


# --- SQLite sink -------------------------------------------------------------------------------


async def test_events_land_once_in_sqlite_through_real_redis(
    front_door, shared_redis, owned, sqlite_sink
):
    """202s on the shared Redis, run by the real rq worker, store each event once: a resent
    batch is counted as duplicates, an id-less event gets one minted id, the queue empties."""
    account, key = await front_door.new_key()
    first = [{"name": "sale", "id": f"s-{i}", "properties": {"n": i}} for i in range(3)]
    await front_door.post(key, first)
    await front_door.post(key, [{"name": "view"}])
    await front_door.post(key, first)  # a producer resending

    run_worker(shared_redis, owned, sqlite_sink)

    rows = sqlite_rows(sqlite_sink.path)
    assert [(a, e, n) for a, e, n in rows if e.startswith("s-")] == [
        (account, f"s-{i}", "sale") for i in range(3)
    ]
    minted = [r for r in rows if not r[1].startswith("s-")]
    assert len(minted) == 1
    assert minted[0][0] == account
    assert uuid.UUID(minted[0][1]).version == 7
    assert counters(shared_redis, account) == {"accepted": 7, "persisted": 4, "duplicate": 3}
    assert shared_redis.llen(jobs.queue_key(owned.queue)) == 0


async def test_stranded_job_is_requeued_by_the_lua_script_on_real_redis(
    front_door, shared_redis, owned, sqlite_sink, monkeypatch
):
    """A job popped into the intermediate list by a worker that never started it (first seen
    longer than a heartbeat ago) is put back by requeue_stranded.lua on the real Redis and
    run; the script refuses a job that has left the list."""
    account, key = await front_door.new_key()
    await front_door.post(key, [{"name": "sale", "id": "stranded"}])
    queue = Queue(owned.queue, connection=shared_redis, serializer=EnvelopeSerializer)
    intermediate = queue.intermediate_queue
    # What rq's dequeue does (LMOVE queue -> intermediate), by a worker that died right then.
    job_id = shared_redis.lmove(queue.key, intermediate.key, "LEFT", "RIGHT").decode()
    owned.job_ids.add(job_id)
    first_seen = now() - timedelta(seconds=HEARTBEAT_S * 10)
    shared_redis.set(intermediate.get_first_seen_key(job_id), first_seen.timestamp(), ex=3600)
    assert queue.count == 0
    assert intermediate.get_job_ids() == [job_id]

    logged: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        def warning(self, event: str, **fields: Any) -> None:
            logged.append((event, fields))

    monkeypatch.setattr(worker_module, "log", Recorder())
    worker = run_worker(shared_redis, owned, sqlite_sink)

    assert ("job.requeued_stranded", {"job_id": job_id, "queue": owned.queue}) in logged
    assert sqlite_rows(sqlite_sink.path) == [(account, "stranded", "sale")]
    assert intermediate.get_job_ids() == []
    assert queue.count == 0
    assert shared_redis.script_exists(worker._requeue_stranded.sha) == [True]
    # Gone from the intermediate list (a live worker started it): 0, and nothing is queued.
    assert worker._requeue_stranded(keys=[intermediate.key, queue.key], args=[job_id]) == 0
    assert queue.count == 0


# --- PostgreSQL sink ---------------------------------------------------------------------------


@pytest.fixture
def pg_admin() -> Iterator[psycopg.Connection[Any]]:
    try:
        conn = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_DSN}: {exc}")
    with conn:
        yield conn


@pytest.fixture
def pg_schema(pg_admin: psycopg.Connection[Any]) -> Iterator[str]:
    name = f"test_shared_{secrets.token_hex(6)}"
    pg_admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    pg_admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def pg_sink(pg_schema: str) -> Iterator[PostgresSink]:
    sink = PostgresSink(PG_DSN, schema=pg_schema)
    yield sink
    sink.close()


def pg_rows(admin: psycopg.Connection[Any], schema: str) -> list[tuple[str, str, str, Any]]:
    query = sql.SQL("SELECT account, event_id, name, properties FROM {} ORDER BY event_id")
    return admin.execute(query.format(sql.Identifier(schema, "events"))).fetchall()


async def test_events_land_once_in_postgres_and_resends_count_as_duplicates(
    front_door, shared_redis, owned, pg_sink, pg_admin, pg_schema
):
    """Through real Redis and the real worker into PostgreSQL: each event is stored once, the
    same ids sent again are counted as duplicates, and the events table has DESIGN's columns
    and a unique key on (account, event_id)."""
    account, key = await front_door.new_key()
    events = [{"name": "sale", "id": f"p-{i}", "properties": {"n": i}} for i in range(5)]
    await front_door.post(key, events)
    run_worker(shared_redis, owned, pg_sink)
    expected = [(account, f"p-{i}", "sale", {"n": i}) for i in range(5)]
    assert pg_rows(pg_admin, pg_schema) == expected
    assert counters(shared_redis, account) == {"accepted": 5, "persisted": 5, "duplicate": 0}

    await front_door.post(key, events)
    run_worker(shared_redis, owned, pg_sink)
    assert pg_rows(pg_admin, pg_schema) == expected
    assert counters(shared_redis, account) == {"accepted": 10, "persisted": 5, "duplicate": 5}

    columns = pg_admin.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = 'events'",
        [pg_schema],
    ).fetchall()
    assert {c for (c,) in columns} == EVENT_COLUMNS
    unique_keys = pg_admin.execute(
        "SELECT array_agg(a.attname::text ORDER BY k.ord) FROM pg_index i"
        " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
        " WHERE i.indrelid = %s::regclass AND i.indisunique GROUP BY i.indexrelid",
        [f'"{pg_schema}".events'],
    ).fetchall()
    assert ["account", "event_id"] in [cols for (cols,) in unique_keys]


# --- what `rq info` reads ----------------------------------------------------------------------


async def test_front_door_queue_is_what_rq_info_reads(front_door, shared_redis, owned):
    """Jobs the front door wrote are counted by rq's Queue, listed by Queue.all(), readable as
    rq jobs, and shown by the `rq info` command itself."""
    _, key = await front_door.new_key()
    for n in range(3):  # one at a time: each request is its own flush, so its own job
        await front_door.post(key, [{"name": "sale", "id": f"q-{n}"}])
    job_ids = [v.decode() for v in shared_redis.lrange(jobs.queue_key(owned.queue), 0, -1)]
    owned.job_ids.update(job_ids)

    queue = Queue(owned.queue, connection=shared_redis, serializer=EnvelopeSerializer)
    assert queue.count == len(job_ids) == 3
    assert owned.queue in [q.name for q in Queue.all(connection=shared_redis)]
    assert queue.get_job_ids() == job_ids
    job = Job.fetch(job_ids[0], connection=shared_redis, serializer=EnvelopeSerializer)
    assert job.func_name == JOB_FUNC
    assert job.get_status() == "queued"
    assert decode_batch(job.args[0]).parts[0].count == 1

    rq_info = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("rq")),
        *("info", "--url", REDIS_URL, "--only-queues", "--raw", owned.queue),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(rq_info.communicate(), 30)
    assert rq_info.returncode == 0, err.decode()
    assert f"queue {owned.queue} 3" in out.decode(), out.decode()
