"""The native API, `POST /v1/events`, against fakeredis: what producers see and what is queued."""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest

from ingest.context import GATEWAY
from shared import accounts
from shared.definitions import Definition, PropertySpec, put_definition
from shared.formats.native import decode_body
from tests.support import queued_batches

EVENT = {"name": "page_view", "id": "e-1", "properties": {"path": "/", "extra": {"a": 1}}}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_one_event_is_queued_and_answered_202(gateway, key, fake_redis):
    """A single object is accepted; its body is queued as sent, with the account."""
    client = await gateway()
    body = json.dumps(EVENT).encode()
    response = await client.post("/v1/events", data=body, headers=auth(key))
    assert response.status == 202
    reply = await response.json()
    assert reply["accepted"] == 1
    assert reply["rejected"] == []
    [batch] = await queued_batches(fake_redis)
    [part] = batch.parts
    assert part.account == "acme"
    assert part.dialect == "native"
    assert part.body == body
    assert part.request_id == reply["request_id"]
    assert part.ids == {}  # the producer gave an id


async def test_events_without_id_get_a_uuid7_minted_at_the_front_door(gateway, key, fake_redis):
    """Ids are minted before queueing, so a retried job reuses them (no duplicates)."""
    client = await gateway()
    events = [{"name": "a"}, {"name": "b", "id": "mine"}, {"name": "c"}]
    response = await client.post("/v1/events", json=events, headers=auth(key))
    assert response.status == 202
    [batch] = await queued_batches(fake_redis)
    ids = batch.parts[0].ids
    assert sorted(ids) == [0, 2]
    assert all(len(v) == 36 and v[14] == "7" for v in ids.values())


async def test_invalid_json_names_line_and_column(gateway, key, fake_redis):
    """The Spanish seed's batch (a missing comma) gets a 400 pointing at the spot."""
    client = await gateway()
    body = b'[\n  {"name": "a"}\n  {"name": "b"}\n]'
    response = await client.post("/v1/events", data=body, headers=auth(key))
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    problem = await response.json()
    assert "line 3, column 3" in problem["detail"]
    assert "expected ','" in problem["detail"]
    assert await queued_batches(fake_redis) == []


async def test_every_invalid_event_is_listed_by_index_and_field(gateway, key, fake_redis):
    """Strict by default: one bad event refuses the batch, and each bad one is named."""
    client = await gateway()
    events = [{"name": "ok"}, {"name": 5}, {"name": "x", "value": "high"}, {"nam": "typo"}]
    response = await client.post("/v1/events", json=events, headers=auth(key))
    assert response.status == 422
    problem = await response.json()
    assert problem["status"] == 422
    listed = {e["index"]: e["errors"][0] for e in problem["errors"]}
    assert sorted(listed) == [1, 2, 3]
    assert listed[1]["field"] == "name"
    assert listed[2]["field"] == "value"
    assert "nam" in listed[3]["message"]
    assert await queued_batches(fake_redis) == []


async def test_strict_false_queues_the_valid_events_and_lists_the_others(gateway, key, fake_redis):
    client = await gateway()
    events = [{"name": "ok"}, {"name": 5}, {"name": "ok2", "id": "k"}]
    response = await client.post("/v1/events?strict=false", json=events, headers=auth(key))
    assert response.status == 202
    reply = await response.json()
    assert reply["accepted"] == 2
    assert [r["index"] for r in reply["rejected"]] == [1]
    [batch] = await queued_batches(fake_redis)
    assert batch.parts[0].skip == [1]
    assert batch.parts[0].count == 2


async def test_strict_false_with_nothing_valid_is_422(gateway, key, fake_redis):
    client = await gateway()
    response = await client.post("/v1/events?strict=false", json=[{"x": 1}], headers=auth(key))
    assert response.status == 422
    assert await queued_batches(fake_redis) == []


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b"", 400, "empty body"),
        (b"   ", 400, "empty body"),
        (b"[]", 400, "empty array"),
        (b'"just a string"', 400, "object"),
        (b"\xff\xfe{}", 400, "invalid JSON"),
        (b'[{"name": "a"}', 400, "line 1"),
        # A wrong type stops the fast path before the bad syntax or the depth is reached.
        (b'[{"name": 5}, Infinity]', 400, "line 1, column 15"),
        (b'[{"name": 5}, {"name": "b", "properties": {"x": ' + b"[" * 5000, 400, "too deeply"),
        (b"[" * 5000 + b"]" * 5000, 400, "too deeply"),
    ],
)
async def test_malformed_bodies_get_a_4xx_and_nothing_queued(
    gateway, key, fake_redis, body, status, detail
):
    client = await gateway()
    response = await client.post("/v1/events", data=body, headers=auth(key))
    assert response.status == status
    assert detail in (await response.json())["detail"]
    assert await queued_batches(fake_redis) == []


async def test_too_many_events(gateway, key, fake_redis):
    client = await gateway(max_events=3)
    response = await client.post("/v1/events", json=[{"name": "a"}] * 4, headers=auth(key))
    assert response.status == 422
    assert "at most 3" in (await response.json())["detail"]
    assert await queued_batches(fake_redis) == []


async def test_timestamp_far_in_the_future_is_refused(gateway, key, fake_redis):
    client = await gateway()
    events = [{"name": "a", "timestamp": "2999-01-01T00:00:00Z"}]
    response = await client.post("/v1/events", json=events, headers=auth(key))
    assert response.status == 422
    assert (await response.json())["errors"][0]["errors"][0]["field"] == "timestamp"


async def test_declared_body_over_the_limit_is_413_without_reading_it(gateway, key, fake_redis):
    client = await gateway(max_body_bytes=1000)
    body = json.dumps([{"name": "x" * 100}] * 20).encode()
    response = await client.post("/v1/events", data=body, headers=auth(key))
    assert response.status == 413
    assert response.headers["Connection"] == "close"
    assert await queued_batches(fake_redis) == []


async def test_chunked_body_over_the_limit_is_413(gateway, key, fake_redis):
    """A chunked upload declares no length; reading stops at the cap."""
    client = await gateway(max_body_bytes=1000)

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(100):
            yield b" " * 100

    response = await client.post("/v1/events", data=chunks(), headers=auth(key))
    assert response.status == 413
    assert await queued_batches(fake_redis) == []


async def test_gzip_body_is_accepted(gateway, key, fake_redis):
    client = await gateway()
    raw = json.dumps([EVENT, {"name": "b"}]).encode()
    headers = {**auth(key), "Content-Encoding": "gzip"}
    response = await client.post("/v1/events", data=gzip.compress(raw), headers=headers)
    assert response.status == 202
    [batch] = await queued_batches(fake_redis)
    assert batch.parts[0].body == raw  # queued decompressed


async def test_gzip_bomb_is_refused_in_bounded_memory(gateway, key, fake_redis):
    client = await gateway()
    bomb = gzip.compress(b"[" + b" " * (50 * 1024 * 1024) + b"]")  # 50 MiB of spaces, ~50 KiB
    headers = {**auth(key), "Content-Encoding": "gzip"}
    response = await client.post("/v1/events", data=bomb, headers=headers)
    assert response.status == 413
    assert "inflates" in (await response.json())["detail"]
    assert await queued_batches(fake_redis) == []


async def test_broken_gzip_is_400_and_unknown_encoding_415(gateway, key):
    client = await gateway()
    bad = await client.post(
        "/v1/events", data=b"not gzip", headers={**auth(key), "Content-Encoding": "gzip"}
    )
    assert bad.status == 400
    brotli = await client.post(
        "/v1/events", data=b"{}", headers={**auth(key), "Content-Encoding": "br"}
    )
    assert brotli.status == 415


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer",
        "Bearer nonsense",
        "Basic abc",
        "Bearer eg_sk_000000000000.AAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
async def test_missing_or_bad_key_is_401(gateway, fake_redis, header):
    client = await gateway()
    headers = {"Authorization": header} if header else {}
    response = await client.post("/v1/events", json=EVENT, headers=headers)
    assert response.status == 401
    assert await queued_batches(fake_redis) == []


async def test_right_key_id_wrong_secret_is_401(gateway, key, fake_redis):
    client = await gateway()
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    response = await client.post("/v1/events", json=EVENT, headers=auth(forged))
    assert response.status == 401


async def test_revoked_key_fails_within_the_cache_time(gateway, key, fake_redis):
    client = await gateway(key_cache_s=0.2)
    assert (await client.post("/v1/events", json=EVENT, headers=auth(key))).status == 202
    await accounts.revoke_key(fake_redis, key)
    await asyncio.sleep(0.3)
    assert (await client.post("/v1/events", json=EVENT, headers=auth(key))).status == 401


async def test_public_key_may_write_events(gateway, fake_redis, key):
    public = await accounts.create_key(fake_redis, "acme", "public")
    client = await gateway()
    assert (await client.post("/v1/events", json=EVENT, headers=auth(public))).status == 202


async def test_concurrent_requests_are_group_committed(gateway, key, fake_redis):
    """Many small requests in flight together cost fewer round trips than requests."""
    client = await gateway()
    responses = await asyncio.gather(
        *(client.post("/v1/events", json={"name": f"e{i}"}, headers=auth(key)) for i in range(50))
    )
    assert [r.status for r in responses] == [202] * 50
    batches = await queued_batches(fake_redis)
    parts = [p for b in batches for p in b.parts]
    assert len(parts) == 50
    assert len(batches) < 50
    assert client.app[GATEWAY].enqueuer.flushes < 50
    names = {decode_body(p.body)[0].name for p in parts}
    assert names == {f"e{i}" for i in range(50)}


async def test_accepted_events_are_counted_per_account(gateway, key, fake_redis):
    client = await gateway()
    await client.post("/v1/events", json=[{"name": "a"}, {"name": "b"}], headers=auth(key))
    assert await fake_redis.hget("eg:count:{acme}", "accepted") == b"2"


async def test_unknown_route_is_a_problem_not_a_stack_trace(gateway):
    client = await gateway()
    response = await client.get("/nope")
    assert response.status == 404
    assert response.content_type == "application/problem+json"


async def test_properties_are_checked_against_the_accounts_definition(gateway, key, fake_redis):
    """A registered event's properties must match its schema; each bad one is named."""
    await put_definition(
        fake_redis,
        "acme",
        Definition(
            name="sale",
            properties={
                "quantity": PropertySpec(type="integer", required=True),
                "sku": PropertySpec(type="string"),
            },
        ),
    )
    client = await gateway()
    events = [
        {"name": "sale", "properties": {"quantity": 2, "sku": "N1", "extra": True}},
        {"name": "sale", "properties": {"quantity": "two"}},
        {"name": "sale", "properties": {"sku": "N1"}},
        {"name": "unregistered"},
    ]
    response = await client.post("/v1/events", json=events, headers=auth(key))
    assert response.status == 422
    errors = {e["index"]: e["errors"][0] for e in (await response.json())["errors"]}
    assert sorted(errors) == [1, 2]
    assert errors[1]["field"] == "properties.quantity"
    assert "quantity" in errors[2]["message"]


async def test_an_account_can_refuse_unregistered_events(gateway, key, fake_redis):
    await accounts.update_account(fake_redis, "acme", accept_unregistered=False)
    client = await gateway()
    response = await client.post("/v1/events", json=[{"name": "mystery"}], headers=auth(key))
    assert response.status == 422
    assert (await response.json())["errors"][0]["errors"][0]["field"] == "name"
