"""Persons: identifiers, the Redis index, `POST /v1/persons`, `eventgate persons create`, and
the profiles the workers upsert from every event."""

from __future__ import annotations

import asyncio
import json
from contextlib import contextmanager
from datetime import timedelta

import fakeredis
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner
from yarl import URL

from shared import accounts, cli
from shared.definitions import Definition, put_definition
from shared.persons import (
    PersonConflictError,
    PersonError,
    Profile,
    attribute_update,
    find_person,
    identifier_type,
    identifiers,
    index_person,
    merge_profiles,
)
from tests.conftest import BASE_TIME
from tests.strategies import BODIES, FUZZ, JSON_VALUES
from tests.support import profile_rows, queued_batches
from workers.sinks import SqliteSink


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("person_id", "ID"),
        ("external_id", "EXTERNAL_ID"),
        ("email", "EMAIL"),
        ("phone", "PHONE"),
        ("phone_no", "PHONE"),
        ("phone_number", "PHONE"),
        ("phoneNumber", "PHONE"),
        ("customer_code", "CUSTOMER_CODE"),
        ("customerCode", "CUSTOMER_CODE"),
        ("kakao_user_id", "KAKAO"),
        ("line_user_id", "LINE"),
        ("line", "LINE"),
        ("anonymous_id", "ANONYMOUS_ID"),
        ("_kx", "KX"),
        ("web_push", "WEB_PUSH"),
        ("facebook", "FACEBOOK"),
        ("loyalty card", "LOYALTY_CARD"),
    ],
)
def test_identity_keys_name_identifier_types(key, kind):
    """Every dialect's identity keys map onto the people API's types, or types of their own."""
    assert identifier_type(key) == kind


def test_identifiers_are_normalised_deduplicated_and_strongest_first():
    identity = {
        "email": "  Ann@Example.COM ",
        "phone_no": "+82 (10) 1234-5678",
        "phone": "821012345678",
        "anonymous_id": "",
        "customer_code": "C-1",
        "person_id": "p-1",
        "external_id": "x-1",
        "score": 3,  # not an identifier
    }
    assert identifiers(identity) == (
        ("ID", "p-1"),
        ("EXTERNAL_ID", "x-1"),
        ("CUSTOMER_CODE", "C-1"),
        ("EMAIL", "ann@example.com"),
        ("PHONE", "821012345678"),
    )


def test_attribute_updates_drop_nulls_and_mark_unsets():
    update = attribute_update(
        {"first_name": "Ann", "title": None, "location": {"city": "Seoul", "zip": None}},
        ["tier", "first_name"],
    )
    assert update == {"first_name": "Ann", "location": {"city": "Seoul"}, "tier": None}


def test_merge_profiles_keeps_one_row_per_identifier():
    def profile(**fields):
        base = {
            "account": "acme",
            "identifier_type": "EMAIL",
            "identifier": "a@x.y",
            "person_id": "p-1",
            "attributes": {},
            "first_seen": BASE_TIME,
            "last_seen": BASE_TIME,
        }
        return Profile(**{**base, **fields})

    later = BASE_TIME + timedelta(hours=1)
    merged = merge_profiles(
        [
            profile(attributes={"a": 1, "b": 1}, last_seen=later),
            profile(identifier="0@x.y"),
            profile(
                person_id="p-2", attributes={"b": 2}, first_seen=BASE_TIME - timedelta(hours=1)
            ),
        ]
    )
    assert [p.identifier for p in merged] == ["0@x.y", "a@x.y"]
    assert merged[1].person_id == "p-1"
    assert merged[1].attributes == {"a": 1, "b": 2}
    assert (merged[1].first_seen, merged[1].last_seen) == (BASE_TIME - timedelta(hours=1), later)


async def test_index_person_is_all_or_nothing(fake_redis, key):
    assert await index_person(fake_redis, "acme", "p-1", {"email": "a@x.y"}) is True
    assert await index_person(fake_redis, "acme", "p-1", {"phone": "123"}) is False
    with pytest.raises(
        PersonConflictError, match="EMAIL identifier already belongs to person 'p-1'"
    ):
        await index_person(fake_redis, "acme", "p-2", {"external_id": "x", "email": "A@X.Y"})
    assert await find_person(fake_redis, "acme", "EXTERNAL_ID", "x") is None
    assert await find_person(fake_redis, "acme", "ID", "p-2") is None
    assert await find_person(fake_redis, "acme", "PHONE", "+1 23") == "p-1"
    with pytest.raises(PersonError, match="no account"):
        await index_person(fake_redis, "nobody", "p-1", {})


async def test_post_person_indexes_at_once_and_profiles_follow(
    gateway, key, fake_redis, run_worker, sink_path
):
    """201 and the people dialect finds the person at once; the worker writes its rows."""
    await put_definition(fake_redis, "acme", Definition(name="ping"))
    client = await gateway()
    person = {
        "id": "p-7",
        "external_id": "crm-7",
        "email": "Ann@Example.com",
        "phone": "+82 10 1234 5678",
        "attributes": {"first_name": "Ann", "tier": "gold"},
    }
    response = await client.post("/v1/persons", json=person, headers=bearer(key))
    assert response.status == 201
    reply = await response.json()
    assert reply["id"] == "p-7"
    assert reply["identifiers"] == {
        "ID": "p-7",
        "EXTERNAL_ID": "crm-7",
        "EMAIL": "ann@example.com",
        "PHONE": "821012345678",
    }
    assert reply["attributes"] == {"first_name": "Ann", "tier": "gold"}

    event = URL(
        "/peopleevents/2/persons/ann%40example.com/definitions/ping/events?identifierType=EMAIL",
        encoded=True,
    )
    found = await client.post(event, json={}, headers={"Authorization": f"App {key}"})
    assert found.status == 201

    again = await client.post(
        "/v1/persons", json={"id": "p-7", "email": "ann@example.com"}, headers=bearer(key)
    )
    assert again.status == 200

    run_worker()
    rows = {(r["identifier_type"], r["identifier"]): r for r in profile_rows(sink_path)}
    assert sorted(rows) == [
        ("EMAIL", "ann@example.com"),
        ("EXTERNAL_ID", "crm-7"),
        ("ID", "p-7"),
        ("PHONE", "821012345678"),
    ]
    assert {r["person_id"] for r in rows.values()} == {"p-7"}
    assert rows["ID", "p-7"]["attributes"] == {"first_name": "Ann", "tier": "gold"}


async def test_post_person_conflict_is_409_and_writes_nothing(gateway, key, fake_redis):
    client = await gateway()
    await client.post("/v1/persons", json={"id": "p-1", "email": "a@x.y"}, headers=bearer(key))
    before = len(await queued_batches(fake_redis))
    response = await client.post(
        "/v1/persons", json={"id": "p-2", "external_id": "e", "email": "a@x.y"}, headers=bearer(key)
    )
    assert response.status == 409
    problem = await response.json()
    assert problem["type"].endswith("/person_conflict")
    assert "'p-1'" in problem["detail"]
    assert await find_person(fake_redis, "acme", "EXTERNAL_ID", "e") is None
    assert len(await queued_batches(fake_redis)) == before


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"", 400, "empty body"),
        (b"{", 400, "line 1"),
        (b"{}", 422, "missing required field `id`"),
        (b'{"id": ""}', 422, "id"),
        (b'{"id": "   "}', 422, "id"),
        (b'{"id": "p", "emial": "x"}', 422, "emial"),
        (b'{"id": "p", "attributes": []}', 422, "attributes"),
        (b'{"id": "' + b"x" * 129 + b'"}', 422, "id"),
    ],
)
async def test_post_person_refuses_bad_bodies(gateway, key, fake_redis, body, status, needle):
    client = await gateway()
    response = await client.post("/v1/persons", data=body, headers=bearer(key))
    assert response.status == status
    assert response.content_type == "application/problem+json"
    assert needle in (await response.json())["detail"]
    assert await queued_batches(fake_redis) == []


async def test_post_person_needs_a_private_key(gateway, key, fake_redis):
    public = await accounts.create_key(fake_redis, "acme", "public")
    client = await gateway()
    assert (await client.post("/v1/persons", json={"id": "p"})).status == 401
    assert (
        await client.post("/v1/persons", json={"id": "p"}, headers=bearer(public))
    ).status == 403
    assert await queued_batches(fake_redis) == []


async def test_every_events_identity_becomes_profile_rows(
    gateway, key, fake_redis, run_worker, sink_path
):
    """Native events: one row per identifier, the first and last time it was seen, and one
    person for identifiers sent together (the index links them)."""
    client = await gateway()
    events = [
        {
            "name": "a",
            "timestamp": "2025-01-01T00:00:00Z",
            "identity": {"customer_code": "C-1", "email": "c@x.y"},
        },
        {
            "name": "b",
            "timestamp": "2025-01-03T00:00:00Z",
            "identity": {"customer_code": "C-1", "email": "c@x.y"},
        },
        {"name": "c", "timestamp": "2025-01-02T00:00:00Z", "identity": {"customer_code": "C-1"}},
        {"name": "d"},
    ]
    assert (await client.post("/v1/events", json=events, headers=bearer(key))).status == 202
    run_worker()
    rows = {(r["identifier_type"], r["identifier"]): r for r in profile_rows(sink_path)}
    person = rows["CUSTOMER_CODE", "C-1"]["person_id"]
    assert sorted(rows) == [("CUSTOMER_CODE", "C-1"), ("EMAIL", "c@x.y"), ("ID", person)]
    assert {r["person_id"] for r in rows.values()} == {person}
    code = rows["CUSTOMER_CODE", "C-1"]
    assert (code["first_seen"], code["last_seen"]) == (
        "2025-01-01T00:00:00.000000+00:00",
        "2025-01-03T00:00:00.000000+00:00",
    )
    assert await find_person(fake_redis, "acme", "EMAIL", "C@X.Y") == person

    # A later batch: the same person, an older sighting widens first_seen only.
    late = [
        {
            "name": "e",
            "timestamp": "2024-12-31T00:00:00Z",
            "identity": {"email": "c@x.y", "phone": "555"},
        }
    ]
    await client.post("/v1/events", json=late, headers=bearer(key))
    run_worker()
    rows = {(r["identifier_type"], r["identifier"]): r for r in profile_rows(sink_path)}
    assert rows["PHONE", "555"]["person_id"] == person
    assert rows["EMAIL", "c@x.y"]["first_seen"] == "2024-12-31T00:00:00.000000+00:00"
    assert rows["EMAIL", "c@x.y"]["last_seen"] == "2025-01-03T00:00:00.000000+00:00"


async def test_identifiers_of_two_persons_keep_their_own(
    gateway, key, fake_redis, run_worker, sink_path
):
    """An event naming two known persons: the stronger identifier's person wins the event,
    and no identifier changes hands."""
    await index_person(fake_redis, "acme", "p-1", {"external_id": "x-1"})
    await index_person(fake_redis, "acme", "p-2", {"email": "two@x.y"})
    client = await gateway()
    events = [{"name": "a", "identity": {"email": "two@x.y", "external_id": "x-1"}}]
    await client.post("/v1/events", json=events, headers=bearer(key))
    run_worker()
    owners = {
        (r["identifier_type"], r["identifier"]): r["person_id"] for r in profile_rows(sink_path)
    }
    assert owners == {
        ("EXTERNAL_ID", "x-1"): "p-1",
        ("EMAIL", "two@x.y"): "p-2",
        ("ID", "p-1"): "p-1",
    }
    assert await find_person(fake_redis, "acme", "EMAIL", "two@x.y") == "p-2"


def test_sqlite_upsert_merges_attributes_and_widens_seen_times(tmp_path):
    sink = SqliteSink(tmp_path / "events.db")
    later = BASE_TIME + timedelta(days=1)

    def profile(attributes, first=BASE_TIME, last=BASE_TIME, person="p-1"):
        return Profile(
            account="acme",
            identifier_type="ID",
            identifier="p-1",
            person_id=person,
            attributes=attributes,
            first_seen=first,
            last_seen=last,
        )

    try:
        assert sink.upsert_profiles([profile({"a": 1, "loc": {"city": "Seoul", "zip": "1"}})]) == 1
        sink.upsert_profiles(
            [profile({"loc": {"city": "Busan"}, "b": [1, {"c": True}]}, last=later)]
        )
        sink.upsert_profiles(
            [profile({"a": None}, first=BASE_TIME - timedelta(days=1), person="p-9")]
        )
        sink.upsert_profiles([profile({})])
        assert sink.upsert_profiles([]) == 0
    finally:
        sink.close()
    [row] = profile_rows(tmp_path / "events.db")
    assert row["person_id"] == "p-1"  # the stored person id is kept
    assert row["attributes"] == {"loc": {"city": "Busan"}, "b": [1, {"c": True}]}
    assert row["first_seen"] == "2025-11-17T07:21:16.527000+00:00"
    assert row["last_seen"] == "2025-11-19T07:21:16.527000+00:00"


def test_cli_persons_create(monkeypatch, tmp_path, fake_server, sync_redis, run_worker, sink_path):
    """`eventgate persons create`: indexed at once, profile rows from the worker, and errors
    as a message and exit status 1."""
    monkeypatch.setenv("EVENTGATE_QUEUE", "unit")
    monkeypatch.setenv("EVENTGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("EVENTGATE_SHARDS", "1")

    @contextmanager
    def fake_redis_for(_settings):
        yield fakeredis.FakeAsyncRedis(server=fake_server)

    monkeypatch.setattr(cli, "_redis", fake_redis_for)
    asyncio.run(accounts.create_account(fakeredis.FakeAsyncRedis(server=fake_server), "acme"))
    runner = CliRunner()
    args = ["persons", "create", "acme", "--id", "p-1", "--email", "A@x.y", "--phone", "+1 555"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "created person p-1" in result.output
    assert sync_redis.hget("eg:persons:{acme}", "EMAIL:a@x.y") == b"p-1"

    result = runner.invoke(
        cli.app, ["persons", "create", "acme", "--id", "p-1", "--external-id", "e-1"]
    )
    assert result.exit_code == 0
    assert "updated person p-1" in result.output

    conflict = runner.invoke(
        cli.app, ["persons", "create", "acme", "--id", "p-2", "--email", "a@x.y"]
    )
    assert conflict.exit_code == 1
    assert "belongs to person 'p-1'" in conflict.output
    unknown = runner.invoke(cli.app, ["persons", "create", "nobody", "--id", "p-1"])
    assert unknown.exit_code == 1
    assert "no account 'nobody'" in unknown.output
    blank = runner.invoke(cli.app, ["persons", "create", "acme", "--id", " "])
    assert blank.exit_code == 1

    run_worker()
    rows = {
        (r["identifier_type"], r["identifier"]): r["person_id"] for r in profile_rows(sink_path)
    }
    assert rows == {
        ("EMAIL", "a@x.y"): "p-1",
        ("EXTERNAL_ID", "e-1"): "p-1",
        ("ID", "p-1"): "p-1",
        ("PHONE", "1555"): "p-1",
    }


PERSON_FIELDS = st.sampled_from(["id", "external_id", "email", "phone", "attributes", "other"])
PERSON_BODIES = BODIES | st.dictionaries(PERSON_FIELDS, JSON_VALUES, max_size=5).map(
    lambda v: json.dumps(v).encode()
)


@pytest.fixture
async def client(gateway, key):
    """One front door for every example of a property-based test."""
    return await gateway()


@FUZZ
@given(body=PERSON_BODIES)
async def test_arbitrary_person_bodies_never_5xx(client, key, fake_redis, body):
    """Whatever the body, a 4xx or a person; something is queued only for a person."""
    before = len(await queued_batches(fake_redis))
    response = await client.post("/v1/persons", data=body, headers=bearer(key))
    assert response.status in (200, 201, 400, 409, 422)
    queued = len(await queued_batches(fake_redis)) - before
    assert queued == (1 if response.status in (200, 201) else 0)
