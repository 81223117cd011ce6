"""Rate limits and backpressure against a real Redis (an embedded one of the test's own),
with several processes: the buckets' Lua as Redis runs it, on Redis's clock."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from ingest.admission import ADMISSION, admit
from ingest.app import make_app
from ingest.backpressure import Backpressure
from ingest.ratelimit import RequestLimiter
from shared import accounts, keys
from shared.limits import Limit
from shared.redis_server import redis_url_for
from shared.settings import load_settings
from tests.processes import Processes

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CLIENTS = 4
TOLERANCE = 0.05


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test's own (embedded): no key of anybody else's is near."""
    settings = load_settings({"EVENTGATE_DATA_DIR": str(tmp_path / "redis")})
    with redis_url_for(settings) as url:
        yield url


def record(name: str, figures: dict[str, Any]) -> None:
    """Keep a test's figures for the closing note (test-artifacts/ratelimit-*.json)."""
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"ratelimit-{name}.json").write_text(json.dumps(figures, indent=2) + "\n")


async def redis_us(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1_000_000 + int(micros)


# --- the bucket script, hammered by several processes --------------------------------------


def _hammer(
    url: str, bucket: str, limit: Limit, start_us: int, stop_us: int, skew_s: float, results: Any
) -> None:
    """A client process: from `start_us` to `stop_us` (Redis's clock), 8 loops each checking
    every 10 ms (~800 checks/s, 4x the rate for this process alone), so that four processes
    contend for the bucket without starving each other of CPU (a flat-out loop on a shared
    2-core machine left gaps with nobody asking, and tokens went unused). Its own wall
    clock is `skew_s` off, as a badly synced host's."""
    real_time = time.time
    time.time = lambda: real_time() + skew_s
    time.time_ns = lambda: int((real_time() + skew_s) * 1e9)
    results.put(asyncio.run(_hammer_async(url, bucket, limit, start_us, stop_us)))


async def _hammer_async(
    url: str, bucket: str, limit: Limit, start_us: int, stop_us: int
) -> dict[str, int]:
    client = aioredis.Redis.from_url(url)
    limiter = RequestLimiter(client, timeout_s=5)
    limiter.start()
    while (now := await redis_us(client)) < start_us:
        await asyncio.sleep(min(0.01, (start_us - now) / 1e6))
    # The stop time on this host's monotonic clock: no TIME call per check.
    stop_at = time.monotonic() + (stop_us - now) / 1e6
    counts = {"admitted": 0, "refused": 0}

    async def loop() -> None:
        while time.monotonic() < stop_at:
            verdict = await limiter.check("hammer", [(bucket, limit)])
            counts["admitted" if verdict.allowed else "refused"] += 1
            await asyncio.sleep(0.01)

    await asyncio.gather(*(loop() for _ in range(8)))
    counts["end_us"] = await redis_us(client)
    counts["calls"] = limiter.calls
    await limiter.stop()
    await client.aclose()
    return counts


async def test_four_processes_share_one_bucket_on_the_redis_clock(redis_url):
    """4 processes, their clocks skewed by up to an hour, hammer one bucket (200/s, burst
    50) for 5 s: together they get the burst, then the rate within 5 %, and never more than
    burst + rate x elapsed time (no over-admission under contention)."""
    limit = Limit(rate=200.0, burst=50)
    client = aioredis.Redis.from_url(redis_url)
    start_us = await redis_us(client) + 3_000_000  # time for the processes to start
    stop_us = start_us + 5_000_000
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    bucket = keys.request_bucket("hammer", "native")
    processes = [
        context.Process(
            target=_hammer, args=(redis_url, bucket, limit, start_us, stop_us, skew, results)
        )
        for skew in (0.0, 3600.0, -3600.0, 7.5)
    ]
    for process in processes:
        process.start()
    counts = [await asyncio.to_thread(results.get, timeout=60) for _ in processes]
    for process in processes:
        process.join(10)
    await client.aclose()

    admitted = sum(c["admitted"] for c in counts)
    elapsed_s = (max(c["end_us"] for c in counts) - start_us) / 1e6
    steady_rate = (admitted - limit.burst) / elapsed_s
    figures = {
        "clients": CLIENTS,
        "configured_rate": limit.rate,
        "burst": limit.burst,
        "elapsed_s": round(elapsed_s, 3),
        "admitted": admitted,
        "refused": sum(c["refused"] for c in counts),
        "admitted_per_process": [c["admitted"] for c in counts],
        "script_calls": sum(c["calls"] for c in counts),
        "steady_rate": round(steady_rate, 2),
        "ratio_to_configured": round(steady_rate / limit.rate, 4),
    }
    record("bucket", figures)
    assert all(c["admitted"] > 0 for c in counts), figures  # every process was served
    assert admitted <= limit.burst + limit.rate * elapsed_s + 1, figures
    assert abs(steady_rate / limit.rate - 1) < TOLERANCE, figures


# --- through the front doors ------------------------------------------------------------


def _client(url: str, key: str, stop_at: float, results: Any) -> None:
    """A producer process: 1-event native requests, 16 in flight, until `stop_at`
    (monotonic, which every process of this host shares)."""
    results.put(asyncio.run(_client_async(url, key, stop_at)))


async def _client_async(url: str, key: str, stop_at: float) -> dict[str, Any]:
    counts: dict[str, Any] = {"202": 0, "429": 0, "other": 0, "admitted_at": []}
    headers = {"Authorization": f"Bearer {key}"}

    async def loop(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            async with session.post(
                f"{url}/v1/events", data=b'{"name": "v"}', headers=headers
            ) as r:
                await r.read()
                if r.status == 429:
                    assert r.headers["Retry-After"].isdigit()
                counts[str(r.status) if r.status in (202, 429) else "other"] += 1
                if r.status == 202:
                    counts["admitted_at"].append(time.monotonic())

    counts["first"] = time.monotonic()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(loop(session) for _ in range(16)))
    counts["last"] = time.monotonic()
    return counts


async def make_key(redis_url: str, **changes: object) -> str:
    client = aioredis.Redis.from_url(redis_url)
    await accounts.create_account(client, "shop")
    await accounts.update_account(client, "shop", changes=changes)
    key = await accounts.create_key(client, "shop", "private")
    await client.aclose()
    return key


async def test_two_front_doors_four_producers_get_the_configured_rate(redis_url, tmp_path):
    """Two front-door processes share one account's bucket (100 requests/s, burst 10): four
    producer processes flooding both for 5 s are admitted at 100/s within 5 %, the rest
    answered 429 with a Retry-After. The rate is taken over the seconds when every producer
    was flooding (the start-up and the last in-flight answers left out)."""
    key = await make_key(redis_url, rate=100.0, burst=10)
    doors = [Processes(tmp_path / name, redis_url) for name in ("a", "b")]
    for door in doors:
        (tmp_path / door.data_dir.name).mkdir()
        door.start_web()
    try:
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        stop_at = time.monotonic() + 9  # a few s to start (spawn), then ~5 s of traffic
        producers = [
            context.Process(target=_client, args=(doors[i % 2].url, key, stop_at, results))
            for i in range(CLIENTS)
        ]
        for producer in producers:
            producer.start()
        counts = [await asyncio.to_thread(results.get, timeout=60) for _ in producers]
        for producer in producers:
            producer.join(10)
    finally:
        for door in doors:
            door.close()
    admitted = sum(c["202"] for c in counts)
    window = (max(c["first"] for c in counts) + 0.5, stop_at - 0.25)
    in_window = sum(window[0] <= t <= window[1] for c in counts for t in c["admitted_at"])
    elapsed_s = window[1] - window[0]
    steady_rate = in_window / elapsed_s
    figures = {
        "front_doors": 2,
        "producer_processes": CLIENTS,
        "configured_rate": 100.0,
        "burst": 10,
        "elapsed_s": round(elapsed_s, 3),
        "admitted": admitted,
        "refused_429": sum(c["429"] for c in counts),
        "other": sum(c["other"] for c in counts),
        "steady_rate": round(steady_rate, 2),
        "ratio_to_configured": round(steady_rate / 100.0, 4),
    }
    record("front-doors", figures)
    assert figures["other"] == 0, figures
    assert figures["refused_429"] > admitted, figures  # they did flood
    assert abs(steady_rate / 100.0 - 1) < TOLERANCE, figures


# --- deferral through the real worker ----------------------------------------------------


def stored(db: Path) -> list[tuple[str, str]]:
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute("SELECT event_id, stored_at FROM events").fetchall()


async def test_the_real_worker_defers_and_writes_every_event_once(redis_url, tmp_path):
    """600 events against 100 events/s: the worker writes a burst at once and the rest as
    their tokens come (no sooner than the rate allows), every event exactly once; the
    counters add up and nothing is left deferred."""
    key = await make_key(redis_url, process_rate=100.0)
    procs = Processes(
        tmp_path, redis_url, sink=f"sqlite:///{tmp_path / 'events.db'}", job_heartbeat_s="2"
    )
    procs.start_web()
    procs.start_worker()
    sent = [f"e{i:04d}" for i in range(600)]
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession() as session:
            for first in range(0, len(sent), 100):
                events = [{"name": "v", "id": i} for i in sent[first : first + 100]]
                async with session.post(
                    f"{procs.url}/v1/events",
                    json=events,
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    assert response.status == 202
        db = tmp_path / "events.db"
        while len(stored(db)) < len(sent) and time.monotonic() - started < 60:
            await asyncio.sleep(0.2)
        took_s = time.monotonic() - started
        rows = stored(db)
    finally:
        procs.close()
    client = aioredis.Redis.from_url(redis_url)
    counts = {k.decode(): int(v) for k, v in (await client.hgetall(keys.counters("shop"))).items()}
    await client.aclose()
    figures = {
        "events": len(sent),
        "process_rate": 100.0,
        "took_s": round(took_s, 2),
        "counters": counts,
    }
    record("deferral", figures)
    assert sorted(r[0] for r in rows) == sent, figures  # count in = count persisted, once each
    assert counts["accepted"] == counts["persisted"] == len(sent), figures
    assert counts.get("deferred", 0) == 0, figures
    # 100 at once, 500 more at 100/s: not before ~5 s (rq's whole-second schedule and the
    # maintenance every heartbeat make it later, never sooner).
    assert took_s >= 4.5, figures


# --- backpressure with a real front door -------------------------------------------------


async def test_backpressure_engages_and_releases_with_a_real_front_door(redis_url, tmp_path):
    """No worker: at 4 waiting jobs the front door answers 503 (and /readyz too) within a
    few checks, stays so at 3 jobs (above the low mark of 2), and takes events again once a
    worker has drained the queue."""
    key = await make_key(redis_url)
    procs = Processes(
        tmp_path,
        redis_url,
        sink=f"sqlite:///{tmp_path / 'events.db'}",
        backlog_high_jobs="4",
        backlog_low_jobs="2",
        backpressure_check_s="0.1",
    )
    procs.start_web()
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with aiohttp.ClientSession() as session:

            async def post() -> int:
                async with session.post(
                    f"{procs.url}/v1/events", data=b'{"name": "v"}', headers=headers
                ) as response:
                    return response.status

            statuses = [await post() for _ in range(4)]  # one job each: sent one by one
            assert statuses == [202] * 4
            await asyncio.sleep(0.4)
            async with session.post(
                f"{procs.url}/v1/events", data=b'{"name": "v"}', headers=headers
            ) as refused:
                assert refused.status == 503
                assert refused.headers["Retry-After"] == "2"
            async with session.get(f"{procs.url}/readyz") as ready:
                assert ready.status == 503
                assert (await ready.json())["status"] == "backpressure"
            client = aioredis.Redis.from_url(redis_url)
            await client.lpop("rq:queue:eventgate")  # 3 left: still above the low mark
            await asyncio.sleep(0.4)
            assert await post() == 503
            procs.start_worker()
            deadline = time.monotonic() + 30
            while await post() == 503 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert await post() == 202
            async with session.get(f"{procs.url}/readyz") as ready:
                assert ready.status == 200
            await client.aclose()
    finally:
        procs.close()


async def test_memory_is_read_from_the_real_redis(redis_url):
    """INFO memory (fakeredis has none) gives the used memory; a limit just under it
    engages backpressure."""
    client = aioredis.Redis.from_url(redis_url)
    settings = load_settings({"EVENTGATE_MEMORY_LIMIT_BYTES": "1000000000"})
    load = await Backpressure(client, settings).measure()
    assert load.used_memory > 0
    assert load.memory_limit == 1_000_000_000
    tight = load_settings({"EVENTGATE_MEMORY_LIMIT_BYTES": str(load.used_memory)})
    backpressure = Backpressure(client, tight)
    await backpressure.refresh()
    assert backpressure.engaged
    assert "Redis memory" in backpressure.reason
    await client.aclose()


# --- what the limiter costs the front door ---------------------------------------------


async def test_the_limiter_is_one_script_call_for_many_requests(redis_url):
    """Admission of 64 concurrent requests, limited (a bucket that never refuses) and not
    (an account without a limit: no Redis call): the limited ones share script calls, one
    per group waiting together. The CPU per admission is recorded for the closing note
    (test-artifacts/ratelimit-cost.json), not asserted: timings are the benchmark's."""
    client = aioredis.Redis.from_url(redis_url)
    made = {}
    for name, changes in (("off", {}), ("on", {"rate": 1e9, "burst": 10**9})):
        await accounts.create_account(client, name)
        await accounts.update_account(client, name, changes=changes)
        made[name] = await accounts.find_key(
            client, await accounts.create_key(client, name, "private")
        )
    app = make_app(load_settings({}), client)
    runner = web.AppRunner(app)
    await runner.setup()  # starts the limiter and backpressure tasks
    request = make_mocked_request("POST", "/v1/events", app=app)
    cpu_us: dict[str, list[float]] = {"off": [], "on": []}
    rounds = 100
    try:
        for name in ("off", "on", "off", "on"):
            calls = app[ADMISSION].limiter.calls
            started = time.process_time()
            for _ in range(rounds):
                await asyncio.gather(*(admit(request, made[name], "native") for _ in range(64)))
            cpu_us[name].append((time.process_time() - started) / (rounds * 64) * 1e6)
            per_call = rounds * 64 / max(1, app[ADMISSION].limiter.calls - calls)
            if name == "off":
                assert app[ADMISSION].limiter.calls == calls  # no Redis call at all
            else:
                assert per_call >= 16, per_call  # ~64: a group per gather
    finally:
        await runner.cleanup()
        await client.aclose()
    record(
        "cost",
        {
            "admit_cpu_us_off": round(min(cpu_us["off"]), 2),
            "admit_cpu_us_on": round(min(cpu_us["on"]), 2),
            "requests_per_script_call": round(per_call, 1),
        },
    )
