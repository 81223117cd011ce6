"""The HTTP forward sink against a local aiohttp target that fails, throttles, hangs and
recovers; through the Redis markers and a real worker, every event arrives at least once and
the Idempotency-Keys let the target keep each exactly once."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import msgspec
import pytest
from aiohttp import web

from shared.errors import ConfigError
from tests.delivery_support import counters, drain, native, queue_job, quick
from tests.forward_target import Target, serving
from workers.forwarding import ForwardGuard
from workers.processor import BatchProcessor
from workers.sinks import HttpSink, open_sink
from workers.sinks.base import (
    SinkRefusedError,
    SinkRejectedError,
    SinkUnavailableError,
    WriteResult,
    batch_key,
    event_record,
)
from workers.sinks.http import ForwardBody


@pytest.fixture
def target() -> Target:
    return Target()


@pytest.fixture
async def url(aiohttp_server, target) -> str:
    server = await aiohttp_server(target.app())
    return str(server.make_url("/ingest"))


def sink_for(url: str, **options) -> tuple[HttpSink, list[float]]:
    """A sink whose waits are recorded instead of slept (fast tests, checkable backoff)."""
    slept: list[float] = []
    options = {"timeout_s": 1.0, **options}
    return HttpSink(url, sleep=slept.append, **options), slept


async def test_posts_gzipped_json_with_an_idempotency_key(url, target, event_factory):
    """One POST: gzip, JSON, the batch's key in the header and the body, each event's id."""
    sink, _ = sink_for(url)
    events = [event_factory() for _ in range(3)]
    assert await asyncio.to_thread(sink.write_batch, events) == WriteResult(3, 0)
    [received] = target.requests
    assert received.headers["Content-Encoding"] == "gzip"
    assert received.headers["Content-Type"] == "application/json"
    assert received.key == batch_key(events) == received.body["batch_id"]
    assert received.event_ids == [("acme", e.event_id) for e in events]
    first = received.body["events"][0]
    assert first["occurred_at"] == "2025-11-18T07:21:16.527000+00:00"
    assert first["properties"] == events[0].properties
    assert set(first) == {
        "account", "event_id", "name", "occurred_at", "received_at", "source",
        "identity", "properties", "items", "value", "currency",
    }  # fmt: skip


async def test_the_same_events_make_the_same_key_and_bytes(aiohttp_server, event_factory):
    """A batch sent again is byte for byte the first one, so a receiver can dedupe it."""
    bodies: list[tuple[str, bytes]] = []

    async def keep(request):
        bodies.append((request.headers["Idempotency-Key"], await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/ingest", keep)
    server = await aiohttp_server(app)
    sink, _ = sink_for(str(server.make_url("/ingest")))
    events = [event_factory() for _ in range(5)]
    await asyncio.to_thread(sink.write_batch, events)
    await asyncio.to_thread(sink.write_batch, list(events))
    assert bodies[0] == bodies[1]
    assert bodies[0][1].startswith(b'{"batch_id":"eg-')


async def test_server_errors_are_retried_with_jittered_backoff(url, target, event_factory):
    target.script = [503, 502, 500]
    sink, slept = sink_for(url, attempts=4, max_wait_s=8)
    assert await asyncio.to_thread(sink.write_batch, [event_factory()]) == WriteResult(1, 0)
    assert len(target.requests) == 4
    # Full jitter: each wait at most 0.5 * 2**attempt (the 503s asked for 1 s).
    assert slept[0] >= 1.0
    assert 0 <= slept[1] <= 1.0
    assert 0 <= slept[2] <= 2.0


@pytest.mark.parametrize("status", [408, 409, 429])
async def test_throttling_and_conflicts_are_retried(url, target, event_factory, status):
    target.script = [status]
    target.retry_after = "2"
    sink, slept = sink_for(url)
    assert await asyncio.to_thread(sink.write_batch, [event_factory()]) == WriteResult(1, 0)
    assert len(target.requests) == 2
    if status == 429:
        assert slept[0] >= 2.0  # its Retry-After


async def test_retry_after_beyond_max_wait_is_handed_back(url, target, event_factory):
    """A target asking for two minutes is not waited on in the job: the error carries the
    wait, and the job is retried that much later."""
    target.script = [429]
    target.retry_after = "120"
    sink, slept = sink_for(url)
    with pytest.raises(SinkUnavailableError) as caught:
        await asyncio.to_thread(sink.write_batch, [event_factory()])
    assert caught.value.retry_after == 120
    assert slept == []
    assert len(target.requests) == 1


async def test_retry_after_as_an_http_date(url, target, event_factory):
    target.script = [503]
    target.retry_after = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 90))
    sink, _ = sink_for(url, attempts=1)
    with pytest.raises(SinkUnavailableError) as caught:
        await asyncio.to_thread(sink.write_batch, [event_factory()])
    assert 80 <= (caught.value.retry_after or 0) <= 91


async def test_a_hanging_target_times_out_as_unavailable(url, target, event_factory):
    target.script = ["hang"]
    target.hang_s = 3
    sink, _ = sink_for(url, timeout_s=0.3, attempts=1)
    started = time.monotonic()
    with pytest.raises(SinkUnavailableError, match="Timeout"):
        await asyncio.to_thread(sink.write_batch, [event_factory()])
    assert time.monotonic() - started < 2


async def test_nothing_listening_is_unavailable(event_factory, free_tcp_port):
    sink, _ = sink_for(f"http://127.0.0.1:{free_tcp_port}/ingest", attempts=2)
    with pytest.raises(SinkUnavailableError):
        await asyncio.to_thread(sink.write_batch, [event_factory()])


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_refused_data_is_rejected(url, target, event_factory, status):
    target.script = [status]
    sink, _ = sink_for(url)
    with pytest.raises(SinkRejectedError, match=str(status)):
        await asyncio.to_thread(sink.write_batch, [event_factory()])
    assert len(target.requests) == 1


@pytest.mark.parametrize("status", [401, 403, 404, 410])
async def test_other_4xx_refuse_every_batch(url, target, event_factory, status):
    target.script = [status]
    sink, _ = sink_for(url)
    with pytest.raises(SinkRefusedError, match=str(status)):
        await asyncio.to_thread(sink.write_batch, [event_factory()])
    assert len(target.requests) == 1


async def test_credentials_from_the_url_never_in_its_name(url, target, event_factory):
    with_user = url.replace("http://", "http://ann:s3cret@") + "?tenant=1#bearer=tok&batch=7"
    sink = open_sink(with_user)
    assert isinstance(sink, HttpSink)
    assert sink.name == url
    assert sink.max_events == 7
    await asyncio.to_thread(sink.write_batch, [event_factory()])
    assert target.requests[0].headers["Authorization"] == "Bearer tok"
    basic = open_sink(url.replace("http://", "http://ann:s3cret@"))
    await asyncio.to_thread(basic.write_batch, [event_factory()])
    expected = base64.b64encode(b"ann:s3cret").decode()
    assert target.requests[1].headers["Authorization"] == f"Basic {expected}"


@pytest.mark.parametrize("option", ["batch=0", "linger_ms=5000", "timeout_s=soon", "colour=blue"])
def test_bad_options_are_config_errors(option):
    with pytest.raises(ConfigError, match="EVENTGATE_SINK option"):
        open_sink(f"https://collector.example/ingest#{option}")


async def test_guard_sends_an_acknowledged_event_once(url, target, event_factory, sync_redis):
    """Markers: a re-run batch sends nothing the target acknowledged."""
    sink, _ = sink_for(url)
    guard = ForwardGuard(sync_redis, sink, pending_ttl_s=600, delivered_ttl_s=600)
    events = [event_factory() for _ in range(4)]
    assert await asyncio.to_thread(guard.write, events) == WriteResult(4, 0)
    assert await asyncio.to_thread(guard.write, [*events, events[0]]) == WriteResult(0, 5)
    assert len(target.requests) == 1


async def test_a_batch_in_flight_is_sent_again_as_it_was(url, target, event_factory, sync_redis):
    """A batch that timed out goes again with the same key and events, even when the retry
    brings other events (riders changed), so the target can drop the repeat."""
    target.script = ["hang"]
    target.hang_s = 1.5
    sink, _ = sink_for(url, timeout_s=0.3, attempts=1, max_events=4)
    guard = ForwardGuard(sync_redis, sink, pending_ttl_s=600, delivered_ttl_s=600)
    first = [event_factory() for _ in range(4)]
    with pytest.raises(SinkUnavailableError):
        await asyncio.to_thread(guard.write, first)
    later = event_factory()
    result = await asyncio.to_thread(guard.write, [first[1], first[2], later])
    assert result == WriteResult(new=3, duplicate=0)
    keys = [r.key for r in target.requests]
    assert keys[0] == keys[1] == batch_key(first)
    assert target.requests[1].event_ids == target.requests[0].event_ids
    assert target.requests[2].event_ids == [("acme", later.event_id)]
    # The rest of the first batch went with it: acknowledged, not sent a third time; new
    # for the job that carries them (counted once), duplicates after that.
    assert await asyncio.to_thread(guard.write, [first[0], first[3]]) == WriteResult(2, 0)
    assert await asyncio.to_thread(guard.write, [first[0], first[3]]) == WriteResult(0, 2)
    assert len(target.requests) == 3
    assert sorted(target.deduped()) == sorted(("acme", e.event_id) for e in [*first, later])


def test_flaky_target_gets_every_event_once_by_key(target, sync_redis, settings):
    """Through a real worker: the target fails, throttles with Retry-After, hangs (storing
    the batch) and recovers; every event arrives at least once, and once deduped by key,
    exactly once; nothing is dead-lettered and the counters add up."""
    target.script = [500, 503, 429, "hang", 502]
    target.hang_s = 1.0
    ids = [f"e{n}" for n in range(120)]
    for job in range(6):
        queue_job(sync_redis, settings, f"job{job}", native(ids[job * 20 : job * 20 + 20]))
    queue_job(sync_redis, settings, "resend", native(ids[:10]))  # a producer resending
    with serving(target) as url:
        sink = HttpSink(url, timeout_s=0.3, attempts=2, max_wait_s=0.05, max_events=25)
        rounds = drain(sync_redis, settings, quick(BatchProcessor(sink, sync_redis)))

    wanted = sorted(("acme", i) for i in ids)
    received = target.every_received()
    assert set(received) == set(wanted), "an event never arrived"
    assert len(received) > len(wanted), "the hang should have made the target see a repeat"
    assert sorted(target.deduped()) == wanted, "deduped by Idempotency-Key: exactly once"
    assert sync_redis.zcard("eg:dlq") == 0
    figures = counters(sync_redis)
    assert figures["persisted"] == len(ids)
    assert figures["persisted"] + figures["duplicate"] == figures["accepted"] == 130
    print(  # noqa: T201 - the figures the report quotes (pytest -s)
        f"\n[forward] sent {len(wanted)} events (+10 resent), target received "
        f"{len(received)} in {len(target.requests)} requests, kept {len(target.deduped())} "
        f"after key dedupe; rounds {rounds}; counters {figures}"
    )


async def test_linger_option_reaches_the_worker(url):
    sink = open_sink(url + "#linger_ms=150")
    assert isinstance(sink, HttpSink)
    assert sink.linger_s == pytest.approx(0.15)


def test_forward_body_is_plain_json(event_factory):
    """The body is JSON any receiver can read: nulls stay null, nothing msgpack-only."""
    events = [event_factory(value=None, currency=None)]
    body = json.loads(
        msgspec.json.encode(ForwardBody(batch_key(events), [event_record(e) for e in events]))
    )
    assert body["events"][0]["value"] is None
    assert body["events"][0]["currency"] is None
