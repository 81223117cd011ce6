"""Event definitions: compiling and checking, parsing files, the admin API and the CLI."""

from __future__ import annotations

import asyncio
import json
import re
from contextlib import contextmanager
from datetime import UTC, datetime

import fakeredis
import pytest
from typer.testing import CliRunner

from ingest.accounts import AccountView
from shared import accounts, cli
from shared.definitions import (
    CompiledDefinition,
    Definition,
    DefinitionError,
    PropertySpec,
    builtin_definitions,
    compile_definitions,
    list_definitions,
    parse_definitions,
    put_definition,
)

# Compiling and checking.


def check(properties: dict, payload: dict) -> str | None:  # type: ignore[type-arg]
    """msgspec's message for `payload` against a definition of `properties` (as JSON would
    give them), or None."""
    [definition] = parse_definitions(json.dumps({"name": "e", "properties": properties}).encode())
    error = CompiledDefinition(definition).check(payload)
    return None if error is None else str(error)


def test_required_optional_and_null():
    spec = {"sku": {"type": "string", "required": True}, "qty": {"type": "integer"}}
    assert check(spec, {"sku": "N1"}) is None
    assert check(spec, {"sku": "N1", "qty": None}) is None  # optional may be null
    assert "missing required field `sku`" in (check(spec, {"qty": 1}) or "")
    assert "Expected `int | null`, got `str`" in (check(spec, {"sku": "N1", "qty": "x"}) or "")


def test_properties_not_in_the_definition_are_allowed():
    assert check({"sku": {"type": "string"}}, {"sku": "N1", "extra": [1, {"a": 2}]}) is None


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        ("string", "x", 1),
        ("integer", 2, 2.5),
        ("number", 2.5, "lots"),
        ("boolean", True, "maybe"),
        ("datetime", "2025-11-18T07:21:16Z", "yesterday"),
        ("array", [1, "a"], "a"),
        ("object", {"a": 1}, [1]),
    ],
)
def test_every_type_accepts_its_values_and_refuses_others(kind, good, bad):
    spec = {"p": {"type": kind, "required": True}}
    assert check(spec, {"p": good}) is None
    assert check(spec, {"p": bad}) is not None


def test_numbers_sent_as_strings_are_accepted():
    """Checks are lax (strict=False): "2" passes as an integer, as many producers send it."""
    assert check({"qty": {"type": "integer"}}, {"qty": "2"}) is None


def test_nested_items_and_objects_name_the_path_of_the_problem():
    spec = {
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"qty": {"type": "integer", "required": True}},
            },
        },
        "address": {"type": "object", "properties": {"zip": {"type": "string"}}},
    }
    assert check(spec, {"lines": [{"qty": 1}], "address": {"zip": "28001"}}) is None
    assert "`$.lines[1]`" in (check(spec, {"lines": [{"qty": 1}, {}]}) or "")
    assert "`$.address.zip`" in (check(spec, {"address": {"zip": 28001}}) or "")


@pytest.mark.parametrize("name", ["df-order id", "1st", "class", "__init__", "", "a.b"])
def test_any_property_name_compiles(name):
    """Property names are JSON keys, not Python identifiers."""
    spec = {name: {"type": "integer", "required": True}}
    assert check(spec, {name: 1}) is None
    assert name in (check(spec, {name: "x"}) or check(spec, {}) or "")


def test_a_name_defined_twice_is_refused():
    with pytest.raises(DefinitionError, match="defined twice"):
        compile_definitions([Definition(name="a"), Definition(name="a")])


def test_the_accounts_view_names_the_bad_property():
    view = AccountView(
        account=accounts.Account(name="acme", created_at=datetime.now(UTC)),
        definitions=compile_definitions(
            [Definition(name="sale", properties={"qty": PropertySpec("integer", required=True)})]
        ),
        definitions_version=1,
    )
    assert view.check_event("sale", {"qty": 1}) is None
    missing = view.check_event("sale", {})
    assert missing is not None
    assert missing.field == "properties.qty"
    assert view.check_event("other", {}) is None
    unregistered = view.check_event("other", {}, registered_only=True)
    assert unregistered is not None
    assert unregistered.field == "name"


# Parsing definition files.

YAML = b"""
- name: EventSale
  description: A product sold
  properties:
    productCode: {type: string, required: true}
    quantity: {type: integer, required: true}
- name: df_refund
  properties:
    df_total_refund_amount:
      type: number
"""


def test_yaml_list_is_parsed():
    sale, refund = parse_definitions(YAML)
    assert sale.name == "EventSale"
    assert sale.description == "A product sold"
    assert sale.properties["quantity"] == PropertySpec("integer", required=True)
    assert refund.properties["df_total_refund_amount"] == PropertySpec("number")


def test_json_list_and_single_object_are_parsed():
    one = {"name": "a", "properties": {"x": {"type": "boolean"}}}
    assert parse_definitions(json.dumps([one]).encode()) == parse_definitions(
        json.dumps(one).encode()
    )


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"- name: a\n  properties:\n    x: {type: strin}\n", "#1 (a): property x: Invalid enum"),
        (b"- name: a\n  properties:\n    x: {type: string, requried: true}\n", "requried"),
        (b"- {name: a, properties: {l: {type: array, items: {type: strin}}}}", "property l[]:"),
        (b"a: &a [*a]", "invalid YAML"),
        (b"- name: a\n  properties: [\n", "invalid YAML"),
        (b'[{"name": "a"', "invalid definitions"),
        (b"", "invalid definitions"),
        (b"just text", "invalid definitions"),
        (b'[{"name": ""}]', "length >= 1"),
        (b'[{"properties": {}}]', "name"),
    ],
)
def test_bad_files_raise_a_definition_error_that_says_where(data, says):
    with pytest.raises(DefinitionError, match=re.escape(says)):
        parse_definitions(data)


# The definitions shipped with the dialects.


def test_catalog_ships_its_event_types_with_their_required_fields():
    catalog = builtin_definitions("catalog")
    required = {
        name: {p for p, spec in c.definition.properties.items() if spec.required}
        for name, c in catalog.items()
    }
    assert required["EventSale"] == {"customerCode", "productCode", "quantity"}
    assert required["EventProductViewed"] == {"customerCode", "productCode"}
    for name in ("EventAddedToCart", "EventRemovedFromCart", "EventSearch", "EventPurchase"):
        assert "customerCode" in required[name]


def test_import_ships_the_vendors_standard_events():
    shipped = builtin_definitions("import")
    for name in (
        "df_login", "df_logout", "df_sign_up", "df_purchase", "df_refund",
        "df_view_product_details", "df_add_to_cart", "df_remove_cart", "df_add_to_wishlist",
        "df_view_search_result", "df_share_product",
    ):  # fmt: skip
        assert name in shipped
    purchase = shipped["df_purchase"].definition.properties
    assert purchase["df_order_id"].type == "string"
    assert purchase["df_total_purchase_amount"].type == "number"
    assert builtin_definitions("native") == {}


# The admin API.

SALE = {"properties": {"sku": {"type": "string", "required": True}}}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_put_get_list_delete(gateway, key):
    client = await gateway()
    created = await client.put("/v1/definitions/sale", json=SALE, headers=auth(key))
    assert created.status == 201
    assert await created.json() == {"name": "sale", **SALE}
    replaced = await client.put(
        "/v1/definitions/sale", json={"name": "ignored", **SALE}, headers=auth(key)
    )
    assert replaced.status == 200  # and the name in the path wins
    one = await client.get("/v1/definitions/sale", headers=auth(key))
    assert await one.json() == {"name": "sale", **SALE}
    await client.put("/v1/definitions/a%2Fb", json={}, headers=auth(key))
    listed = await client.get("/v1/definitions", headers=auth(key))
    assert [d["name"] for d in (await listed.json())["definitions"]] == ["a/b", "sale"]
    deleted = await client.delete("/v1/definitions/sale", headers=auth(key))
    assert deleted.status == 204
    again = await client.delete("/v1/definitions/sale", headers=auth(key))
    assert again.status == 404
    assert again.content_type == "application/problem+json"
    missing = await client.get("/v1/definitions/sale", headers=auth(key))
    assert missing.status == 404


async def test_a_definition_put_is_used_by_the_front_door(gateway, key):
    client = await gateway(key_cache_s=0.05)
    event = {"type": "EventCoupon", "code": 5}
    assert (await client.post("/events", json=event, headers=auth(key))).status == 202
    body = {"properties": {"code": {"type": "string"}}}
    assert (await client.put("/v1/definitions/EventCoupon", json=body, headers=auth(key))).ok
    await asyncio.sleep(0.1)
    assert (await client.post("/events", json=event, headers=auth(key))).status == 400


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b'{"properties": {"x": {"type": "strin"}}}', 422, "property x: Invalid enum value"),
        (b'{"properties": {"x": {"type": "string", "requried": true}}}', 422, "requried"),
        (b'{"propertys": {}}', 422, "propertys"),
        (b"[]", 422, "object"),
        (b'{"properties": ', 400, "line 1"),
        (b"", 400, "invalid JSON"),
    ],
)
async def test_invalid_definitions_are_refused_as_problems(
    gateway, key, fake_redis, body, status, detail
):
    client = await gateway()
    response = await client.put("/v1/definitions/x", data=body, headers=auth(key))
    assert response.status == status
    assert response.content_type == "application/problem+json"
    assert detail in (await response.json())["detail"]
    assert await list_definitions(fake_redis, "acme") == []


async def test_a_name_over_256_characters_is_422(gateway, key):
    client = await gateway()
    response = await client.put(f"/v1/definitions/{'n' * 257}", json={}, headers=auth(key))
    assert response.status == 422


async def test_public_key_is_403_and_no_key_401(gateway, key, fake_redis):
    public = await accounts.create_key(fake_redis, "acme", "public")
    client = await gateway()
    assert (await client.get("/v1/definitions", headers=auth(public))).status == 403
    put = await client.put("/v1/definitions/x", json={}, headers=auth(public))
    assert put.status == 403
    assert (await client.get("/v1/definitions")).status == 401
    assert await list_definitions(fake_redis, "acme") == []


async def test_another_accounts_key_never_sees_nor_changes_these_definitions(
    gateway, key, fake_redis
):
    await put_definition(fake_redis, "acme", Definition(name="sale"))
    await accounts.create_account(fake_redis, "rival")
    rival = await accounts.create_key(fake_redis, "rival", "private")
    client = await gateway()
    listed = await client.get("/v1/definitions", headers=auth(rival))
    assert await listed.json() == {"definitions": []}
    assert (await client.get("/v1/definitions/sale", headers=auth(rival))).status == 404
    assert (await client.delete("/v1/definitions/sale", headers=auth(rival))).status == 404
    assert (await client.put("/v1/definitions/sale", json=SALE, headers=auth(rival))).ok
    assert await list_definitions(fake_redis, "acme") == [Definition(name="sale")]
    [theirs] = await list_definitions(fake_redis, "rival")
    assert theirs.properties["sku"].required


async def test_redis_down_is_503(gateway, key, fake_server):
    client = await gateway()
    assert (await client.get("/v1/definitions", headers=auth(key))).status == 200  # key cached
    fake_server.connected = False
    response = await client.get("/v1/definitions", headers=auth(key))
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    fake_server.connected = True


# The CLI, over fakeredis.


@pytest.fixture
def run_cli(fake_server, monkeypatch):  # type: ignore[no-untyped-def]
    """Run `eventgate ARGS...` against the fake Redis; returns the result."""

    @contextmanager
    def fake(_settings):  # type: ignore[no-untyped-def]
        yield fakeredis.FakeAsyncRedis(server=fake_server)

    monkeypatch.setattr(cli, "_redis", fake)
    runner = CliRunner()
    return lambda *args: runner.invoke(cli.app, list(args))


def redis_call(fake_server, call):  # type: ignore[no-untyped-def]
    """Run `call(client)` on a fresh client of the fake server, in its own event loop."""

    async def go():  # type: ignore[no-untyped-def]
        client = fakeredis.FakeAsyncRedis(server=fake_server)
        try:
            return await call(client)
        finally:
            await client.aclose()

    return asyncio.run(go())


@pytest.fixture
def acme(fake_server):  # type: ignore[no-untyped-def]
    redis_call(fake_server, lambda client: accounts.create_account(client, "acme"))
    return "acme"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_cli_loads_a_file_and_lists_it(run_cli, acme, fake_server, tmp_path, suffix):
    path = tmp_path / f"definitions{suffix}"
    data = YAML if suffix == ".yaml" else json.dumps(
        [{"name": "EventSale", "properties": {"quantity": {"type": "integer", "required": True}}},
         {"name": "df_refund"}]
    ).encode()  # fmt: skip
    path.write_bytes(data)
    loaded = run_cli("definitions", "load", acme, str(path))
    assert loaded.exit_code == 0, loaded.output
    assert "loaded 2 definition(s)" in loaded.output
    stored = redis_call(fake_server, lambda client: list_definitions(client, acme))
    assert [d.name for d in stored] == ["EventSale", "df_refund"]
    listed = run_cli("definitions", "list", acme)
    assert listed.exit_code == 0
    assert "EventSale" in listed.output
    assert "quantity: integer*" in listed.output


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"- name: a\n  properties:\n    x: {type: strin}\n", "property x: Invalid enum"),
        (b"- name: a\n- name: a\n", "defined twice"),
        (None, "cannot read"),
    ],
)
def test_cli_refuses_a_bad_file_clearly(run_cli, acme, fake_server, tmp_path, content, says):
    path = tmp_path / "defs.yaml"
    if content is not None:
        path.write_bytes(content)
    result = run_cli("definitions", "load", acme, str(path))
    assert result.exit_code == 1
    assert says in result.output
    assert "Traceback" not in result.output
    assert redis_call(fake_server, lambda client: list_definitions(client, acme)) == []


def test_cli_refuses_an_unknown_account(run_cli, tmp_path):
    path = tmp_path / "defs.yaml"
    path.write_bytes(YAML)
    for args in (("load", "nobody", str(path)), ("list", "nobody")):
        result = run_cli("definitions", *args)
        assert result.exit_code == 1
        assert "no account 'nobody'" in result.output


def test_cli_sets_whether_an_account_accepts_unregistered_events(run_cli, acme, fake_server):
    def stored() -> bool:
        account = redis_call(fake_server, lambda client: accounts.get_account(client, acme))
        return bool(account.accept_unregistered)

    assert stored()
    result = run_cli("accounts", "set", acme, "--no-accept-unregistered")
    assert result.exit_code == 0, result.output
    assert "accepts unregistered events: False" in result.output
    assert not stored()
    assert run_cli("accounts", "set", acme, "--accept-unregistered").exit_code == 0
    assert stored()
    assert run_cli("accounts", "set", "nobody", "--accept-unregistered").exit_code == 1
