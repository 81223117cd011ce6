"""PostgreSQL going away under load: crashed and restarted, or its connections cut; every
accepted event lands exactly once, nothing is dead-lettered, the worker neither exits nor
spins. And the dead letters end to end: a poison event alone, an outage longer than the
retry window, `eventgate dlq replay` landing each event once.

A PostgreSQL server of the test's own (initdb in a temporary directory) and a Redis of its
own; the machine's shared servers are never touched.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from typing import TYPE_CHECKING

import aiohttp
import msgspec
import psycopg
import pytest
import redis
import redis.asyncio as aioredis

from shared import accounts, jobs, keys
from shared.envelope import Batch, Part, encode_batch
from shared.redis_server import redis_url_for
from shared.settings import load_settings
from tests.own_postgres import OwnPostgres, unavailable_reason
from tests.processes import ROOT, Processes

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

ARTIFACTS = ROOT / "test-artifacts"
ACCOUNT = "shop"
BATCH = 50


@pytest.fixture(scope="module")
def pg() -> Iterator[OwnPostgres]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no PostgreSQL server of our own: {reason}")
    server = OwnPostgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def dsn(pg: OwnPostgres) -> str:
    if not pg.answers():  # a test before stopped it and failed before restarting it
        pg.start()
    return pg.create_database(f"eg_{uuid.uuid4().hex[:8]}")


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    settings = load_settings({"EVENTGATE_DATA_DIR": str(tmp_path / "redis")})
    with redis_url_for(settings) as url:
        yield url


def start(tmp_path: Path, redis_url: str, dsn: str, **settings: str) -> Processes:
    procs = Processes(tmp_path, redis_url, sink=dsn, job_heartbeat_s="2", shards="1", **settings)
    procs.start_web()
    procs.start_worker()
    return procs


async def make_key(redis_url: str) -> str:
    client = aioredis.Redis.from_url(redis_url)
    await accounts.create_account(client, ACCOUNT)
    key = await accounts.create_key(client, ACCOUNT, "private")
    await client.aclose()
    return key


async def produce(url: str, key: str, batches: int, spread_s: float, accepted: set[str]) -> int:
    """`batches` batches of BATCH events over `spread_s`, 4 in flight, every 7th resending an
    earlier batch; the events sent (resends included)."""
    sem = asyncio.Semaphore(4)
    sent = 0

    async def send(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal sent
        source = n - 3 if n % 7 == 0 and n >= 3 else n
        ids = [f"b{source}-e{i}" for i in range(BATCH)]
        await asyncio.sleep(n * spread_s / batches)
        events = [{"name": "sale", "id": i, "properties": {"n": n}} for i in ids]
        headers = {"Authorization": f"Bearer {key}"}
        async with sem, session.post(f"{url}/v1/events", json=events, headers=headers) as resp:
            if resp.status == 202:
                accepted.update(ids)
                sent += BATCH

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(send(session, n) for n in range(batches)))
    return sent


def stored(dsn: str) -> list[str]:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            return [r[0] for r in conn.execute("SELECT event_id FROM events")]
    except psycopg.Error:
        return []


def counters(url: str) -> dict[str, int]:
    with redis.Redis.from_url(url) as client:
        return {k.decode(): int(v) for k, v in client.hgetall(keys.counters(ACCOUNT)).items()}


def dead_lettered(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        return int(client.zcard(keys.DEAD_LETTERS))


def until(check: Callable[[], bool], what: str, timeout_s: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.25)
    return time.monotonic() - started


def log_events(path: Path) -> list[str]:
    names = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            names.append(str(json.loads(line).get("event")))
        except (ValueError, AttributeError):
            continue
    return names


def report(name: str, figures: dict[str, object]) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(figures, indent=2))
    print(f"\n[{name}] {figures}")  # noqa: T201 - the figures the report quotes (pytest -s)


@pytest.mark.parametrize("fault", ["crash", "cut"])
def test_postgres_outage_loses_and_duplicates_nothing(fault, pg, dsn, redis_url, tmp_path):
    """PostgreSQL crashed (every server process killed, recovery at restart) for 5 s, or the
    workers' connections terminated again and again, while a producer sends: afterwards the
    table holds every accepted event once, the dead letters none, and the worker ran on."""
    key = asyncio.run(make_key(redis_url))
    procs = start(tmp_path, redis_url, dsn)
    accepted: set[str] = set()
    cuts = 0
    try:

        async def scenario() -> int:
            nonlocal cuts
            producer = asyncio.create_task(
                produce(procs.url, key, batches=160, spread_s=8, accepted=accepted)
            )
            await asyncio.sleep(2)
            if fault == "crash":
                await asyncio.to_thread(pg.stop, "immediate")
                await asyncio.sleep(5)
                await asyncio.to_thread(pg.start)
            else:
                for _ in range(10):
                    cuts += await asyncio.to_thread(pg.cut_connections)
                    await asyncio.sleep(0.5)
            return await producer

        sent = asyncio.run(scenario())
        drain_s = until(lambda: set(stored(dsn)) >= accepted, "every accepted event stored", 60)
        until(
            lambda: (
                counters(redis_url).get("persisted", 0) + counters(redis_url).get("duplicate", 0)
                >= sent
            ),
            "every event counted",
            30,
        )
        rows = stored(dsn)
        worker = procs.workers[0]
        alive = worker.poll() is None
        logged = log_events(tmp_path / "worker-0.log")
    finally:
        procs.close()
    figures = {
        "fault": fault,
        "sent": sent,
        "unique_accepted": len(accepted),
        "persisted": len(rows),
        "lost": len(accepted - set(rows)),
        "duplicated": len(rows) - len(set(rows)),
        "unexpected": len(set(rows) - accepted),
        "dead_lettered": dead_lettered(redis_url),
        "connections_cut": cuts,
        "drain_s_after_last_post": round(drain_s, 1),
        "worker_restarts": logged.count("worker.restarting"),
        "sink_failures_logged": logged.count("sink.unavailable"),
        "counters": counters(redis_url),
    }
    report(f"pg_outage_{fault}", figures)
    assert sent > len(accepted) > 0
    assert figures["lost"] == 0, figures
    assert figures["duplicated"] == 0
    assert figures["unexpected"] == 0
    assert figures["dead_lettered"] == 0
    assert alive, "the worker exited"
    assert figures["worker_restarts"] == 0, "rq's loop restarted: the outage reached it"
    if fault == "crash":
        assert figures["sink_failures_logged"], "the worker never met the outage"
    counts = figures["counters"]
    assert isinstance(counts, dict)
    assert counts["accepted"] == sent
    # A batch committed as the connection died is retried and counted as duplicates then.
    assert counts["persisted"] <= len(accepted)
    assert counts["persisted"] + counts["duplicate"] == counts["accepted"]


def queue_poison(redis_url: str, procs: Processes) -> list[str]:
    """A job the front door no longer lets through (it refuses NUL): ten events, one with a
    NUL in a property, which PostgreSQL cannot store in jsonb. Its ids."""
    settings = load_settings({k: v for k, v in procs.env.items() if k.startswith("EVENTGATE_")})
    ids = [f"p-{i}" for i in range(10)]
    events = [{"name": "sale", "id": i, "properties": {"i": i}} for i in ids]
    events[4]["properties"] = {"text": "bad\x00byte"}
    part = Part(
        account=ACCOUNT,
        dialect="native",
        request_id="poison",
        received_ns=time.time_ns(),
        count=len(ids),
        body=msgspec.json.encode(events),
    )
    data = encode_batch(Batch(parts=[part]))
    with redis.Redis.from_url(redis_url) as client:
        client.hset(
            jobs.job_key("poison"),
            mapping=jobs.job_fields(jobs.job_template(settings), data, len(ids)),
        )
        client.rpush(jobs.queue_key(settings.queue), "poison")
        client.hincrby(keys.counters(ACCOUNT), "accepted", len(ids))
    return ids


def eventgate(procs: Processes, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from shared.cli import main; main()", *args],
        env={**procs.env, "EVENTGATE_LOG_FORMAT": "json", "COLUMNS": "250"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dead_letters_end_to_end(pg, dsn, redis_url, tmp_path):
    """A poison event is dead-lettered alone; an outage longer than the retry window
    dead-letters the jobs that waited it out; `eventgate dlq replay` lands each of their
    events once (and leaves the poison event, still refused, in the dead letters)."""
    key = asyncio.run(make_key(redis_url))
    procs = start(tmp_path, redis_url, dsn, sink_retry_for_s="3", sink_backoff_max_s="1")
    try:
        poison_ids = queue_poison(redis_url, procs)
        until(lambda: len(stored(dsn)) == 9, "the 9 good events of the poisoned job", 30)
        until(lambda: dead_lettered(redis_url) == 1, "the poison event dead-lettered", 10)

        pg.stop("fast")
        accepted: set[str] = set()
        sent = asyncio.run(produce(procs.url, key, batches=12, spread_s=1, accepted=accepted))
        until(
            lambda: counters(redis_url).get("dead_lettered", 0) == 1 + len(accepted),
            "every job of the outage dead-lettered after the window",
            90,
        )
        listed = eventgate(procs, "dlq", "list")
        pg.start()
        time.sleep(1)
        replayed = eventgate(procs, "dlq", "replay", "--all")
        again = eventgate(procs, "dlq", "replay", "--all")
        rows = stored(dsn)
        left = dead_lettered(redis_url)
        counts = counters(redis_url)
    finally:
        procs.close()
    figures = {
        "sent": sent + len(poison_ids),
        "unique_accepted": len(accepted) + len(poison_ids),
        "persisted": len(rows),
        "lost": len((accepted | set(poison_ids)) - set(rows) - {"p-4"}),
        "duplicated": len(rows) - len(set(rows)),
        "dead_lettered_after_replay": left,
        "counters": counts,
    }
    report("dead_letters", figures)
    assert listed.returncode == 0, listed.stderr
    assert "exhausted" in listed.stdout
    assert "rejected" in listed.stdout
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr  # the poison stays
    assert "refused" in replayed.stdout
    assert sorted(rows) == sorted((accepted | set(poison_ids)) - {"p-4"})
    assert figures["duplicated"] == 0
    assert left == 1  # the poison event alone
    assert again.returncode == 1
    assert counts["dead_lettered"] == 1
    assert counts["persisted"] == len(rows)
    assert counts["accepted"] == sent + len(poison_ids)
    assert counts["persisted"] + counts["duplicate"] + counts["dead_lettered"] == counts["accepted"]
