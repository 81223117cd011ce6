"""Backpressure: 503 with Retry-After from the high-water mark until below the low one."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import redis.exceptions

from ingest.admission import ADMISSION
from ingest.backpressure import Load, over
from shared import jobs

EVENT = b'{"name": "page_view"}'
MARKS = {"backlog_high_jobs": 3, "backlog_low_jobs": 1, "backpressure_check_s": 0.05}


async def fill(fake_redis, queue: str, jobs_waiting: int) -> None:
    """Make `queue` hold exactly `jobs_waiting` job ids (the check only counts them)."""
    key = jobs.queue_key(queue)
    await fake_redis.sadd(jobs.QUEUES_KEY, key)
    await fake_redis.delete(key)
    if jobs_waiting:
        await fake_redis.rpush(key, *(f"job-{i}" for i in range(jobs_waiting)))


async def manual(client):
    """The app's backpressure with its background task stopped, so that the test alone
    decides when it measures (a check in flight would land after the test's own)."""
    backpressure = client.server.app[ADMISSION].backpressure
    await backpressure.stop()
    return backpressure


def test_the_marks_have_hysteresis(settings):
    """On at the high-water mark; off only under the low one; memory alike, as a share of
    the limit; an unknown limit is not checked."""
    s = msgspec.structs.replace(settings, backlog_high_jobs=100, backlog_low_jobs=80)
    assert not over(Load(99, 0, 0), s, engaged=False)
    assert "100 jobs waiting" in over(Load(100, 0, 0), s, engaged=False)
    assert over(Load(80, 0, 0), s, engaged=True)
    assert not over(Load(79, 0, 0), s, engaged=True)
    assert "memory at 90%" in over(Load(0, 900, 1000), s, engaged=False)
    assert not over(Load(0, 899, 1000), s, engaged=False)
    assert over(Load(0, 800, 1000), s, engaged=True)
    assert not over(Load(0, 799, 1000), s, engaged=True)
    assert not over(Load(0, 10**12, 0), s, engaged=False)
    off = msgspec.structs.replace(s, backlog_high_jobs=0)
    assert not over(Load(10**9, 0, 0), off, engaged=False)
    # A low mark above the high one is taken as the high one.
    odd = msgspec.structs.replace(s, backlog_low_jobs=500)
    assert not over(Load(99, 0, 0), odd, engaged=True)


async def test_backlog_engages_and_releases_with_hysteresis(gateway, fake_redis, key, settings):
    """At 3 waiting jobs every request is 503 with Retry-After and nothing is queued, and
    /readyz says not ready; at 2 it still is (above the low mark); at 0 all is well again."""
    client = await gateway(**MARKS)
    backpressure = await manual(client)
    auth = {"Authorization": f"Bearer {key}"}
    await fill(fake_redis, settings.queue, 3)
    await backpressure.refresh()
    refused = await client.post("/v1/events", data=EVENT, headers=auth)
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "2"
    assert "3 jobs waiting" in (await refused.json())["detail"]
    assert (await client.get("/readyz")).status == 503
    await fill(fake_redis, settings.queue, 2)
    await backpressure.refresh()
    assert (await client.post("/v1/events", data=EVENT, headers=auth)).status == 503
    assert await fake_redis.llen(jobs.queue_key(settings.queue)) == 2  # the test's own ids
    await fill(fake_redis, settings.queue, 0)
    await backpressure.refresh()
    assert (await client.post("/v1/events", data=EVENT, headers=auth)).status == 202
    assert (await client.get("/readyz")).status == 200


async def test_the_background_task_keeps_the_flag_fresh(gateway, fake_redis, key, settings):
    """No request measures anything: the task does, every backpressure_check_s."""
    client = await gateway(**MARKS)
    await fill(fake_redis, settings.queue, 5)
    for _ in range(40):
        if client.server.app[ADMISSION].backpressure.engaged:
            break
        await asyncio.sleep(0.025)
    assert client.server.app[ADMISSION].backpressure.engaged
    await fill(fake_redis, settings.queue, 0)
    for _ in range(40):
        if not client.server.app[ADMISSION].backpressure.engaged:
            break
        await asyncio.sleep(0.025)
    assert not client.server.app[ADMISSION].backpressure.engaged


async def test_only_the_gateways_queues_count(gateway, fake_redis, key, settings):
    """Shards (`queue.N`) count; another application's queue on the same Redis does not."""
    backpressure = await manual(await gateway(**MARKS))
    await fill(fake_redis, "someone-else", 100)
    await fill(fake_redis, f"{settings.queue}.1", 2)
    await fill(fake_redis, settings.queue, 0)
    await backpressure.refresh()
    assert not backpressure.engaged
    await fill(fake_redis, f"{settings.queue}.2", 1)
    await backpressure.refresh()
    assert backpressure.engaged


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/events", {}),
        ("/api/v1/events?service_id=acme", None),
        ("/v1/persons", {}),
    ],
)
async def test_every_route_that_queues_is_held(
    gateway, fake_redis, key, settings, path, headers, monkeypatch
):
    """Memory past its mark holds the dialects and the persons API alike, in their shapes."""
    client = await gateway(**MARKS)
    backpressure = await manual(client)

    async def full() -> Load:
        return Load(0, 95, 100)

    monkeypatch.setattr(backpressure, "measure", full)
    await backpressure.refresh()
    auth = {"access_token": key} if headers is None else {"Authorization": f"Bearer {key}"}
    response = await client.post(path, data=b"{}", headers=auth)
    assert response.status == 503
    assert response.headers["Retry-After"] == "2"
    assert "memory at 95%" in await response.text()


async def test_an_unmeasurable_redis_leaves_the_flag_as_it_was(gateway, fake_server, settings):
    """A failed check neither engages nor releases (Redis down is answered on its own)."""
    backpressure = await manual(await gateway(**MARKS))
    backpressure.reason = "42 jobs waiting"
    fake_server.connected = False
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await backpressure.refresh()
    finally:
        fake_server.connected = True
    assert backpressure.engaged
