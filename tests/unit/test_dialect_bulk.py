"""The bulk dialect (seed 004): what browsers see, what is queued, what lands in the sink."""

from __future__ import annotations

import asyncio
import copy
import json
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from ingest.app import make_app
from ingest.server import RUNNER_OPTIONS
from shared import accounts
from shared.definitions import Definition, PropertySpec, put_definition
from shared.persons import find_person
from tests.strategies import BODIES, FUZZ, JSON_VALUES
from tests.support import profile_rows, queued_batches, sink_rows

PATH = "/client/event-bulk-create/"
REVISION = {"revision": "2024-10-15"}


def bulk_event(name: str = "Viewed Product", **attributes: Any) -> dict[str, Any]:
    return {
        "type": "event",
        "attributes": {
            "metric": {"data": {"type": "metric", "attributes": {"name": name}}},
            **attributes,
        },
    }


def document(events: list[dict[str, Any]], **profile: Any) -> dict[str, Any]:
    attributes = profile or {"email": "sarah.mason@example.com"}
    return {
        "data": {
            "type": "event-bulk-create",
            "attributes": {
                "profile": {"data": {"type": "profile", "attributes": attributes}},
                "events": {"data": events},
            },
        }
    }


# The seed's request body, its "<string>" placeholders given plausible values.
SEED_BODY: dict[str, Any] = {
    "data": {
        "type": "event-bulk-create",
        "attributes": {
            "profile": {
                "data": {
                    "type": "profile",
                    "attributes": {
                        "email": "sarah.mason@klaviyo-demo.com",
                        "phone_number": "+15005550006",
                        "external_id": "63f64a2b-c6bf-40c7-b81f-bed08162edbe",
                        "anonymous_id": "anon-7f3a9c",
                        "_kx": "kx-token-b1e9",
                        "first_name": "Sarah",
                        "last_name": "Mason",
                        "organization": "Example Corporation",
                        "title": "Regional Manager",
                        "image": "https://images.example.com/sarah.jpg",
                        "location": {
                            "address1": "89 E 42nd St",
                            "address2": "1st floor",
                            "city": "New York",
                            "country": "United States",
                            "latitude": "40.7128",
                            "longitude": "74.0060",
                            "region": "NY",
                            "zip": "10017",
                            "timezone": "America/New_York",
                            "ip": "127.0.0.1",
                        },
                    },
                    "id": "01GDDKASAP8TKDDA2GRZDSVP4H",
                    "meta": {"patch_properties": {"unset": "favorite_color"}},
                }
            },
            "events": {
                "data": [
                    {
                        "type": "event",
                        "attributes": {
                            "metric": {
                                "data": {
                                    "type": "metric",
                                    "attributes": {"name": "Viewed Product", "service": "web"},
                                }
                            },
                            "time": "2025-11-18T07:21:16.527Z",
                            "value": 9.99,
                            "value_currency": "USD",
                            "unique_id": "evt-0001",
                        },
                    },
                    {
                        "type": "event",
                        "attributes": {
                            "metric": {
                                "data": {
                                    "type": "metric",
                                    "attributes": {"name": "Added to Cart", "service": "web"},
                                }
                            },
                            "time": "2025-11-18T07:22:01.5Z",
                            "value": 19.98,
                            "value_currency": "USD",
                            "unique_id": "evt-0002",
                        },
                    },
                ]
            },
        },
    }
}


@pytest.fixture
async def public_key(fake_redis, key) -> str:
    return await accounts.create_key(fake_redis, "acme", "public")


def target(key: str, path: str = PATH) -> str:
    return f"{path}?company_id={key}"


async def errors_of(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    """The JSON:API errors of an answer, each checked for its shape."""
    assert response.content_type == "application/vnd.api+json"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    body = await response.json()
    assert list(body) == ["errors"]
    for error in body["errors"]:
        assert list(error) == ["id", "status", "code", "title", "detail", "source", "meta"]
        assert error["status"] == response.status
        assert "pointer" in error["source"]
    return body["errors"]


async def test_seed_request_lands_in_the_sink(gateway, public_key, run_worker, sink_path):
    """The seed's document: 202 with no body; every event stored with its canonical fields,
    the profile's identifiers and attributes in the profiles."""
    client = await gateway()
    response = await client.post(target(public_key), json=SEED_BODY, headers=REVISION)
    assert response.status == 202
    assert await response.read() == b""
    assert response.headers["Access-Control-Allow-Origin"] == "*"

    run_worker()
    rows = {row["event_id"]: row for row in sink_rows(sink_path)}
    assert sorted(rows) == ["evt-0001", "evt-0002"]
    viewed, added = rows["evt-0001"], rows["evt-0002"]
    assert viewed["account"] == "acme"
    assert viewed["name"] == "Viewed Product"
    assert viewed["source"] == "bulk"
    assert viewed["occurred_at"] == "2025-11-18T07:21:16.527000+00:00"
    assert viewed["value"] == 9.99
    assert viewed["currency"] == "USD"
    assert viewed["properties"] == {"$service": "web"}
    assert viewed["items"] == []
    assert viewed["identity"] == {
        "person_id": "01GDDKASAP8TKDDA2GRZDSVP4H",
        "email": "sarah.mason@klaviyo-demo.com",
        "phone_number": "+15005550006",
        "external_id": "63f64a2b-c6bf-40c7-b81f-bed08162edbe",
        "anonymous_id": "anon-7f3a9c",
        "_kx": "kx-token-b1e9",
    }
    assert added["name"] == "Added to Cart"
    assert added["occurred_at"] == "2025-11-18T07:22:01.500000+00:00"
    assert (added["value"], added["currency"]) == (19.98, "USD")

    profiles = {(p["identifier_type"], p["identifier"]): p for p in profile_rows(sink_path)}
    assert sorted(profiles) == [
        ("ANONYMOUS_ID", "anon-7f3a9c"),
        ("EMAIL", "sarah.mason@klaviyo-demo.com"),
        ("EXTERNAL_ID", "63f64a2b-c6bf-40c7-b81f-bed08162edbe"),
        ("ID", "01GDDKASAP8TKDDA2GRZDSVP4H"),
        ("KX", "kx-token-b1e9"),
        ("PHONE", "15005550006"),
    ]
    assert {p["person_id"] for p in profiles.values()} == {"01GDDKASAP8TKDDA2GRZDSVP4H"}
    person = profiles["ID", "01GDDKASAP8TKDDA2GRZDSVP4H"]
    assert person["attributes"]["first_name"] == "Sarah"
    assert person["attributes"]["location"]["city"] == "New York"
    assert person["attributes"].get("favorite_color") is None  # unset
    assert person["first_seen"] == "2025-11-18T07:21:16.527000+00:00"
    assert person["last_seen"] > "2025-11-18T07:22:01.500000+00:00"  # the profile, as received


async def test_persons_first_seen_here_are_found_by_the_people_dialect(
    gateway, public_key, run_worker, fake_redis
):
    """The workers index every identity, so other dialects find the person."""
    client = await gateway()
    await client.post(target(public_key), json=document([bulk_event()]), headers=REVISION)
    run_worker()
    person = await find_person(fake_redis, "acme", "EMAIL", "Sarah.Mason@example.com")
    assert person is not None
    assert await find_person(fake_redis, "acme", "ID", person) == person


@pytest.mark.parametrize("path", ["/client/event-bulk-create/", "/client/event-bulk-create"])
@pytest.mark.parametrize("content_type", ["application/json", "application/vnd.api+json"])
async def test_both_paths_and_content_types(gateway, public_key, fake_redis, path, content_type):
    client = await gateway()
    response = await client.post(
        target(public_key, path),
        data=json.dumps(SEED_BODY),
        headers={**REVISION, "Content-Type": content_type},
    )
    assert response.status == 202
    [batch] = await queued_batches(fake_redis)
    [part] = batch.parts
    assert (part.dialect, part.count, part.ids) == ("bulk", 2, {})


@pytest.mark.parametrize(
    "revision", ["2024-10-15", "2023-02-22.pre", "2999-12-31", "2024-02-29.beta_1"]
)
async def test_any_well_formed_revision_is_accepted(gateway, public_key, revision):
    """Revisions are checked for their format, never against a list: future ones pass."""
    client = await gateway()
    response = await client.post(target(public_key), json=SEED_BODY, headers={"revision": revision})
    assert response.status == 202


@pytest.mark.parametrize(
    ("headers", "needle"),
    [
        ({}, "revision header is required"),
        ({"revision": ""}, "revision header is required"),
        ({"revision": "2024-13-01"}, "not a real date"),
        ({"revision": "2023-02-29"}, "not a real date"),
        ({"revision": "2024-1-5"}, "YYYY-MM-DD"),
        ({"revision": "yesterday"}, "YYYY-MM-DD"),
        ({"revision": "2024-10-15."}, "YYYY-MM-DD"),
        ({"revision": "2024-10-15 pre"}, "YYYY-MM-DD"),
    ],
)
async def test_missing_or_malformed_revision_is_400(
    gateway, public_key, fake_redis, headers, needle
):
    client = await gateway()
    response = await client.post(target(public_key), json=SEED_BODY, headers=headers)
    assert response.status == 400
    [error] = await errors_of(response)
    assert error["code"] == "invalid"
    assert error["source"] == {"pointer": "/data/", "parameter": "revision"}
    assert needle in error["detail"]
    assert await queued_batches(fake_redis) == []


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?company_id=",
        "?company_id=nonsense",
        "?company_id=eg_pk_000000000000.AAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
async def test_missing_or_unknown_company_id_is_401(gateway, public_key, fake_redis, query):
    client = await gateway()
    response = await client.post(f"{PATH}{query}", json=SEED_BODY, headers=REVISION)
    assert response.status == 401
    [error] = await errors_of(response)
    assert error["code"] == "not_authenticated"
    assert error["source"]["parameter"] == "company_id"
    assert await queued_batches(fake_redis) == []


async def test_private_key_in_the_url_is_403_with_the_reason(gateway, key, fake_redis):
    """A private key would leak in URLs: refused, and the answer says so."""
    client = await gateway()
    response = await client.post(target(key), json=SEED_BODY, headers=REVISION)
    assert response.status == 403
    [error] = await errors_of(response)
    assert error["code"] == "permission_denied"
    assert "leak" in error["detail"]
    assert "public key" in error["detail"]
    assert await queued_batches(fake_redis) == []


async def test_a_thousand_events_pass_and_one_more_does_not(gateway, public_key, fake_redis):
    client = await gateway()
    events = [bulk_event(unique_id=f"u-{i}") for i in range(1000)]
    response = await client.post(target(public_key), json=document(events), headers=REVISION)
    assert response.status == 202
    [batch] = await queued_batches(fake_redis)
    assert batch.parts[0].count == 1000

    events.append(bulk_event(unique_id="u-1000"))
    response = await client.post(target(public_key), json=document(events), headers=REVISION)
    assert response.status == 400
    [error] = await errors_of(response)
    assert error["source"] == {"pointer": "/data/attributes/events/data"}
    assert "1001 events; at most 1000" in error["detail"]
    assert len(await queued_batches(fake_redis)) == 1


async def test_one_more_invalid_event_is_still_counted_first(gateway, public_key, fake_redis):
    """1001 events, one of them invalid: the count is the problem named."""
    client = await gateway()
    events = [bulk_event()] * 1000 + [bulk_event(time="never")]
    response = await client.post(target(public_key), json=document(events), headers=REVISION)
    assert response.status == 400
    [error] = await errors_of(response)
    assert error["source"]["pointer"] == "/data/attributes/events/data"
    assert await queued_batches(fake_redis) == []


async def test_no_events_is_400(gateway, public_key, fake_redis):
    client = await gateway()
    response = await client.post(target(public_key), json=document([]), headers=REVISION)
    assert response.status == 400
    [error] = await errors_of(response)
    assert error["source"] == {"pointer": "/data/attributes/events/data"}
    assert await queued_batches(fake_redis) == []


async def test_every_invalid_event_is_pointed_at(gateway, public_key, fake_redis):
    """One JSON:API error per problem, each with the exact pointer to it."""
    client = await gateway()
    bad_metric = bulk_event()
    del bad_metric["attributes"]["metric"]["data"]["attributes"]["name"]
    events = [
        bulk_event(),
        bulk_event(time="not a time"),
        bulk_event(unique_ID="typo"),
        bulk_event(value="ten"),
        bad_metric,
        bulk_event(value_currency="dollars"),
        bulk_event(time="2999-01-01T00:00:00Z"),
        {"type": "events", "attributes": {}},
        bulk_event(unique_id=""),
    ]
    response = await client.post(target(public_key), json=document(events), headers=REVISION)
    assert response.status == 400
    errors = await errors_of(response)
    base = "/data/attributes/events/data"
    assert [e["source"]["pointer"] for e in errors] == [
        f"{base}/1/attributes/time",
        f"{base}/2/attributes/unique_ID",
        f"{base}/3/attributes/value",
        f"{base}/4/attributes/metric/data/attributes/name",
        f"{base}/5/attributes/value_currency",
        f"{base}/6/attributes/time",
        f"{base}/7/type",
        f"{base}/8/attributes/unique_id",
    ]
    assert {e["code"] for e in errors} == {"invalid"}
    assert len({e["id"] for e in errors}) == len(errors)
    assert "too far in the future" in errors[5]["detail"]
    assert await queued_batches(fake_redis) == []


@pytest.mark.parametrize(
    ("body", "pointer", "needle"),
    [
        (b"", "/data/", "empty body"),
        (b'{"data": ', "/data/", "line 1"),
        (b"\xff\xfe", "/data/", "invalid JSON"),
        (b"[]", "/data/", "Expected `object`"),
        (b"{}", "/data", "missing required field `data`"),
        (
            json.dumps({"data": {"type": "event", "attributes": {}}}).encode(),
            "/data/type",
            "Invalid enum",
        ),
        (b'{"data": ' * 3000 + b"1" + b"}" * 3000, "/data/", "nested too deeply"),
    ],
)
async def test_malformed_documents_are_400(gateway, public_key, fake_redis, body, pointer, needle):
    client = await gateway()
    response = await client.post(target(public_key), data=body, headers=REVISION)
    assert response.status == 400
    [error] = await errors_of(response)
    assert error["source"]["pointer"] == pointer
    assert needle in error["detail"]
    assert await queued_batches(fake_redis) == []


@pytest.mark.parametrize(
    ("profile", "pointer"),
    [
        ({"first_name": "Nobody"}, "/data/attributes/profile/data/attributes"),
        ({"email": 42}, "/data/attributes/profile/data/attributes/email"),
        ({"email": "a@b.c", "nickname": "x"}, "/data/attributes/profile/data/attributes/nickname"),
        (
            {"email": "a@b.c", "location": {"planet": "Mars"}},
            "/data/attributes/profile/data/attributes/location/planet",
        ),
    ],
)
async def test_invalid_profiles_are_pointed_at(gateway, public_key, fake_redis, profile, pointer):
    client = await gateway()
    response = await client.post(
        target(public_key), json=document([bulk_event()], **profile), headers=REVISION
    )
    assert response.status == 400
    [error] = await errors_of(response)
    assert error["source"]["pointer"] == pointer
    assert await queued_batches(fake_redis) == []


async def test_properties_are_checked_against_the_accounts_definitions(
    gateway, public_key, fake_redis
):
    await put_definition(
        fake_redis,
        "acme",
        Definition(
            name="Ordered Product",
            properties={"quantity": PropertySpec(type="integer", required=True)},
        ),
    )
    await accounts.update_account(fake_redis, "acme", accept_unregistered=False)
    client = await gateway()
    events = [
        bulk_event("Ordered Product", properties={"quantity": 2}),
        bulk_event("Ordered Product", properties={"quantity": "two"}),
        bulk_event("Mystery"),
    ]
    response = await client.post(target(public_key), json=document(events), headers=REVISION)
    assert response.status == 400
    errors = await errors_of(response)
    assert [e["source"]["pointer"] for e in errors] == [
        "/data/attributes/events/data/1/attributes/properties/quantity",
        "/data/attributes/events/data/2/attributes/metric/data/attributes/name",
    ]
    assert await queued_batches(fake_redis) == []


async def test_body_over_the_limit_is_413(gateway, public_key, fake_redis):
    client = await gateway(max_body_bytes=1000)
    events = [bulk_event(unique_id=f"u-{i}") for i in range(50)]
    response = await client.post(target(public_key), json=document(events), headers=REVISION)
    assert response.status == 413
    [error] = await errors_of(response)
    assert error["code"] == "request_too_large"
    assert await queued_batches(fake_redis) == []


async def test_redis_down_is_503_in_json_api(gateway, public_key, fake_server, fake_redis):
    client = await gateway(redis_timeout_s=0.5)
    assert (await client.post(target(public_key), json=SEED_BODY, headers=REVISION)).status == 202
    fake_server.connected = False
    response = await client.post(target(public_key), json=SEED_BODY, headers=REVISION)
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    [error] = await errors_of(response)
    assert error["code"] == "service_unavailable"
    fake_server.connected = True
    assert len(await queued_batches(fake_redis)) == 1


async def test_resent_unique_ids_are_stored_once(
    gateway, public_key, run_worker, sink_path, fake_redis
):
    """unique_id is the dedupe key: the same document twice is two 202s and one row per event."""
    client = await gateway()
    for _ in range(2):
        response = await client.post(target(public_key), json=SEED_BODY, headers=REVISION)
        assert response.status == 202
    run_worker()
    assert [row["event_id"] for row in sink_rows(sink_path)] == ["evt-0001", "evt-0002"]
    counts = await fake_redis.hgetall("eg:count:{acme}")
    assert counts[b"accepted"] == b"4"
    assert counts[b"persisted"] == b"2"
    assert counts[b"duplicate"] == b"2"


async def test_events_without_unique_id_get_minted_ids(
    gateway, public_key, run_worker, sink_path, fake_redis
):
    client = await gateway()
    events = [bulk_event(), bulk_event(unique_id="mine"), bulk_event()]
    await client.post(target(public_key), json=document(events), headers=REVISION)
    [batch] = await queued_batches(fake_redis)
    ids = batch.parts[0].ids
    assert sorted(ids) == [0, 2]
    run_worker()
    assert sorted(row["event_id"] for row in sink_rows(sink_path)) == sorted(
        [ids[0], ids[2], "mine"]
    )


async def test_times_without_offset_are_utc_with_any_fraction(
    gateway, public_key, run_worker, sink_path
):
    client = await gateway()
    events = [
        bulk_event(unique_id="a", time="2025-11-18T07:21:16"),
        bulk_event(unique_id="b", time="2025-11-18T07:21:16.123456789"),
        bulk_event(unique_id="c", time="2025-11-18T16:21:16.5+09:00"),
        bulk_event(unique_id="d"),
    ]
    before = datetime.now(UTC)
    await client.post(target(public_key), json=document(events), headers=REVISION)
    run_worker()
    rows = {row["event_id"]: row for row in sink_rows(sink_path)}
    assert rows["a"]["occurred_at"] == "2025-11-18T07:21:16.000000+00:00"
    assert rows["b"]["occurred_at"] == "2025-11-18T07:21:16.123457+00:00"
    assert rows["c"]["occurred_at"] == "2025-11-18T07:21:16.500000+00:00"
    assert datetime.fromisoformat(rows["d"]["occurred_at"]) >= before.replace(microsecond=0)


async def test_profile_attributes_merge_across_requests(gateway, public_key, run_worker, sink_path):
    """Each attribute sent replaces the stored one; others stay; `unset` removes one."""
    client = await gateway()
    first = document(
        [bulk_event()], email="a@example.com", first_name="Ann", properties={"tier": "gold"}
    )
    await client.post(target(public_key), json=first, headers=REVISION)
    run_worker()
    second = document([bulk_event()], email="a@example.com", last_name="Lee")
    second["data"]["attributes"]["profile"]["data"]["meta"] = {
        "patch_properties": {"unset": ["tier"]}
    }
    await client.post(target(public_key), json=second, headers=REVISION)
    run_worker()
    [email] = [p for p in profile_rows(sink_path) if p["identifier_type"] == "EMAIL"]
    assert email["attributes"] == {"first_name": "Ann", "last_name": "Lee"}


@pytest.mark.parametrize("path", ["/client/event-bulk-create/", "/client/event-bulk-create"])
async def test_preflight_allows_the_revision_header(gateway, path):
    client = await gateway()
    response = await client.options(
        path,
        headers={
            "Origin": "https://shop.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "revision, content-type",
        },
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "revision, content-type"


async def test_connection_stays_usable_after_a_4xx(
    aiohttp_client, settings, fake_redis, public_key
):
    """Keep-alive: a 400 then a 202 on one connection."""
    created = []
    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(lambda *_: asyncio.sleep(0, created.append(1)))
    server = TestServer(make_app(settings, fake_redis))
    await server.start_server(**RUNNER_OPTIONS)
    client = await aiohttp_client(server, trace_configs=[trace])
    refused = await client.post(target(public_key), json=SEED_BODY)  # no revision
    assert refused.status == 400
    await refused.read()
    accepted = await client.post(target(public_key), json=SEED_BODY, headers=REVISION)
    assert accepted.status == 202
    assert len(created) == 1


def _mutations() -> st.SearchStrategy[bytes]:
    """The seed's document with one value somewhere replaced by arbitrary JSON."""

    def mutate(value: Any, path: list[int]) -> bytes:
        body = copy.deepcopy(SEED_BODY)
        node: Any = body
        for step in path:
            if isinstance(node, dict) and node:
                key = sorted(node)[step % len(node)]
                if not isinstance(node[key], dict | list):
                    node[key] = value
                    break
                node = node[key]
            elif isinstance(node, list) and node:
                node = node[step % len(node)]
        return json.dumps(body).encode()

    return st.builds(mutate, JSON_VALUES, st.lists(st.integers(0, 20), min_size=1, max_size=12))


BULK_BODIES = BODIES | _mutations()


@pytest.fixture
async def client(gateway):
    """One front door for every example of a property-based test (without the vendor's
    rate limit: its burst of 10 would answer most examples 429)."""
    return await gateway(request_limits=False)


@FUZZ
@given(body=BULK_BODIES)
async def test_arbitrary_bodies_never_5xx_and_queue_only_on_202(
    client, public_key, fake_redis, body
):
    before = len(await queued_batches(fake_redis))
    response = await client.post(target(public_key), data=body, headers=REVISION)
    assert response.status in (202, 400)
    queued = len(await queued_batches(fake_redis)) - before
    assert queued == (1 if response.status == 202 else 0)
    if response.status == 400:
        assert await errors_of(response)


@pytest.mark.parametrize("path", ["/client/event-bulk-create/", "/client/event-bulk-create"])
async def test_other_methods_are_405_in_json_api(gateway, public_key, path):
    client = await gateway()
    response = await client.get(target(public_key, path), headers=REVISION)
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    [error] = await errors_of(response)
    assert error["code"] == "method_not_allowed"
