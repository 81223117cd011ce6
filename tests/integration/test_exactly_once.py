"""End to end under faults: workers SIGKILLed mid-stream, producers resending; every accepted
event lands exactly once."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
import redis.asyncio as aioredis

from shared import accounts, keys
from shared.redis_server import redis_url_for
from shared.settings import load_settings
from tests.processes import Processes

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
BATCH = 100


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test's own (embedded), so killing things never touches shared ones."""
    settings = load_settings({"EVENTGATE_DATA_DIR": str(tmp_path / "redis")})
    with redis_url_for(settings) as url:
        yield url


@pytest.fixture
def processes(tmp_path: Path, redis_url: str) -> Iterator[Processes]:
    # Four shard queues: the two accounts below land on different ones (shards 2 and 3),
    # so workers are killed while taking turns over several queues.
    procs = Processes(
        tmp_path,
        redis_url,
        sink=f"sqlite:///{tmp_path / 'events.db'}",
        job_heartbeat_s="2",
        shards="4",
    )
    yield procs
    procs.close()


ACCOUNTS = ("shop", "app")


async def make_keys(redis_url: str) -> dict[str, str]:
    client = aioredis.Redis.from_url(redis_url)
    made = {}
    for account in ACCOUNTS:
        await accounts.create_account(client, account)
        made[account] = await accounts.create_key(client, account, "private")
    await client.aclose()
    return made


def stored_ids(db: Path) -> list[tuple[str, str]]:
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=10) as conn:
        return [(row[0], row[1]) for row in conn.execute("SELECT account, event_id FROM events")]


async def produce(
    url: str,
    keys_: dict[str, str],
    batches: int,
    accepted: set[tuple[str, str]],
    stats: dict[str, int],
):
    """Send `batches` batches of 100 over ~8 s, alternating accounts (every 7th resends an
    earlier one), 8 in flight."""
    sem = asyncio.Semaphore(8)

    async def send(session: aiohttp.ClientSession, n: int) -> None:
        source = n - 6 if n % 7 == 0 and n >= 6 else n  # a producer resending a batch
        account = ACCOUNTS[source % 2]
        headers = {"Authorization": f"Bearer {keys_[account]}"}
        await asyncio.sleep(n * 8 / batches)  # spread out, so kills land mid-stream
        ids = [f"b{source}-e{i}" for i in range(BATCH)]
        events = [{"name": "sale", "id": i, "properties": {"n": n}} for i in ids]
        async with sem, session.post(f"{url}/v1/events", json=events, headers=headers) as resp:
            stats[str(resp.status)] = stats.get(str(resp.status), 0) + 1
            if resp.status == 202:
                accepted.update((account, i) for i in ids)
                stats["events_sent"] += BATCH

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(send(session, n) for n in range(batches)))


async def test_sigkilled_workers_lose_nothing_and_duplicate_nothing(processes, redis_url, tmp_path):
    key = await make_keys(redis_url)
    processes.start_web()
    processes.start_worker()
    accepted: set[tuple[str, str]] = set()
    stats = {"events_sent": 0, "kills": 0}
    producer = asyncio.create_task(produce(processes.url, key, 400, accepted, stats))

    # Kill the running worker(s) at random moments while events flow, starting new ones;
    # sometimes two run at once, so two workers may meet the same recovered batch.
    while not producer.done():
        await asyncio.sleep(random.uniform(0.2, 0.8))
        for worker in processes.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGKILL)
                stats["kills"] += 1
        processes.start_worker()
        if stats["kills"] % 3 == 0:
            processes.start_worker()
    await producer
    assert stats["kills"] >= 5, "the producer finished before the workers were killed"

    db = tmp_path / "events.db"
    deadline = time.monotonic() + 90
    while set(stored_ids(db)) != accepted and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    ids = stored_ids(db)
    lost = accepted - set(ids)
    duplicated = len(ids) - len(set(ids))
    unexpected = set(ids) - accepted

    client = aioredis.Redis.from_url(redis_url)
    counts: dict[str, int] = {}
    for account in ACCOUNTS:
        for field, value in (await client.hgetall(keys.counters(account))).items():
            counts[field.decode()] = counts.get(field.decode(), 0) + int(value)
    await client.aclose()
    figures = {
        **stats,
        "unique_accepted": len(accepted),
        "lost": len(lost),
        "duplicated": duplicated,
        "unexpected": len(unexpected),
        "counters": counts,
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "sigkill.json").write_text(json.dumps(figures, indent=2))

    assert stats["events_sent"] > len(accepted)  # resends happened
    assert not lost, f"{len(lost)} accepted events lost; {figures}"
    assert duplicated == 0
    assert not unexpected
    # Every accepted event is accounted for once the queue is drained. A worker killed
    # between the sink write and the count makes the retry count its rows as duplicates.
    assert counts["accepted"] == stats["events_sent"]
    assert counts["persisted"] <= len(accepted)
    assert counts["persisted"] + counts["duplicate"] >= counts["accepted"]
