"""The catalog dialect, `POST /events` (seeds 000/001): answers, limits, errors, and the sink."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.dialects import catalog
from shared import accounts, jobs
from shared.definitions import Definition, PropertySpec, put_definition
from shared.formats import normalise
from tests.strategies import BODIES, FUZZ, JSON_VALUES, PAST_DATETIMES, mostly
from tests.support import queued_batches, sink_rows

SEEDS = Path(__file__).parent / "fixtures" / "seeds"
SEED_EVENT = (SEEDS / "000_catalog_event.json").read_bytes()
SEED_BATCH = (SEEDS / "000_catalog_batch.json").read_bytes()
SEED_BATCH_ES = (SEEDS / "001_catalog_batch_es.txt").read_bytes()  # not valid JSON, on purpose

SALE = {"type": "EventSale", "customerCode": "C1", "productCode": "P1", "quantity": 1}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(client, key, body, **headers):  # type: ignore[no-untyped-def]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post("/events", data=data, headers={**auth(key), **headers})


async def error_of(response) -> dict:  # type: ignore[no-untyped-def, type-arg]
    """The error object of a catalog error answer, checking its shape on the way."""
    assert response.content_type == "application/json"
    reply = await response.json()
    assert list(reply) == ["error"]
    assert reply["error"]["requestId"]
    return reply["error"]


# The seeds' examples, end to end.


async def test_seed_single_event_is_accepted(gateway, key, fake_redis):
    """Seed 000's first example: 202 `{accepted, requestId}`, the body queued as sent."""
    client = await gateway()
    response = await post(client, key, SEED_EVENT)
    assert response.status == 202
    reply = await response.json()
    assert reply == {"accepted": 1, "requestId": reply["requestId"]}
    [batch] = await queued_batches(fake_redis)
    [part] = batch.parts
    assert (part.account, part.dialect, part.body, part.count) == ("acme", "catalog", SEED_EVENT, 1)
    assert list(part.ids) == [0]  # the vendor has no ids: one is minted per event


async def test_seed_batch_lands_in_the_sink_as_canonical_events(
    gateway, key, run_worker, sink_path
):
    """Seed 000's batch: type -> name, customerCode -> identity, the rest -> properties."""
    client = await gateway()
    response = await post(client, key, SEED_BATCH)
    assert response.status == 202
    assert (await response.json())["accepted"] == 2
    run_worker()
    sale, viewed = sink_rows(sink_path)  # ids are UUIDv7, minted in order
    assert sale["account"] == "acme"
    assert sale["source"] == "catalog"
    assert sale["name"] == "EventSale"
    assert sale["occurred_at"] == "2025-11-18T07:21:16.527000+00:00"
    assert sale["identity"] == {"customer_code": "D314K1432"}
    assert sale["properties"] == {"productCode": "N30122", "quantity": 2}
    assert sale["items"] == []
    assert sale["value"] is None
    assert viewed["name"] == "EventProductViewed"
    assert viewed["occurred_at"] == "2025-11-18T07:18:13.527000+00:00"
    assert viewed["properties"] == {"productCode": "N30122"}


async def test_spanish_seed_batch_gets_a_400_naming_line_and_column(gateway, key, fake_redis):
    """Seed 001's batch misses a comma between two objects: 400 points at it, not 500."""
    client = await gateway()
    response = await post(client, key, SEED_BATCH_ES)
    assert response.status == 400
    error = await error_of(response)
    assert error["code"] == "malformed_body"
    assert error["message"] == "invalid JSON at line 9, column 5: expected ',' or ']'"
    assert await queued_batches(fake_redis) == []


async def test_trailing_slash_is_served_without_redirect(gateway, key):
    client = await gateway()
    response = await client.post(
        "/events/", data=SEED_EVENT, headers=auth(key), allow_redirects=False
    )
    assert response.status == 202


async def test_purchase_items_in_cart_become_the_events_items(gateway, key, run_worker, sink_path):
    client = await gateway()
    purchase = {
        "type": "EventPurchase",
        "customerCode": "C1",
        "purchaseCode": "O-1",
        "totalPrice": 12.5,
        "itemsInCart": [{"productCode": "P1", "quantity": 2, "price": 6.25}],
    }
    assert (await post(client, key, purchase)).status == 202
    run_worker()
    [row] = sink_rows(sink_path)
    assert row["items"] == [{"productCode": "P1", "quantity": 2, "price": 6.25}]
    assert row["properties"] == {"purchaseCode": "O-1", "totalPrice": 12.5}


async def test_event_without_timestamp_occurs_when_received(gateway, key, run_worker, sink_path):
    client = await gateway()
    assert (await post(client, key, {"type": "EventLogin", "customerCode": "C1"})).status == 202
    run_worker()
    [row] = sink_rows(sink_path)
    assert row["occurred_at"] == row["received_at"]


@pytest.mark.parametrize(
    ("timestamp", "stored"),
    [
        ("2025-11-18T07:21:16", "2025-11-18T07:21:16.000000+00:00"),  # no offset: UTC
        ("2025-11-18T07:21:16.123456789Z", "2025-11-18T07:21:16.123457+00:00"),  # 9 digits
        ("2025-11-18T07:21:16.5+01:00", "2025-11-18T06:21:16.500000+00:00"),
        ("2025-11-18 07:21:16Z", "2025-11-18T07:21:16.000000+00:00"),
    ],
)
async def test_timestamps_are_read_as_iso_8601_in_utc(
    gateway, key, run_worker, sink_path, timestamp, stored
):
    client = await gateway()
    assert (await post(client, key, {**SALE, "timestamp": timestamp})).status == 202
    run_worker()
    assert sink_rows(sink_path)[0]["occurred_at"] == stored


async def test_resent_events_are_new_events(gateway, key, run_worker, sink_path):
    """No ids in this API, so nothing to deduplicate a resend by: two rows each (documented)."""
    client = await gateway()
    for _ in range(2):
        assert (await post(client, key, SEED_BATCH)).status == 202
    run_worker()
    assert len(sink_rows(sink_path)) == 4


async def test_a_retried_job_stores_its_events_once(
    gateway, key, run_worker, sink_path, sync_redis, settings
):
    """The ids minted at the front door travel in the job: run twice, it stores once."""
    client = await gateway()
    assert (await post(client, key, SEED_BATCH)).status == 202
    [job_id] = sync_redis.lrange(jobs.queue_key(settings.queue), 0, -1)
    data = sync_redis.hget(jobs.job_key(job_id.decode()), "data")
    run_worker()
    sync_redis.hset(
        jobs.job_key("again"), mapping=jobs.job_fields(jobs.job_template(settings), data, 2)
    )
    sync_redis.rpush(jobs.queue_key(settings.queue), "again")
    run_worker()
    assert len(sink_rows(sink_path)) == 2


# Limits, at their edges.


async def test_100_events_are_accepted_and_101_refused(gateway, key, fake_redis):
    client = await gateway()
    accepted = await post(client, key, [SALE] * 100)
    assert accepted.status == 202
    assert (await accepted.json())["accepted"] == 100
    refused = await post(client, key, [SALE] * 101)
    assert refused.status == 400
    error = await error_of(refused)
    assert error["code"] == "too_many_events"
    assert "at most 100" in error["message"]
    [batch] = await queued_batches(fake_redis)  # only the 100
    assert batch.parts[0].count == 100


async def test_body_over_the_size_limit_is_413(gateway, key, fake_redis):
    client = await gateway(max_body_bytes=1000)
    response = await post(client, key, [SALE] * 20)
    assert response.status == 413
    assert (await error_of(response))["code"] == "payload_too_large"
    assert await queued_batches(fake_redis) == []


# Every documented error, with its status and body.


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty body"),
        (b"  \n", "empty body"),
        (b"[]", "empty array"),
        (b'"EventSale"', "object or an array"),
        (b"\xff\xfe", "invalid JSON"),
        (b'{"type": "EventSale"', "line 1"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    ],
)
async def test_malformed_bodies_are_400_malformed_body(gateway, key, fake_redis, body, message):
    client = await gateway()
    response = await post(client, key, body)
    assert response.status == 400
    error = await error_of(response)
    assert error["code"] == "malformed_body"
    assert message in error["message"]
    assert "details" not in error
    assert await queued_batches(fake_redis) == []


async def test_every_invalid_event_is_listed_by_index_and_field(gateway, key, fake_redis):
    """All or nothing: one bad event refuses the batch; each bad one is named."""
    client = await gateway()
    events = [
        SALE,
        {"type": "EventSale", "customerCode": "C1", "productCode": "P1"},  # no quantity
        {**SALE, "quantity": "two"},
        {"customerCode": "C1"},  # no type
        "not an event",
        {**SALE, "timestamp": "yesterday"},
        {**SALE, "timestamp": "2999-01-01T00:00:00Z"},  # absurdly far ahead
        {"type": "Custom", "customerCode": 42},
    ]
    response = await post(client, key, events)
    assert response.status == 400
    error = await error_of(response)
    assert error["code"] == "invalid_events"
    assert error["message"].startswith("7 invalid event(s)")
    fields = {d["index"]: d["field"] for d in error["details"]}
    assert fields == {
        1: "quantity",
        2: "quantity",
        3: "type",
        4: "",
        5: "timestamp",
        6: "timestamp",
        7: "customerCode",
    }
    assert all(d["message"] for d in error["details"])
    assert await queued_batches(fake_redis) == []


async def test_unknown_types_follow_the_accounts_choice(gateway, key, fake_redis):
    """Accepted by default; refused, naming `type`, once the account takes registered only."""
    client = await gateway()
    assert (await post(client, key, {"type": "EventMystery"})).status == 202
    await accounts.update_account(fake_redis, "acme", accept_unregistered=False)
    client = await gateway()
    response = await post(client, key, {"type": "EventMystery"})
    assert response.status == 400
    [detail] = (await error_of(response))["details"]
    assert detail["field"] == "type"
    assert "not registered" in detail["message"]
    assert len(await queued_batches(fake_redis)) == 1
    # The built-in types stay registered.
    assert (await post(client, key, SALE)).status == 202


async def test_the_accounts_definition_wins_over_the_built_in_one(gateway, key, fake_redis):
    await put_definition(
        fake_redis,
        "acme",
        Definition(name="EventSale", properties={"store": PropertySpec("string", required=True)}),
    )
    client = await gateway()
    refused = await post(client, key, SALE)
    assert refused.status == 400
    assert (await error_of(refused))["details"][0]["field"] == "store"
    accepted = await post(client, key, {"type": "EventSale", "store": "Madrid"})
    assert accepted.status == 202


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
    response = await client.post("/events", data=SEED_EVENT, headers=headers)
    assert response.status == 401
    assert (await error_of(response))["code"] == "unauthorized"
    assert await queued_batches(fake_redis) == []


async def test_a_public_key_may_send_events(gateway, key, fake_redis):
    public = await accounts.create_key(fake_redis, "acme", "public")
    client = await gateway()
    assert (await post(client, public, SEED_EVENT)).status == 202


async def test_gzip_is_accepted_and_other_encodings_are_415(gateway, key, fake_redis):
    client = await gateway()
    gzipped = await post(client, key, gzip.compress(SEED_BATCH), **{"Content-Encoding": "gzip"})
    assert gzipped.status == 202
    brotli = await post(client, key, SEED_BATCH, **{"Content-Encoding": "br"})
    assert brotli.status == 415
    assert (await error_of(brotli))["code"] == "unsupported_encoding"
    assert len(await queued_batches(fake_redis)) == 1


async def test_other_methods_are_405_in_this_dialects_shape(gateway):
    client = await gateway()
    for path in ("/events", "/events/"):
        response = await client.get(path)
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert (await error_of(response))["code"] == "method_not_allowed"


async def test_a_crash_is_500_without_a_stack_trace(gateway, key, fake_redis, monkeypatch):
    def crash(*_args: object) -> int:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(catalog, "validate", crash)
    client = await gateway()
    response = await post(client, key, SEED_EVENT)
    assert response.status == 500
    error = await error_of(response)
    assert error["code"] == "internal_server_error"
    assert "secret" not in error["message"]
    assert await queued_batches(fake_redis) == []


async def test_redis_down_is_503_with_retry_after_and_nothing_queued(
    gateway, key, fake_server, fake_redis
):
    """The enqueuer cannot reach Redis: 503 in this dialect's shape, and the connection closed."""
    client = await gateway()
    assert (await post(client, key, SEED_EVENT)).status == 202  # key and account now cached
    fake_server.connected = False
    response = await post(client, key, SEED_EVENT)
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert (await error_of(response))["code"] == "service_unavailable"
    fake_server.connected = True
    assert len(await queued_batches(fake_redis)) == 1


async def test_the_connection_stays_usable_after_a_4xx(gateway, key):
    client = await gateway()
    assert (await post(client, key, SEED_BATCH_ES)).status == 400
    assert (await post(client, key, SEED_EVENT)).status == 202


# Arbitrary input never breaks the front door.

EVENT_LIKE = st.fixed_dictionaries(
    {
        "type": mostly(st.sampled_from(["EventSale", "EventSearch", "Other"]), JSON_VALUES),
        "customerCode": mostly(st.text(min_size=1), JSON_VALUES),
        "productCode": mostly(st.text(), JSON_VALUES),
        "quantity": mostly(st.integers(), JSON_VALUES),
        "searchText": mostly(st.text(), JSON_VALUES),
    },
    optional={
        "timestamp": mostly(PAST_DATETIMES, JSON_VALUES),
        "itemsInCart": st.lists(st.dictionaries(st.text(), JSON_VALUES), max_size=3),
    },
)


@FUZZ
@given(body=BODIES)
async def test_arbitrary_bodies_never_give_a_5xx(gateway, key, fake_redis, body):
    await check_never_5xx(gateway, key, fake_redis, body)


@FUZZ
@given(events=st.lists(EVENT_LIKE, max_size=5) | EVENT_LIKE)
async def test_arbitrary_events_never_give_a_5xx(gateway, key, fake_redis, events):
    await check_never_5xx(gateway, key, fake_redis, json.dumps(events).encode())


async def check_never_5xx(gateway, key, fake_redis, body):  # type: ignore[no-untyped-def]
    """4xx with nothing queued, or 202 with exactly the accepted events queued and readable."""
    client = await gateway()
    before = await queued_batches(fake_redis)
    response = await post(client, key, body)
    assert response.status in (202, 400, 413), await response.text()
    after = await queued_batches(fake_redis)
    if response.status == 202:
        assert len(after) == len(before) + 1
        [part] = after[-1].parts
        assert part.count == (await response.json())["accepted"]
        assert len(normalise(part)) == part.count  # what is accepted, the worker can read
    else:
        assert after == before
        await error_of(response)
    await client.close()
