"""Isolation: a key reaches its own account's data only, whatever path, query or body it
forges; public keys only write events; keys rotate, and a revoked key fails on every front
door within the key cache time."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from shared import accounts
from shared.definitions import Definition, get_definition, put_definition
from shared.persons import find_person
from tests.dialects import ACCOUNT, DIALECTS, IMPORT, PEOPLE, Keys, make_account
from tests.support import queued_batches

OTHER = "globex"
QUIET = {"request_limits": False}
# Routes anyone may call: probes, metrics (keep them off the public internet), the pages.
OPEN = re.compile(r"^/(healthz|readyz|metrics|openapi\.json|docs|dashboard)(/|$)")
# Routes a public (browser) key may call: they write events and nothing else.
EVENT_WRITES = {("POST", "/v1/events"), ("POST", "/events"), ("POST", "/client/event-bulk-create")}


@pytest.fixture
async def two(fake_redis) -> tuple[Keys, Keys]:
    """acme's keys and globex's, each account with its person and definition."""
    return await make_account(fake_redis), await make_account(fake_redis, OTHER)


def guarded_routes(app: Any) -> list[tuple[str, str]]:
    """(method, path with its parameters filled) of every route that needs a key."""
    routes = set()
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method in ("HEAD", "OPTIONS", "*"):
            continue
        path = re.sub(r"\{[^}]+\}", "x", resource.canonical).rstrip("/") or "/"
        if not OPEN.match(path):
            routes.add((route.method, path))
    return sorted(routes)


def presenting(key: str) -> dict[str, str]:
    """`key` the way every route looks for it: Authorization (Bearer), access_token."""
    return {"Authorization": f"Bearer {key}", "access_token": key}


def query(key: str, account: str = ACCOUNT) -> str:
    return f"?service_id={account}&company_id={key}&identifierType=ID"


async def test_every_route_but_the_open_ones_wants_a_key(gateway, two):
    client = await gateway(**QUIET)
    routes = guarded_routes(client.server.app)
    assert len(routes) >= 10
    for method, path in routes:
        response = await client.request(method, path, data=b"{}")
        assert response.status == 401, (method, path, await response.text())


async def test_a_public_key_only_writes_events(gateway, fake_redis, two):
    """Every route that is not an event write answers a public key 403, in its own shape."""
    keys, _ = two
    client = await gateway(**QUIET)
    for method, path in guarded_routes(client.server.app):
        if (method, path) in EVENT_WRITES:
            continue
        response = await client.request(
            method, path + query(keys.public), data=b"{}", headers=presenting(keys.public)
        )
        assert response.status == 403, (method, path, await response.text())
    assert await queued_batches(fake_redis) == []


@pytest.mark.parametrize("path", ["/v1/events", "/events"])
async def test_a_public_key_writes_events_to_its_own_account(gateway, fake_redis, two, path):
    keys, _ = two
    client = await gateway(**QUIET)
    body = json.dumps([{"name": "e"}] if path == "/v1/events" else [{"type": "e"}])
    response = await client.post(path, data=body, headers=presenting(keys.public))
    assert response.status == 202, await response.text()
    [batch] = await queued_batches(fake_redis)
    assert batch.parts[0].account == ACCOUNT


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
async def test_events_land_in_the_keys_account_whatever_the_request_says(
    gateway, fake_redis, two, dialect
):
    """The account comes from the key: a forged query, header or body field changes nothing
    (the native API refuses an `account` field outright)."""
    keys, _ = two
    client = await gateway(**QUIET)
    path, headers = dialect.target(keys)
    sep = "&" if "?" in path else "?"
    forged_path = f"{path}{sep}account={OTHER}&tenant={OTHER}"
    body = dialect.one({"account": OTHER})
    forged = {**headers, "X-Account": OTHER, "X-Forwarded-For": "10.0.0.1"}
    response = await client.post(forged_path, data=body, headers=forged)
    assert response.status == dialect.ok, await response.text()
    parts = [p for b in await queued_batches(fake_redis) for p in b.parts]
    assert [p.account for p in parts] == [ACCOUNT]
    refused = await client.post(
        "/v1/events",
        data=json.dumps({"name": "e", "account": OTHER}),
        headers={"Authorization": f"Bearer {keys.private}"},
    )
    assert refused.status == 422


async def test_import_refuses_another_accounts_service_id(gateway, fake_redis, two):
    keys, _ = two
    client = await gateway(**QUIET)
    _, headers = IMPORT.target(keys)
    response = await client.post(
        f"/api/v1/events?service_id={OTHER}", data=IMPORT.one(), headers=headers
    )
    assert response.status == 403
    assert (await response.json())["code"] == "40101"
    assert await queued_batches(fake_redis) == []


async def test_definitions_are_the_keys_accounts_only(gateway, fake_redis, two):
    keys, _ = two
    await put_definition(fake_redis, OTHER, Definition(name="theirs"))
    client = await gateway(**QUIET)
    auth = {"Authorization": f"Bearer {keys.private}"}
    listed = await (await client.get(f"/v1/definitions?account={OTHER}", headers=auth)).json()
    assert "theirs" not in {d["name"] for d in listed["definitions"]}
    assert (await client.get("/v1/definitions/theirs", headers=auth)).status == 404
    assert (await client.delete("/v1/definitions/theirs", headers=auth)).status == 404
    put = await client.put("/v1/definitions/theirs", data=b'{"description": "mine"}', headers=auth)
    assert put.status == 201  # a definition of acme's own, under the same name
    theirs = await get_definition(fake_redis, OTHER, "theirs")
    assert theirs is not None
    assert theirs.description == ""


async def test_persons_are_the_keys_accounts_only(gateway, fake_redis, two):
    keys, other = two
    client = await gateway(**QUIET)
    created = await client.post(
        "/v1/persons",
        data=b'{"id": "bob", "email": "bob@example.com"}',
        headers={"Authorization": f"Bearer {other.private}"},
    )
    assert created.status == 201
    # acme's key cannot send an event for globex's person, by id or by email.
    for person, kind in (("bob", "ID"), ("bob%40example.com", "EMAIL")):
        response = await client.post(
            f"/peopleevents/2/persons/{person}/definitions/addToCart/events?identifierType={kind}",
            data=b'{"properties": {}}',
            headers={"Authorization": f"App {keys.private}"},
        )
        assert response.status == 404, await response.text()
    # And creating "bob" with acme's key makes acme's own bob, leaving globex's alone.
    mine = await client.post(
        "/v1/persons",
        data=b'{"id": "bob", "email": "bob@example.com"}',
        headers={"Authorization": f"Bearer {keys.private}"},
    )
    assert mine.status == 201
    assert await find_person(fake_redis, OTHER, "EMAIL", "bob@example.com") == "bob"
    assert await find_person(fake_redis, ACCOUNT, "EMAIL", "bob@example.com") == "bob"


@pytest.mark.parametrize("path", ["/v1/stats", "/v1/account"])
async def test_figures_and_settings_are_the_keys_accounts_only(gateway, two, path):
    keys, _ = two
    client = await gateway(**QUIET)
    response = await client.get(
        f"{path}?account={OTHER}&scope=operator",
        headers={"Authorization": f"Bearer {keys.private}", "X-Account": OTHER},
    )
    assert response.status == 200
    text = await response.text()
    assert OTHER not in text
    assert ACCOUNT in text


async def test_a_key_with_another_keys_secret_is_refused(gateway, two):
    keys, other = two
    client = await gateway(**QUIET)
    mine_id = keys.private.split(".")[0]
    their_secret = other.private.split(".")[1]
    forged = f"{mine_id}.{their_secret}"
    response = await client.post(
        "/v1/events", data=b'{"name": "e"}', headers={"Authorization": f"Bearer {forged}"}
    )
    assert response.status == 401


async def test_a_rotated_key_fails_on_every_front_door_within_seconds(gateway, fake_redis, two):
    """Two front doors share one Redis: after `keys create` and `keys revoke` of the old
    key, both refuse the old one and take the new one within EVENTGATE_KEY_CACHE_S."""
    keys, _ = two
    doors = [await gateway(key_cache_s=0.3, **QUIET) for _ in range(2)]

    async def status(door: Any, key: str) -> int:
        response = await door.post(
            "/v1/events", data=b'{"name": "e"}', headers={"Authorization": f"Bearer {key}"}
        )
        return int(response.status)

    assert [await status(door, keys.private) for door in doors] == [202, 202]  # cached now
    new = await accounts.create_key(fake_redis, ACCOUNT, "private")
    await accounts.revoke_key(fake_redis, keys.private)
    await accounts.revoke_key(fake_redis, keys.public)
    await asyncio.sleep(0.4)
    assert [await status(door, keys.private) for door in doors] == [401, 401]
    assert [await status(door, new) for door in doors] == [202, 202]
    path, headers = PEOPLE.target(keys)
    bulk = await doors[0].post(
        f"/client/event-bulk-create/?company_id={keys.public}",
        data=b"{}",
        headers={"revision": "2024-10-15"},
    )
    assert bulk.status == 401
    assert path  # the people route takes the same key: revoked everywhere alike
    assert (await doors[1].post(path, data=b"{}", headers=headers)).status == 401
