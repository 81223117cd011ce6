"""The people dialect (seed 002): what its producers see, what is queued, what lands in the sink."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs
from yarl import URL

from ingest.app import make_app
from ingest.server import RUNNER_OPTIONS
from shared import accounts, jobs
from shared.definitions import Definition, PropertySpec, put_definition
from shared.persons import PEOPLE_TYPES, index_person
from tests.strategies import BODIES, FUZZ, JSON_VALUES
from tests.support import profile_rows, queued_batches, sink_rows

# The seed's request sample, verbatim.
SEED_BODY = {
    "properties": {
        "transactionId": "my-transaction-1",
        "fromPromoCampaign": True,
        "totalCost": 100,
        "itemsInCart": [
            {
                "itemId": 1,
                "price": 25,
                "quantity": 3,
                "inStockSince": "2023-11-17T15:47:50.4136517Z",
                "category": "clothes",
            },
            {
                "itemId": 2,
                "price": 25,
                "quantity": 1,
                "inStockSince": "2023-12-17T15:47:50.4138054Z",
                "category": "shoes",
            },
        ],
    }
}
ADD_TO_CART = Definition(
    name="addToCart",
    properties={
        "transactionId": PropertySpec(type="string", required=True),
        "fromPromoCampaign": PropertySpec(type="boolean"),
        "totalCost": PropertySpec(type="number", required=True),
        "itemsInCart": PropertySpec(
            type="array",
            items=PropertySpec(
                type="object",
                properties={
                    "itemId": PropertySpec(type="integer", required=True),
                    "price": PropertySpec(type="number"),
                    "quantity": PropertySpec(type="integer"),
                    "inStockSince": PropertySpec(type="datetime"),
                    "category": PropertySpec(type="string"),
                },
            ),
        ),
    },
)
OCCURRED_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z$")


def url(
    person: str, kind: str | None = "EMAIL", definition: str = "addToCart", *, slash: bool = False
) -> URL:
    """The route, with `person` already percent-encoded as a client would send it."""
    query = "" if kind is None else f"?identifierType={kind}"
    path = f"/peopleevents/2/persons/{person}/definitions/{definition}/events"
    return URL(f"{path}{'/' if slash else ''}{query}", encoded=True)


def app_auth(key: str) -> dict[str, str]:
    return {"Authorization": f"App {key}"}


@pytest.fixture
async def ping(fake_redis, key):
    """A definition with one optional property and none required."""
    definition = Definition(name="ping", properties={"n": PropertySpec(type="integer")})
    await put_definition(fake_redis, "acme", definition)


@pytest.fixture
async def people(fake_redis, key):
    """The account `acme` with the addToCart definition and a person known by several ids."""
    await put_definition(fake_redis, "acme", ADD_TO_CART)
    await index_person(
        fake_redis,
        "acme",
        "p-1",
        {"email": "Sarah.Mason@Example.com", "external_id": "ext+1", "phone": "+41 79 302 67 27"},
    )
    await index_person(fake_redis, "acme", "dept/42", {})
    return key


async def service_exception(response: aiohttp.ClientResponse) -> dict[str, object]:
    """The vendor's error body, checked for its shape."""
    assert response.content_type == "application/json"
    body = await response.json()
    assert list(body) == ["requestError"]
    assert list(body["requestError"]) == ["serviceException"]
    exception = body["requestError"]["serviceException"]
    assert {"messageId", "text"} <= set(exception) <= {"messageId", "text", "validationErrors"}
    return exception


async def test_seed_request_is_stored_with_the_id_it_answered(
    gateway, people, run_worker, sink_path
):
    """The seed's sample: 201 with the stored event, and the row the worker writes matches."""
    client = await gateway()
    response = await client.post(
        url("Sarah.Mason%40example.com"), json=SEED_BODY, headers=app_auth(people)
    )
    assert response.status == 201
    reply = await response.json()
    assert list(reply) == ["eventId", "definitionId", "occurredTime", "properties", "metadata"]
    assert reply["definitionId"] == "addToCart"
    assert reply["properties"] == SEED_BODY["properties"]
    assert reply["metadata"] == {"source": "API"}
    assert OCCURRED_TIME.match(reply["occurredTime"])

    run_worker()
    [row] = sink_rows(sink_path)
    assert row["event_id"] == reply["eventId"]
    assert row["account"] == "acme"
    assert row["name"] == "addToCart"
    assert row["source"] == "people"
    assert row["identity"] == {"email": "Sarah.Mason@example.com"}
    assert row["items"] == SEED_BODY["properties"]["itemsInCart"]
    assert row["properties"] == {
        "transactionId": "my-transaction-1",
        "fromPromoCampaign": True,
        "totalCost": 100,
    }
    stored = datetime.fromisoformat(row["occurred_at"])
    assert stored == datetime.fromisoformat(reply["occurredTime"][:-2] + "+00:00")
    assert row["received_at"] == row["occurred_at"]
    # The person's profile saw it: its email row, and its ID row.
    seen = {
        (p["identifier_type"], p["identifier"]): p["person_id"] for p in profile_rows(sink_path)
    }
    assert seen == {("EMAIL", "sarah.mason@example.com"): "p-1", ("ID", "p-1"): "p-1"}


@pytest.mark.parametrize("slash", [False, True])
@pytest.mark.parametrize("scheme", ["App", "Bearer", "app"])
async def test_key_schemes_and_trailing_slash(gateway, people, fake_redis, scheme, slash):
    """`App KEY` (the vendor's) and `Bearer KEY` both work, with or without a trailing slash."""
    client = await gateway()
    response = await client.post(
        url("p-1", "ID", slash=slash),
        json=SEED_BODY,
        headers={"Authorization": f"{scheme} {people}"},
    )
    assert response.status == 201
    [batch] = await queued_batches(fake_redis)
    [part] = batch.parts
    assert part.dialect == "people"
    assert part.count == 1
    assert part.ids == {0: (await response.json())["eventId"]}
    assert part.context == {"definitionId": "addToCart", "personId": "p-1", "identifierType": "ID"}


@pytest.mark.parametrize(
    ("person", "kind"),
    [
        ("ext%2B1", "EXTERNAL_ID"),  # %2B is +, not a space
        ("ext+1", "EXTERNAL_ID"),  # a raw + in a path is a +
        ("sarah.mason%40example.com", "EMAIL"),  # %40 is @; emails compare case-insensitively
        ("dept%2F42", "ID"),  # %2F is part of the id, not a path separator
        ("%2B41%20(79)%20302-67-27", "PHONE"),  # phones compare by their digits
        ("41793026727", "PHONE"),
        ("p%2D1", "ID"),  # any character may be percent-encoded
    ],
)
async def test_person_ids_are_percent_decoded(gateway, people, fake_redis, person, kind):
    client = await gateway()
    response = await client.post(url(person, kind), json=SEED_BODY, headers=app_auth(people))
    assert response.status == 201, await response.text()
    assert len(await queued_batches(fake_redis)) == 1


async def test_encoded_slash_id_is_stored_as_sent(gateway, people, run_worker, sink_path, ping):
    """A person id with a slash in it reaches the sink whole; null properties are no properties."""
    client = await gateway()
    response = await client.post(
        url("dept%2F42", "ID", "ping"), json={"properties": None}, headers=app_auth(people)
    )
    assert response.status == 201
    assert (await response.json())["properties"] is None
    run_worker()
    [row] = sink_rows(sink_path)
    assert row["identity"] == {"person_id": "dept/42"}
    assert row["properties"] == {}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "App"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "App nonsense"},
        {"Authorization": "App eg_sk_000000000000.AAAAAAAAAAAAAAAAAAAAAAAA"},
    ],
)
async def test_missing_or_bad_key_is_401(gateway, people, fake_redis, headers):
    client = await gateway()
    response = await client.post(url("p-1", "ID"), json=SEED_BODY, headers=headers)
    assert response.status == 401
    assert (await service_exception(response))["messageId"] == "UNAUTHORIZED"
    assert await queued_batches(fake_redis) == []


async def test_public_key_is_403(gateway, people, fake_redis):
    public = await accounts.create_key(fake_redis, "acme", "public")
    client = await gateway()
    response = await client.post(url("p-1", "ID"), json=SEED_BODY, headers=app_auth(public))
    assert response.status == 403
    exception = await service_exception(response)
    assert exception["messageId"] == "FORBIDDEN"
    assert "public key" in str(exception["text"])
    assert await queued_batches(fake_redis) == []


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        (url("nobody%40example.com"), "no person"),
        (url("p-1", "EXTERNAL_ID"), "no person"),  # p-1 is its ID, not its external id
        (url("p-1", "ID", "removeFromCart"), "no event definition 'removeFromCart'"),
        (url("p-1", "ID", "addtocart"), "no event definition"),  # definition ids are exact
    ],
)
async def test_unknown_person_or_definition_is_404(gateway, people, fake_redis, target, needle):
    client = await gateway()
    response = await client.post(target, json=SEED_BODY, headers=app_auth(people))
    assert response.status == 404
    exception = await service_exception(response)
    assert exception["messageId"] == "NOT_FOUND"
    assert needle in str(exception["text"])
    assert "nobody" not in str(exception["text"])  # identifiers are not echoed (nor logged)
    assert await queued_batches(fake_redis) == []


async def test_persons_of_another_account_are_not_found(gateway, people, fake_redis):
    """One account's key never reaches another's persons."""
    await accounts.create_account(fake_redis, "globex")
    other = await accounts.create_key(fake_redis, "globex", "private")
    await put_definition(fake_redis, "globex", ADD_TO_CART)
    client = await gateway()
    response = await client.post(url("p-1", "ID"), json=SEED_BODY, headers=app_auth(other))
    assert response.status == 404
    assert await queued_batches(fake_redis) == []


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        (url("p-1", None), "identifierType is required"),
        (url("p-1", ""), "is not one of ID, EXTERNAL_ID"),
        (url("p-1", "id"), "is not one of"),
        (url("p-1", "CUSTOMER_CODE"), "is not one of"),
    ],
)
async def test_identifier_type_is_required_and_checked(gateway, people, fake_redis, target, needle):
    client = await gateway()
    response = await client.post(target, json=SEED_BODY, headers=app_auth(people))
    assert response.status == 400
    exception = await service_exception(response)
    assert exception["messageId"] == "BAD_REQUEST"
    assert needle in str(exception["text"])
    assert await queued_batches(fake_redis) == []


@pytest.mark.parametrize("kind", PEOPLE_TYPES)
async def test_every_identifier_type_of_the_enum_is_accepted(gateway, people, fake_redis, kind):
    """The full enum; a person known under each type is found by it."""
    await index_person(fake_redis, "acme", f"who-{kind}", {kind.lower(): f"v-{kind}"})
    client = await gateway()
    person = f"who-{kind}" if kind == "ID" else f"v-{kind}"
    response = await client.post(url(person, kind), json=SEED_BODY, headers=app_auth(people))
    assert response.status == 201, await response.text()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "empty body"),
        (b"   ", "empty body"),
        (b'{"properties": {"totalCost": 1,}}', "line 1, column 32"),
        (b'{\n  "properties": {\n    "a": 1\n    "b": 2\n  }\n}', "line 4, column 5"),
        (b"\xff\xfe", "invalid JSON"),
        (b"[]", "expected {"),
        (b'{"properties": []}', "at properties"),
        (b'{"properties": "x"}', "at properties"),
        (b'{"propertes": {}}', "propertes"),
        (b'{"properties": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, "nested too deeply"),
    ],
)
async def test_malformed_bodies_are_400(gateway, people, fake_redis, body, needle):
    client = await gateway()
    response = await client.post(url("p-1", "ID"), data=body, headers=app_auth(people))
    assert response.status == 400
    exception = await service_exception(response)
    assert exception["messageId"] == "BAD_REQUEST"
    assert needle in str(exception["text"])
    assert await queued_batches(fake_redis) == []


async def test_each_bad_property_is_named(gateway, people, fake_redis):
    """Properties that do not match the definition: a 400 naming every one of them."""
    client = await gateway()
    body = {
        "properties": {
            "totalCost": "a hundred",
            "fromPromoCampaign": "yes",
            "itemsInCart": [{"itemId": 1}, {"itemId": "two", "inStockSince": "last week"}],
            "unlisted": "kept",
        }
    }
    response = await client.post(url("p-1", "ID"), json=body, headers=app_auth(people))
    assert response.status == 400
    exception = await service_exception(response)
    assert exception["messageId"] == "BAD_REQUEST"
    errors = exception["validationErrors"]
    assert isinstance(errors, dict)
    assert sorted(errors) == [
        "properties.fromPromoCampaign",
        "properties.itemsInCart.1.itemId",
        "properties.totalCost",
        "properties.transactionId",
    ]
    assert "missing required field `transactionId`" in errors["properties.transactionId"][0]
    assert "Expected `float`, got `str`" in errors["properties.totalCost"][0]
    for field in errors:
        assert field in str(exception["text"])
    assert await queued_batches(fake_redis) == []


async def test_null_or_absent_properties_match_a_definition_without_required_ones(
    gateway, people, fake_redis, ping
):
    client = await gateway()
    for body in (
        b"{}",
        b'{"properties": null}',
        b'{"properties": {}}',
        b'{"properties": {"n": 3}}',
    ):
        response = await client.post(url("p-1", "ID", "ping"), data=body, headers=app_auth(people))
        assert response.status == 201, body
    assert sum(len(b.parts) for b in await queued_batches(fake_redis)) == 4


async def test_body_over_the_limit_is_413(gateway, people, fake_redis):
    client = await gateway(max_body_bytes=1000)
    body = {"properties": {**SEED_BODY["properties"], "padding": "x" * 2000}}
    response = await client.post(url("p-1", "ID"), json=body, headers=app_auth(people))
    assert response.status == 413
    assert (await service_exception(response))["messageId"] == "PAYLOAD_TOO_LARGE"
    assert await queued_batches(fake_redis) == []


async def test_redis_down_is_503_in_the_vendors_shape(gateway, people, fake_server, fake_redis):
    """Once Redis is gone, the enqueuer's (and the caches') 503 speak the vendor's language."""
    client = await gateway(redis_timeout_s=0.5)
    assert (
        await client.post(url("p-1", "ID"), json=SEED_BODY, headers=app_auth(people))
    ).status == 201
    fake_server.connected = False
    response = await client.post(url("p-1", "ID"), json=SEED_BODY, headers=app_auth(people))
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert (await service_exception(response))["messageId"] == "SERVICE_UNAVAILABLE"
    fake_server.connected = True
    assert len(await queued_batches(fake_redis)) == 1


async def test_connection_stays_usable_after_a_4xx(aiohttp_client, settings, fake_redis, people):
    """Keep-alive: a 404 then a 201 on one connection."""
    created = []
    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(lambda *_: asyncio.sleep(0, created.append(1)))
    server = TestServer(make_app(settings, fake_redis))
    await server.start_server(**RUNNER_OPTIONS)
    client = await aiohttp_client(server, trace_configs=[trace])
    missing = await client.post(url("nobody", "ID"), json=SEED_BODY, headers=app_auth(people))
    assert missing.status == 404
    await missing.read()
    found = await client.post(url("p-1", "ID"), json=SEED_BODY, headers=app_auth(people))
    assert found.status == 201
    assert len(created) == 1


async def test_a_retried_job_stores_the_event_once(
    gateway, people, run_worker, sink_path, sync_redis, settings
):
    """The front door minted the id: the same envelope run twice is one row."""
    client = await gateway()
    await client.post(url("p-1", "ID"), json=SEED_BODY, headers=app_auth(people))
    [job_id] = sync_redis.lrange(jobs.queue_key("unit"), 0, -1)
    data = sync_redis.hget(jobs.job_key(job_id.decode()), "data")
    run_worker()
    template = jobs.job_template(settings)
    sync_redis.hset(jobs.job_key("again"), mapping=jobs.job_fields(template, data, 1))
    sync_redis.rpush(jobs.queue_key("unit"), "again")
    run_worker()
    assert len(sink_rows(sink_path)) == 1


# Any bytes or JSON, and objects near the valid ones, so that hypothesis gets past the
# first check: `ping` takes an optional integer `n`.
PEOPLE_BODIES = st.one_of(
    BODIES,
    st.dictionaries(st.sampled_from(["properties", "n", "x"]), JSON_VALUES, max_size=2).map(
        lambda v: json.dumps(v).encode()
    ),
    st.dictionaries(st.just("n"), JSON_VALUES, max_size=1).map(
        lambda v: json.dumps({"properties": v}).encode()
    ),
)


@pytest.fixture
async def client(gateway, people, ping):
    """One front door for every example of a property-based test."""
    return await gateway()


@FUZZ
@given(body=PEOPLE_BODIES)
async def test_arbitrary_bodies_never_5xx_and_queue_only_on_201(client, people, fake_redis, body):
    before = len(await queued_batches(fake_redis))
    response = await client.post(url("p-1", "ID", "ping"), data=body, headers=app_auth(people))
    assert response.status in (201, 400)
    queued = len(await queued_batches(fake_redis)) - before
    assert queued == (1 if response.status == 201 else 0)
    if response.status == 400:
        await service_exception(response)


@FUZZ
@given(
    person=st.text(min_size=1, max_size=40),
    kind=st.text(max_size=12) | st.sampled_from(PEOPLE_TYPES),
)
async def test_arbitrary_person_ids_and_types_never_5xx(client, people, fake_redis, person, kind):
    target = URL.build(
        path=f"/peopleevents/2/persons/{person}/definitions/addToCart/events"
    ).with_query(identifierType=kind)
    response = await client.post(target, json=SEED_BODY, headers=app_auth(people))
    assert response.status < 500
    if response.status != 201:
        assert await queued_batches(fake_redis) == []


async def test_logs_name_the_route_never_the_person(gateway, people):
    """The path holds an email or a phone: log lines carry the route template instead."""
    client = await gateway()
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        response = await client.post(
            url("41793026727", "PHONE", "nothing"), json={}, headers=app_auth(people)
        )
    assert response.status == 404
    [refused] = [entry for entry in logs if entry["event"] == "request.refused"]
    assert (
        refused["route"] == "/peopleevents/2/persons/{personId}/definitions/{definitionId}/events"
    )
    assert "41793026727" not in repr(logs)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_other_methods_are_405_in_the_vendors_shape(gateway, people, method):
    client = await gateway()
    response = await client.request(method, url("p-1", "ID"), headers=app_auth(people))
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert (await service_exception(response))["messageId"] == "METHOD_NOT_ALLOWED"
