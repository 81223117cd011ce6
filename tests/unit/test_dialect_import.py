"""The import dialect, `POST /api/v1/events` (seed 003): codes, limits, dedupe, and the sink."""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.dialects import import_
from ingest.problems import GatewayError
from shared import accounts
from shared.definitions import Definition, PropertySpec, put_definition
from shared.formats import normalise
from tests.strategies import BODIES, FUZZ, JSON_VALUES, PAST_DATETIMES, mostly
from tests.support import queued_batches, sink_rows

SEEDS = Path(__file__).parent / "fixtures" / "seeds"
SEED_REQUEST = (SEEDS / "003_import_request.json").read_bytes()
SEED_OK = json.loads((SEEDS / "003_import_ok_response.json").read_text())
SEED_TOO_MANY = json.loads((SEEDS / "003_import_too_many_events_response.json").read_text())

URL = "/api/v1/events?service_id=acme"
LOGIN = {
    "event_log_id": "b0c9cf18-f3c0-4879-bb2e-92c65858dabc",
    "event_name": "df_login",
    "event_datetime": "2024-06-24T06:01:48.501Z",
}
COMMON = {"identity": {"external_id": "u-1"}}


def request_with(events: list[dict], common: dict | None = None) -> dict:  # type: ignore[type-arg]
    return {"common": COMMON if common is None else common, "events": events}


def logins(count: int) -> list[dict]:  # type: ignore[type-arg]
    return [{**LOGIN, "event_log_id": str(uuid.uuid4())} for _ in range(count)]


async def post(client, key, body, url=URL, **headers):  # type: ignore[no-untyped-def]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"access_token": key, "Content-Type": "application/json", **headers}
    return await client.post(url, data=data, headers=headers)


async def reply_of(response) -> dict:  # type: ignore[no-untyped-def, type-arg]
    """The vendor's envelope, checking its shape: these four keys, in this order."""
    assert response.content_type == "application/json"
    assert response.headers["X-Request-Id"]
    reply = await response.json()
    assert list(reply) == ["status", "code", "message", "data"]
    return reply


async def failure(response, status: int, code: str, message: str):  # type: ignore[no-untyped-def]
    """Assert a failure answer; return its `data`."""
    assert response.status == status, await response.text()
    reply = await reply_of(response)
    assert (reply["status"], reply["code"], reply["message"]) == (False, code, message)
    return reply["data"]


# The seed's example, end to end.


async def test_seed_request_answers_exactly_the_seeds_ok(gateway, key, fake_redis):
    client = await gateway()
    response = await post(client, key, SEED_REQUEST)
    assert response.status == 200
    assert await reply_of(response) == SEED_OK
    [batch] = await queued_batches(fake_redis)
    [part] = batch.parts
    assert (part.account, part.dialect, part.count, part.body) == (
        "acme",
        "import",
        2,
        SEED_REQUEST,
    )
    assert part.ids == {}  # event_log_id is the id


async def test_seed_request_lands_in_the_sink_as_canonical_events(
    gateway, key, run_worker, sink_path
):
    client = await gateway()
    assert (await post(client, key, SEED_REQUEST)).status == 200
    run_worker()
    purchase, login = sink_rows(sink_path)  # by event_id
    identity = {"external_id": "dfn-user-123", "email": "dfn@gmail.com"}
    assert login["event_id"] == "b0c9cf18-f3c0-4879-bb2e-92c65858dabc"
    assert login["name"] == "df_login"
    assert login["source"] == "import"
    assert login["occurred_at"] == "2024-06-24T06:01:48.501000+00:00"
    assert login["identity"] == identity
    assert (login["properties"], login["items"], login["value"]) == ({}, [], None)
    assert purchase["event_id"] == "464bc021-9c56-481e-8ee8-3bf06de7c418"
    assert purchase["name"] == "df_purchase"
    assert purchase["occurred_at"] == "2024-06-24T06:42:25.394000+00:00"
    assert purchase["identity"] == identity
    assert purchase["properties"] == {
        "df_order_id": "dwtfmoe",
        "df_delivery_charge": 1000,
        "df_payment_method": "card",
        "df_total_purchase_amount": 4000,
    }
    assert purchase["items"] == [
        {"df_item_id": "1", "df_item_name": "item1", "df_price": 3000, "df_quantity": 1,
         "df_discount": 0}
    ]  # fmt: skip
    assert (purchase["value"], purchase["currency"]) == (4000.0, None)


async def test_resending_the_same_event_log_ids_stores_nothing_twice(
    gateway, key, run_worker, sink_path, fake_redis
):
    client = await gateway()
    for _ in range(2):
        assert (await post(client, key, SEED_REQUEST)).status == 200
    run_worker()
    assert len(sink_rows(sink_path)) == 2
    counts = await fake_redis.hgetall("eg:count:{acme}")
    assert (counts[b"persisted"], counts[b"duplicate"]) == (b"2", b"2")


async def test_an_uppercase_event_log_id_is_the_same_event(gateway, key, run_worker, sink_path):
    """UUIDs are stored in their canonical form, so the case of a resend does not matter."""
    client = await gateway()
    upper = {**LOGIN, "event_log_id": LOGIN["event_log_id"].upper()}
    for event in (LOGIN, upper):
        assert (await post(client, key, request_with([event]))).status == 200
    run_worker()
    assert [row["event_id"] for row in sink_rows(sink_path)] == [LOGIN["event_log_id"]]


async def test_phone_kakao_and_line_ids_become_the_canonical_identity(
    gateway, key, run_worker, sink_path
):
    client = await gateway()
    common = {"identity": {"phone_no": "821012345678", "kakao_user_id": "k1", "line_user_id": ""}}
    assert (await post(client, key, request_with([LOGIN], common))).status == 200
    run_worker()
    [row] = sink_rows(sink_path)
    assert row["identity"] == {"phone": "821012345678", "kakao_user_id": "k1"}


async def test_trailing_slash_is_served_without_redirect(gateway, key):
    client = await gateway()
    response = await client.post(
        "/api/v1/events/?service_id=acme",
        data=SEED_REQUEST,
        headers={"access_token": key},
        allow_redirects=False,
    )
    assert response.status == 200


@pytest.mark.parametrize(
    "when",
    ["2024-06-24T06:01:48", "2024-06-24T06:01:48.123456789Z", "2024-06-24T15:01:48+09:00"],
)
async def test_event_datetime_without_offset_is_utc_and_takes_9_digits(
    gateway, key, run_worker, sink_path, when
):
    client = await gateway()
    assert (
        await post(client, key, request_with([{**LOGIN, "event_datetime": when}]))
    ).status == 200
    run_worker()
    assert sink_rows(sink_path)[0]["occurred_at"].startswith("2024-06-24T06:01:48")


# Limits, at their edges: both answer the seed's exact 40402.


async def test_100_events_are_accepted_and_101_get_the_seeds_40402(gateway, key, fake_redis):
    client = await gateway()
    assert (await post(client, key, request_with(logins(100)))).status == 200
    response = await post(client, key, request_with(logins(101)))
    assert response.status == 400
    assert await reply_of(response) == SEED_TOO_MANY
    [batch] = await queued_batches(fake_redis)
    assert batch.parts[0].count == 100


async def test_101_events_are_too_many_even_when_some_are_invalid(gateway, key, fake_redis):
    client = await gateway()
    events = [*logins(100), {"event_name": "df_login"}]
    response = await post(client, key, request_with(events))
    assert await reply_of(response) == SEED_TOO_MANY
    assert await queued_batches(fake_redis) == []


async def test_100_items_are_accepted_and_101_get_the_seeds_40402(gateway, key, fake_redis):
    client = await gateway()
    items = [{"df_item_id": str(i), "df_quantity": 1} for i in range(101)]
    [event] = logins(1)
    ok = await post(client, key, request_with([{**event, "event_items": items[:100]}]))
    assert ok.status == 200
    response = await post(client, key, request_with([*logins(2), {**event, "event_items": items}]))
    assert response.status == 400
    assert await reply_of(response) == SEED_TOO_MANY
    assert len(await queued_batches(fake_redis)) == 1


async def test_body_over_the_size_limit_is_41300(gateway, key, fake_redis):
    client = await gateway(max_body_bytes=500)
    data = await failure(await post(client, key, SEED_REQUEST), 413, "41300", "PAYLOAD_TOO_LARGE")
    assert "500 bytes" in data
    assert await queued_batches(fake_redis) == []


# Every documented code, provoked: status, code, message, data.


async def test_malformed_json_is_40000_with_line_and_column(gateway, key, fake_redis):
    client = await gateway()
    body = SEED_REQUEST.replace(b'"df_login",', b'"df_login"', 1)
    data = await failure(await post(client, key, body), 400, "40000", "BAD_REQUEST")
    assert "line 12, column 7" in data
    assert "expected ','" in data
    assert await queued_batches(fake_redis) == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty body"),
        (b"\xff\xfe", "invalid JSON"),
        (b'{"common": ', "ends early"),
        (b'{"common": {}, "events": [{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}]}", "too deeply"),
        (b'{"common": [], "events": Infinity}', "line 1, column 26"),
    ],
)
async def test_bodies_that_are_not_json_are_40000(gateway, key, fake_redis, body, message):
    client = await gateway()
    data = await failure(await post(client, key, body), 400, "40000", "BAD_REQUEST")
    assert message in data
    assert await queued_batches(fake_redis) == []


async def test_broken_gzip_is_40000_and_other_encodings_41500(gateway, key, fake_redis):
    client = await gateway()
    gzipped = await post(client, key, gzip.compress(SEED_REQUEST), **{"Content-Encoding": "gzip"})
    assert gzipped.status == 200
    broken = await post(client, key, b"not gzip", **{"Content-Encoding": "gzip"})
    await failure(broken, 400, "40000", "BAD_REQUEST")
    brotli = await post(client, key, SEED_REQUEST, **{"Content-Encoding": "br"})
    await failure(brotli, 415, "41500", "UNSUPPORTED_MEDIA_TYPE")
    assert len(await queued_batches(fake_redis)) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], ""),  # not an object
        ({"common": COMMON}, "events"),
        ({"common": COMMON, "events": {}}, "events"),
        (request_with([]), "events"),
        (request_with([{**LOGIN, "event_datetime": "yesterday"}]), "event_datetime"),
        (
            request_with([{k: v for k, v in LOGIN.items() if k != "event_datetime"}]),
            "event_datetime",
        ),
        (request_with([{**LOGIN, "event_datetime": "2999-01-01T00:00:00Z"}]), "event_datetime"),
        (request_with([{**LOGIN, "event_name": 7}]), "event_name"),
        (request_with([{**LOGIN, "event_name": ""}]), "event_name"),
        (request_with([{**LOGIN, "event_properties": "card"}]), "event_properties"),
        (request_with([{**LOGIN, "event_items": [1]}]), "event_items.0"),
        (request_with([LOGIN], {"identity": {"email": 5}}), "common.identity.email"),
    ],
)
async def test_wrong_shapes_and_types_are_40001(gateway, key, fake_redis, body, field):
    client = await gateway()
    data = await failure(await post(client, key, body), 400, "40001", "VALIDATION_FAILURE")
    if isinstance(data, list):  # an event's problem: listed with its index and field
        [problem] = data
        assert (problem["index"], problem["code"], problem["field"]) == (0, "40001", field)
    else:
        assert field in data
    assert await queued_batches(fake_redis) == []


@pytest.mark.parametrize(
    "common",
    [
        {"identity": {}},
        {"identity": {"external_id": "", "email": None, "device_id": "d-1"}},  # none of its five
        {"identity": None},
        {},
        None,
    ],
)
async def test_no_identifier_is_40002(gateway, key, fake_redis, common):
    client = await gateway()
    body = request_with([LOGIN], common) if common is not None else {"events": [LOGIN]}
    data = await failure(await post(client, key, body), 400, "40002", "MISSING_IDENTITY")
    assert "identity" in data
    assert await queued_batches(fake_redis) == []


async def test_null_common_is_40002(gateway, key, fake_redis):
    client = await gateway()
    body = {"common": None, "events": [LOGIN]}
    await failure(await post(client, key, body), 400, "40002", "MISSING_IDENTITY")


@pytest.mark.parametrize("log_id", ["not-a-uuid", "b0c9cf18-f3c0-4879-bb2e", 42, None])
async def test_an_event_log_id_that_is_no_uuid_is_40003(gateway, key, fake_redis, log_id):
    client = await gateway()
    event = {**LOGIN, "event_log_id": log_id}
    if log_id is None:
        del event["event_log_id"]
    body = request_with([*logins(1), event])
    [problem] = await failure(await post(client, key, body), 400, "40003", "INVALID_EVENT_LOG_ID")
    assert (problem["index"], problem["code"], problem["field"]) == (1, "40003", "event_log_id")
    assert await queued_batches(fake_redis) == []


async def test_an_unregistered_event_is_40004_until_the_account_registers_it(
    gateway, key, fake_redis
):
    """The vendor takes registered events only, whatever the account's own choice."""
    client = await gateway()
    body = request_with([{**LOGIN, "event_name": "app_opened"}])
    [problem] = await failure(await post(client, key, body), 400, "40004", "UNREGISTERED_EVENT")
    assert (problem["field"], problem["code"]) == ("event_name", "40004")
    assert "app_opened" in problem["message"]
    assert await queued_batches(fake_redis) == []
    await put_definition(fake_redis, "acme", Definition(name="app_opened"))
    client = await gateway()  # a fresh front door: no cached definitions
    assert (await post(client, key, body)).status == 200


@pytest.mark.parametrize(
    ("properties", "field"),
    [
        ({"df_total_purchase_amount": "a lot"}, "event_properties.df_total_purchase_amount"),
        ({"df_order_id": ["o-1"]}, "event_properties.df_order_id"),
        ({"df_delivery_charge": {"amount": 1}}, "event_properties.df_delivery_charge"),
    ],
)
async def test_a_property_of_the_wrong_type_is_40005(gateway, key, fake_redis, properties, field):
    client = await gateway()
    body = request_with([{**LOGIN, "event_name": "df_purchase", "event_properties": properties}])
    [problem] = await failure(await post(client, key, body), 400, "40005", "INVALID_PROPERTY_TYPE")
    assert (problem["field"], problem["code"]) == (field, "40005")
    assert await queued_batches(fake_redis) == []


async def test_a_missing_required_property_of_the_accounts_definition_is_40005(
    gateway, key, fake_redis
):
    await put_definition(
        fake_redis,
        "acme",
        Definition(name="coupon_used", properties={"code": PropertySpec("string", required=True)}),
    )
    client = await gateway()
    body = request_with([{**LOGIN, "event_name": "coupon_used", "event_properties": None}])
    [problem] = await failure(await post(client, key, body), 400, "40005", "INVALID_PROPERTY_TYPE")
    assert problem["field"] == "event_properties.code"
    ok = request_with([{**LOGIN, "event_name": "coupon_used", "event_properties": {"code": "X"}}])
    assert (await post(client, key, ok)).status == 200


async def test_every_bad_event_is_listed_and_the_first_one_names_the_code(gateway, key, fake_redis):
    client = await gateway()
    events = [
        *logins(1),
        {**LOGIN, "event_name": "unknown_event"},  # 40004
        {**LOGIN, "event_log_id": "nope"},  # 40003
        {**LOGIN, "event_name": "df_refund", "event_properties": {"df_total_refund_amount": []}},
    ]
    data = await failure(
        await post(client, key, request_with(events)), 400, "40004", "UNREGISTERED_EVENT"
    )
    assert [(p["index"], p["code"]) for p in data] == [(1, "40004"), (2, "40003"), (3, "40005")]
    assert await queued_batches(fake_redis) == []


async def test_service_id_missing_is_40101_400_and_another_accounts_is_40101_403(
    gateway, key, fake_redis
):
    await accounts.create_account(fake_redis, "other")
    client = await gateway()
    missing = await post(client, key, SEED_REQUEST, url="/api/v1/events")
    assert "service_id" in await failure(missing, 400, "40101", "INVALID_SERVICE_ID")
    other = await post(client, key, SEED_REQUEST, url="/api/v1/events?service_id=other")
    await failure(other, 403, "40101", "INVALID_SERVICE_ID")
    assert await queued_batches(fake_redis) == []


@pytest.mark.parametrize(
    "token",
    [None, "", "Bearer x", "nonsense", "eg_sk_000000000000.AAAAAAAAAAAAAAAAAAAAAAAA"],
)
async def test_missing_or_bad_token_is_40201(gateway, fake_redis, token):
    client = await gateway()
    headers = {} if token is None else {"access_token": token}
    response = await client.post(URL, data=SEED_REQUEST, headers=headers)
    await failure(response, 401, "40201", "INVALID_TOKEN")
    assert await queued_batches(fake_redis) == []


async def test_a_revoked_token_is_40201(gateway, key, fake_redis):
    await accounts.revoke_key(fake_redis, key)
    client = await gateway()
    await failure(await post(client, key, SEED_REQUEST), 401, "40201", "INVALID_TOKEN")


async def test_a_public_key_is_40201_403(gateway, key, fake_redis):
    """A browser-safe key cannot use this server-to-server API."""
    public = await accounts.create_key(fake_redis, "acme", "public")
    client = await gateway()
    data = await failure(await post(client, public, SEED_REQUEST), 403, "40201", "INVALID_TOKEN")
    assert "public" in data
    assert await queued_batches(fake_redis) == []


def test_a_rate_limit_answer_is_40401():
    """No request rate limit is enforced yet; when one answers 429, it reads as the vendor's."""
    error = GatewayError("slow down", headers={"Retry-After": "1"})
    error.status, error.code = 429, "rate_limited"
    response = import_.render_error(error, "r-1")
    assert response.status == 429
    assert json.loads(response.body) == {  # type: ignore[arg-type]
        "status": False,
        "code": "40401",
        "message": "TOO_MANY_REQUEST",
        "data": "slow down",
    }


async def test_other_methods_are_40500(gateway):
    client = await gateway()
    for path in ("/api/v1/events", "/api/v1/events/"):
        response = await client.get(path)
        await failure(response, 405, "40500", "METHOD_NOT_ALLOWED")
        assert response.headers["Allow"] == "POST"


async def test_a_crash_is_50000_without_a_stack_trace(gateway, key, fake_redis, monkeypatch):
    def crash(*_args: object) -> int:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(import_, "validate", crash)
    client = await gateway()
    response = await post(client, key, SEED_REQUEST)
    data = await failure(response, 500, "50000", "INTERNAL_SERVER_ERROR")
    assert "secret" not in data
    assert await queued_batches(fake_redis) == []


async def test_redis_down_is_50300_with_retry_after(gateway, key, fake_server, fake_redis):
    client = await gateway()
    assert (await post(client, key, SEED_REQUEST)).status == 200  # key and account cached
    fake_server.connected = False
    response = await post(client, key, SEED_REQUEST)
    await failure(response, 503, "50300", "SERVICE_UNAVAILABLE")
    assert response.headers["Retry-After"] == "1"
    fake_server.connected = True
    assert len(await queued_batches(fake_redis)) == 1


async def test_the_connection_stays_usable_after_a_4xx(gateway, key):
    client = await gateway()
    assert (await post(client, key, request_with(logins(101)))).status == 400
    assert (await post(client, key, SEED_REQUEST)).status == 200


# Arbitrary input never breaks the front door.

EVENT_LIKE = st.fixed_dictionaries(
    {
        "event_log_id": mostly(st.uuids().map(str), JSON_VALUES),
        "event_name": mostly(st.sampled_from(["df_login", "df_purchase", "custom"]), JSON_VALUES),
        "event_datetime": mostly(PAST_DATETIMES, JSON_VALUES),
    },
    optional={
        "event_properties": st.none()
        | st.dictionaries(
            st.sampled_from(["df_order_id", "df_total_purchase_amount", "x"]), JSON_VALUES
        ),
        "event_items": st.none() | st.lists(st.dictionaries(st.text(), JSON_VALUES), max_size=3),
    },
)
IDENTITY_LIKE = st.dictionaries(
    st.sampled_from(["external_id", "email", "phone_no", "x"]), mostly(st.text(), JSON_VALUES)
)
REQUEST_LIKE = st.fixed_dictionaries(
    {
        "common": mostly(st.fixed_dictionaries({"identity": IDENTITY_LIKE}), JSON_VALUES),
        "events": mostly(st.lists(EVENT_LIKE, min_size=1, max_size=4), JSON_VALUES),
    },
)


@FUZZ
@given(body=BODIES)
async def test_arbitrary_bodies_never_give_a_5xx(gateway, key, fake_redis, body):
    await check_never_5xx(gateway, key, fake_redis, body)


@FUZZ
@given(request=REQUEST_LIKE)
async def test_arbitrary_requests_never_give_a_5xx(gateway, key, fake_redis, request):
    await check_never_5xx(gateway, key, fake_redis, json.dumps(request).encode())


async def check_never_5xx(gateway, key, fake_redis, body):  # type: ignore[no-untyped-def]
    """A failure with nothing queued, or 20000 with every event queued and readable."""
    client = await gateway()
    before = await queued_batches(fake_redis)
    response = await post(client, key, body)
    reply = await reply_of(response)
    assert response.status in (200, 400), reply
    after = await queued_batches(fake_redis)
    if reply["status"]:
        assert reply == SEED_OK
        [part] = after[-1].parts
        assert len(after) == len(before) + 1
        assert len(normalise(part)) == part.count
    else:
        assert after == before
    await client.close()
