"""Fair shard queues: one account's backlog does not hold up another account's events."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
import redis.asyncio as aioredis

from shared import accounts, jobs
from shared.redis_server import redis_url_for
from shared.settings import load_settings
from tests.processes import Processes

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
FLOOD, TRICKLE = "app", "trickle"  # shards 3 and 0 of 4
SHARDS = 4
FLOOD_REQUESTS, FLOOD_BATCH = 400, 1000


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    settings = load_settings({"EVENTGATE_DATA_DIR": str(tmp_path / "redis")})
    with redis_url_for(settings) as url:
        yield url


@pytest.fixture
def processes(tmp_path: Path, redis_url: str) -> Iterator[Processes]:
    procs = Processes(
        tmp_path, redis_url, sink=f"sqlite:///{tmp_path / 'events.db'}", shards=str(SHARDS)
    )
    yield procs
    procs.close()


async def make_keys(redis_url: str) -> dict[str, str]:
    client = aioredis.Redis.from_url(redis_url)
    made = {}
    for account in (FLOOD, TRICKLE):
        await accounts.create_account(client, account)
        made[account] = await accounts.create_key(client, account, "private")
    await client.aclose()
    return made


def latencies_s(db: Path, account: str) -> list[float]:
    """Accept -> persisted for each stored event of `account` (the sink's stored_at)."""
    with sqlite3.connect(db, timeout=10) as conn:
        rows = conn.execute(
            "SELECT received_at, stored_at FROM events WHERE account = ?", (account,)
        ).fetchall()
    return sorted(
        (datetime.fromisoformat(s) - datetime.fromisoformat(r)).total_seconds() for r, s in rows
    )


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


async def backlog(client: aioredis.Redis, account: str) -> int:
    queue = jobs.shard_queue("eventgate", jobs.shard_of(account, SHARDS))
    return int(await client.llen(jobs.queue_key(queue)))


async def test_a_flood_does_not_delay_another_accounts_trickle(processes, redis_url, tmp_path):
    """With 400,000 events queued by one account, another account's events
    are persisted within a bounded time, long before the flood's backlog drains."""
    assert jobs.shard_of(FLOOD, SHARDS) != jobs.shard_of(TRICKLE, SHARDS)
    keys_ = await make_keys(redis_url)
    processes.start_web()
    client = aioredis.Redis.from_url(redis_url)
    async with aiohttp.ClientSession() as session:
        flood = [{"name": "view", "properties": {"n": i}} for i in range(FLOOD_BATCH)]
        headers = {"Authorization": f"Bearer {keys_[FLOOD]}"}
        sem = asyncio.Semaphore(8)

        async def flood_once() -> None:
            async with (
                sem,
                session.post(f"{processes.url}/v1/events", json=flood, headers=headers) as r,
            ):
                assert r.status == 202

        await asyncio.gather(*(flood_once() for _ in range(FLOOD_REQUESTS)))
        processes.start_worker()
        trickle_headers = {"Authorization": f"Bearer {keys_[TRICKLE]}"}
        backlog_while_trickling = []
        for n in range(40):
            event = {"name": "login", "id": f"t{n}"}
            url = f"{processes.url}/v1/events"
            async with session.post(url, json=event, headers=trickle_headers) as r:
                assert r.status == 202
            backlog_while_trickling.append(await backlog(client, FLOOD))
            await asyncio.sleep(0.05)
    db = tmp_path / "events.db"
    deadline = time.monotonic() + 30
    while len(latencies_s(db, TRICKLE)) < 40 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    flood_left = await backlog(client, FLOOD)
    await client.aclose()

    trickle = latencies_s(db, TRICKLE)
    figures = {
        "flood_events": FLOOD_REQUESTS * FLOOD_BATCH,
        "trickle_sent_while_flood_waited": sum(b > 0 for b in backlog_while_trickling),
        "flood_jobs_waiting_when_trickle_ended": backlog_while_trickling[-1],
        "flood_jobs_waiting_at_the_end": flood_left,
        "trickle_p50_ms": round(percentile(trickle, 0.5) * 1000, 1),
        "trickle_p99_ms": round(percentile(trickle, 0.99) * 1000, 1),
        "trickle_max_ms": round(trickle[-1] * 1000, 1),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "fairness.json").write_text(json.dumps(figures, indent=2))
    assert len(trickle) == 40, figures
    # The flood was still queued while (most of) the trickle went through.
    assert figures["trickle_sent_while_flood_waited"] >= 10, figures
    assert percentile(trickle, 0.99) < 2.0, figures
