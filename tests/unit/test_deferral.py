"""Processing limits: a batch over an account's events/s is split, the rest deferred as rq
scheduled jobs, and in the end every event is written once (count in = count persisted)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

import pytest
from rq import Queue

from shared import accounts, keys
from shared.envelope import EnvelopeSerializer, decode_batch
from shared.event import Event, utc_from_ns
from shared.formats import deferred
from workers import jobs as worker_jobs
from workers.limits import ProcessLimits, hold_back
from workers.processor import BatchProcessor
from workers.sinks import open_sink
from workers.worker import GatewayWorker

if TYPE_CHECKING:
    from pathlib import Path

SCHEDULED = "rq:scheduled:unit"


@pytest.fixture
def run_limited_worker(sync_redis, sink_path, settings):
    """Run a burst worker with processing limits over the queue; jobs deferred and due by
    then run too (its maintenance enqueues them first)."""

    def run() -> None:
        sink = open_sink(f"sqlite:///{sink_path}")
        worker_jobs.install(BatchProcessor(sink, sync_redis, ProcessLimits(sync_redis, settings)))
        sync_redis.delete("eg:maintenance:unit")  # maintenance runs at every start here
        try:
            queue = Queue(settings.queue, connection=sync_redis, serializer=EnvelopeSerializer)
            worker = GatewayWorker([queue], connection=sync_redis, heartbeat_s=2, max_riders=9)
            worker.work(burst=True, logging_level="WARNING")
        finally:
            worker_jobs.install(None)
            sink.close()

    return run


def stored_ids(sink_path: Path) -> list[str]:
    with sqlite3.connect(sink_path) as db:
        return [r[0] for r in db.execute("SELECT event_id FROM events ORDER BY event_id")]


def counters(sync_redis) -> dict[str, int]:
    raw = sync_redis.hgetall(keys.counters("acme"))
    return {k.decode(): int(v) for k, v in raw.items()}


def make_due(sync_redis) -> None:
    """Time travel for rq: every deferred job is due now."""
    for job_id in sync_redis.zrange(SCHEDULED, 0, -1):
        sync_redis.zadd(SCHEDULED, {job_id: 0})


async def send(client, key: str, ids: list[str]) -> None:
    events = [{"name": "view", "id": i} for i in ids]
    response = await client.post(
        "/v1/events", json=events, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status == 202


async def test_a_batch_over_the_rate_is_split_and_the_rest_written_later(
    gateway, fake_redis, sync_redis, key, run_limited_worker, sink_path
):
    """10 events/s (a burst of 10): of 35 events 10 are written at once, 25 wait in three
    scheduled jobs of at most 10, due one second apart on Redis's clock; once due they are
    written and the counts add up: accepted = persisted, nothing deferred any more."""
    await accounts.update_account(fake_redis, "acme", changes={"process_rate": 10.0})
    client = await gateway()
    ids = [f"e{i:03d}" for i in range(35)]
    await send(client, key, ids)
    run_limited_worker()
    assert len(stored_ids(sink_path)) == 10
    assert counters(sync_redis) == {"accepted": 35, "persisted": 10, "duplicate": 0, "deferred": 25}
    scheduled = sync_redis.zrange(SCHEDULED, 0, -1, withscores=True)
    seconds, micros = sync_redis.time()
    now = seconds + micros / 1e6
    # Due when the last event's token comes (20, 30, 35 events at 10/s, less the burst of
    # 10), in whole seconds rounded up; the worker ran a moment before `now`.
    for (_, score), due in zip(scheduled, (1.0, 2.0, 2.5), strict=True):
        assert -0.5 < score - (now + due) < 1
    sizes = []
    for job_id, _ in scheduled:
        fields = sync_redis.hgetall(f"rq:job:{job_id.decode()}")
        assert fields[b"status"] == b"scheduled"
        [part] = decode_batch(fields[b"data"]).parts
        assert part.dialect == deferred.DIALECT
        sizes.append(part.count)
    assert sizes == [10, 10, 5]

    run_limited_worker()  # not due yet: nothing moves, nothing spins
    assert len(stored_ids(sink_path)) == 10
    make_due(sync_redis)
    run_limited_worker()
    assert stored_ids(sink_path) == ids
    assert counters(sync_redis) == {"accepted": 35, "persisted": 35, "duplicate": 0, "deferred": 0}
    assert sync_redis.zcard(SCHEDULED) == 0


async def test_deferred_events_are_paid_once_and_later_batches_queue_behind(
    gateway, fake_redis, sync_redis, key, run_limited_worker, sink_path
):
    """Running a deferred job takes no token (it paid when held back); a batch arriving
    meanwhile finds the bucket spent and waits behind the earlier events, in order."""
    await accounts.update_account(fake_redis, "acme", changes={"process_rate": 5.0})
    client = await gateway()
    await send(client, key, [f"a{i}" for i in range(15)])
    run_limited_worker()
    first_due = sorted(s for _, s in sync_redis.zrange(SCHEDULED, 0, -1, withscores=True))
    await send(client, key, [f"b{i}" for i in range(5)])
    run_limited_worker()
    assert len(stored_ids(sink_path)) == 5  # the b's found no token left
    all_due = sorted(s for _, s in sync_redis.zrange(SCHEDULED, 0, -1, withscores=True))
    assert len(all_due) == 3
    assert all_due[-1] > first_due[-1]  # the b's are due after the a's
    bucket_before = sync_redis.get(keys.process_bucket("acme"))
    make_due(sync_redis)
    run_limited_worker()
    assert sync_redis.get(keys.process_bucket("acme")) == bucket_before
    assert len(stored_ids(sink_path)) == 20
    assert counters(sync_redis)["deferred"] == 0
    assert counters(sync_redis)["persisted"] == 20


async def test_resent_events_deferred_twice_land_once(
    gateway, fake_redis, sync_redis, key, run_limited_worker, sink_path
):
    """A producer resending what is still deferred: each event lands once; the resent copies
    count as duplicates, so accepted = persisted + duplicate."""
    await accounts.update_account(fake_redis, "acme", changes={"process_rate": 2.0})
    client = await gateway()
    ids = [f"r{i}" for i in range(6)]
    await send(client, key, ids)
    await send(client, key, ids)
    run_limited_worker()
    make_due(sync_redis)
    run_limited_worker()
    assert stored_ids(sink_path) == ids
    figures = counters(sync_redis)
    assert figures["accepted"] == 12
    assert figures["persisted"] + figures["duplicate"] == 12
    assert figures["deferred"] == 0


def _events(n: int) -> list[Event]:
    at = utc_from_ns(1_700_000_000_000_000_000)
    return [
        Event(
            account="acme",
            event_id=f"x{i}",
            name="v",
            occurred_at=at,
            received_at=at,
            source="native",
            properties={"n": i, "nested": {"ok": [1, 2.5, None]}},
        )
        for i in range(n)
    ]


async def test_a_failed_batch_gives_its_tokens_back(fake_redis, sync_redis, settings, key):
    """A batch that fails before its writes (sink down) returns what it took: the retry,
    not the outage, spends the account's rate."""
    await accounts.update_account(fake_redis, "acme", changes={"process_rate": 10.0})
    limits = ProcessLimits(sync_redis, settings)
    by_account = {"acme": _events(30)}
    deferral = hold_back(limits, by_account, {})
    assert len(by_account["acme"]) == 10
    assert deferral.held == 20

    def fail_inside() -> None:
        with deferral:
            raise RuntimeError("sink down")

    with pytest.raises(RuntimeError):
        fail_inside()
    assert sync_redis.get(keys.process_bucket("acme")) is None  # back to a full bucket
    again = {"acme": _events(30)}
    hold_back(limits, again, {})
    assert len(again["acme"]) == 10


async def test_unlimited_accounts_take_no_token(fake_redis, sync_redis, settings):
    """Without a processing rate (the default) nothing is read from or written to a bucket;
    deferred parts are still written and their count taken back."""
    limits = ProcessLimits(sync_redis, settings)
    fresh, prepaid = {"acme": _events(3)}, {"acme": _events(2)}
    deferral = hold_back(limits, fresh, prepaid)
    assert len(fresh["acme"]) == 5
    assert deferral.deferred == {"acme": -2}
    assert not sync_redis.keys("eg:rl:*")


def test_deferred_parts_round_trip_the_canonical_events():
    """A deferred part holds the events exactly as normalised: ids, times, nested values."""
    events = _events(3)
    part = deferred.deferred_part("acme", events)
    assert part.count == 3
    assert deferred.normalise(part) == events


async def test_a_changed_rate_reaches_the_worker_within_the_cache_time(
    fake_redis, sync_redis, settings, key
):
    """Workers read an account's processing rate again once their cache entry expires."""
    limits = ProcessLimits(sync_redis, settings)
    batch = {"acme": _events(30)}
    hold_back(limits, batch, {})
    assert len(batch["acme"]) == 30
    await accounts.update_account(fake_redis, "acme", changes={"process_rate": 10.0})
    limits._accounts._entries.clear()  # what EVENTGATE_KEY_CACHE_S seconds would do
    batch = {"acme": _events(30)}
    hold_back(limits, batch, {})
    assert len(batch["acme"]) == 10
