"""The five event APIs side by side, for tests that send the same hostile thing to each: how
to address a request to one, how to wrap events in its body, and what its errors look like;
and a gzip bomb."""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shared import accounts
from shared.definitions import Definition, put_definition
from shared.persons import index_person

if TYPE_CHECKING:
    import aiohttp

ACCOUNT = "acme"
PERSON = "p-1"
DEFINITION = "addToCart"


@dataclass(frozen=True)
class Keys:
    private: str
    public: str


@dataclass(frozen=True)
class Dialect:
    name: str
    ok: int  # the status of a success
    target: Callable[[Keys], tuple[str, dict[str, str]]]  # (path and query, headers)
    body: Callable[[list[dict[str, Any]]], Any]  # events -> the body's JSON value
    event: Callable[[dict[str, Any], str | None], dict[str, Any]]  # (properties, time) -> event
    time_field: str | None  # where the event's time goes; None: the dialect takes none
    media: str  # the content type of its errors

    def request(self, keys: Keys, events: list[dict[str, Any]]) -> tuple[str, dict, bytes]:
        """(path, headers, body) of a request of `events` with `keys`."""
        path, headers = self.target(keys)
        return path, headers, json.dumps(self.body(events)).encode()

    def one(self, properties: dict[str, Any] | None = None, time: str | None = None) -> bytes:
        return json.dumps(self.body([self.event(properties or {}, time)])).encode()


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _timed(event: dict[str, Any], field: str, time: str | None) -> dict[str, Any]:
    return {**event, field: time} if time is not None else event


NATIVE = Dialect(
    "native",
    202,
    lambda k: ("/v1/events", {"Authorization": f"Bearer {k.private}"}),
    lambda events: events,
    lambda props, time: _timed({"name": "e", "properties": props}, "timestamp", time),
    "timestamp",
    "application/problem+json",
)
CATALOG = Dialect(
    "catalog",
    202,
    lambda k: ("/events", {"Authorization": f"Bearer {k.private}"}),
    lambda events: events,
    lambda props, time: _timed(
        {"type": "Other", "customerCode": "c-1", **props}, "timestamp", time
    ),
    "timestamp",
    "application/json",
)
IMPORT = Dialect(
    "import",
    200,
    lambda k: (f"/api/v1/events?service_id={ACCOUNT}", {"access_token": k.private}),
    lambda events: {"common": {"identity": {"external_id": "u-1"}}, "events": events},
    lambda props, time: {
        "event_log_id": str(uuid.uuid4()),
        "event_name": "df_login",
        "event_datetime": time or _now(),
        "event_properties": props,
    },
    "event_datetime",
    "application/json",
)
PEOPLE = Dialect(
    "people",
    201,
    lambda k: (
        f"/peopleevents/2/persons/{PERSON}/definitions/{DEFINITION}/events?identifierType=ID",
        {"Authorization": f"App {k.private}"},
    ),
    lambda events: events[0],
    lambda props, _time: {"properties": props},
    None,
    "application/json",
)
BULK = Dialect(
    "bulk",
    202,
    lambda k: (f"/client/event-bulk-create/?company_id={k.public}", {"revision": "2024-10-15"}),
    lambda events: {
        "data": {
            "type": "event-bulk-create",
            "attributes": {
                "profile": {"data": {"type": "profile", "attributes": {"external_id": "u-1"}}},
                "events": {"data": events},
            },
        }
    },
    lambda props, time: {
        "type": "event",
        "attributes": _timed(
            {
                "metric": {"data": {"type": "metric", "attributes": {"name": "Viewed"}}},
                "properties": props,
            },
            "time",
            time,
        ),
    },
    "time",
    "application/vnd.api+json",
)
DIALECTS = [NATIVE, CATALOG, IMPORT, PEOPLE, BULK]
TIMED = [d for d in DIALECTS if d.time_field]


async def make_account(client: Any, account: str = ACCOUNT) -> Keys:
    """An account with a private and a public key, the people dialect's person and definition."""
    await accounts.create_account(client, account)
    keys = Keys(
        private=await accounts.create_key(client, account, "private"),
        public=await accounts.create_key(client, account, "public"),
    )
    await index_person(client, account, PERSON, {})
    await put_definition(client, account, Definition(name=DEFINITION))
    return keys


async def check_error(dialect: Dialect, response: aiohttp.ClientResponse, status: int) -> str:
    """Assert `response` is a `status` in `dialect`'s own error shape; return its message."""
    assert response.status == status, await response.text()
    assert response.content_type == dialect.media, response.content_type
    body = await response.json()
    if dialect is NATIVE:
        assert body["status"] == status
        assert body["type"].startswith("https://")
        assert body["request_id"]
        return str(body["detail"])
    if dialect is CATALOG:
        assert set(body["error"]) >= {"code", "message", "requestId"}
        return str(body["error"]["message"])
    if dialect is IMPORT:
        assert body["status"] is False
        assert len(body["code"]) == 5
        assert body["code"].isdigit()
        return json.dumps(body["data"])
    if dialect is PEOPLE:
        exception = body["requestError"]["serviceException"]
        assert exception["messageId"]
        return str(exception["text"])
    [first, *_] = body["errors"]
    assert first["status"] == status
    assert set(first) >= {"id", "code", "title", "detail", "source", "meta"}
    return " ".join(str(e["detail"]) for e in body["errors"])


def gzip_bomb(inflated: int) -> bytes:
    """A gzip member of `inflated` zero bytes, made in a blink: blocks after a full flush stand
    alone, so one is repeated. Its trailer's checksum is wrong: a server inflating all of it
    finds out at the very end, one with a cap never gets there."""
    chunk = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    head = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    return head + block * (inflated // len(chunk) - 1) + deflate.flush()
