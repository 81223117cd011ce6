"""Every limit of "Limits and security" provoked on its own: the status and the dialect's own
error shape, nothing queued from the hostile request, and a well-behaved client served while
it happens."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from ingest.app import make_app
from ingest.connections import CONNECTIONS
from ingest.server import RUNNER_OPTIONS
from shared.formats import normalise
from shared.settings import Settings
from tests.dialects import (
    CATALOG,
    DIALECTS,
    NATIVE,
    PEOPLE,
    TIMED,
    Dialect,
    Keys,
    check_error,
    gzip_bomb,
    make_account,
)
from tests.support import queued_batches

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

ROOT = Path(__file__).resolve().parents[2]
GOOD = b'{"name": "good"}'
# Rate limits are a limit of their own (tests/unit/test_ratelimit.py): off here.
QUIET = {"request_limits": False}
EVENT_LEVEL = {NATIVE.name: 422}  # the others answer an invalid event with a plain 400


@pytest.fixture
async def keys(fake_redis) -> Keys:
    return await make_account(fake_redis)


async def good_request(client: Any, keys: Keys) -> int:
    response = await client.post(
        "/v1/events", data=GOOD, headers={"Authorization": f"Bearer {keys.private}"}
    )
    return int(response.status)


async def only_good_queued(fake_redis, good: int = 1) -> None:
    """What was queued is the well-behaved client's events, nothing of the hostile request."""
    parts = [part for batch in await queued_batches(fake_redis) for part in batch.parts]
    assert [part.body for part in parts] == [GOOD] * good


async def hostile_and_good(
    client: Any,
    keys: Keys,
    dialect: Dialect,
    body: Any,
    headers: dict[str, str] | None = None,
) -> aiohttp.ClientResponse:
    """Send `body` to `dialect` and a valid native request at the same time; the valid one
    must be accepted. Returns the hostile request's answer."""
    path, base = dialect.target(keys)
    if isinstance(body, bytes) and len(body) > 1 << 20:
        body = io.BytesIO(body)  # aiohttp's client warns of big bytes bodies
    hostile, good = await asyncio.gather(
        client.post(path, data=body, headers={**base, **(headers or {})}),
        good_request(client, keys),
    )
    assert good == 202
    return hostile  # type: ignore[no-any-return]


# --- body size, gzip --------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
async def test_declared_body_over_the_limit_is_413_unread(gateway, fake_redis, keys, dialect):
    client = await gateway(max_body_bytes=1000, **QUIET)
    body = dialect.one({"text": "x" * 2000})
    response = await hostile_and_good(client, keys, dialect, body)
    await check_error(dialect, response, 413)
    assert response.headers["Connection"] == "close"
    await only_good_queued(fake_redis)


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
async def test_chunked_body_over_the_limit_is_413(gateway, fake_redis, keys, dialect):
    """No length declared: reading stops at the cap."""
    client = await gateway(max_body_bytes=1000, **QUIET)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield b" " * 100

    response = await hostile_and_good(client, keys, dialect, chunks())
    await check_error(dialect, response, 413)
    await only_good_queued(fake_redis)


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
async def test_gzip_bomb_is_413_in_bounded_memory(gateway, fake_redis, keys, dialect):
    """1 GiB of zeros in about 1 MB is refused after inflating the cap, not the bomb."""
    client = await gateway(**QUIET)
    bomb = gzip_bomb(1 << 30)
    assert len(bomb) < 2 << 20
    response = await hostile_and_good(client, keys, dialect, bomb, {"Content-Encoding": "gzip"})
    assert "inflates" in await check_error(dialect, response, 413)
    await only_good_queued(fake_redis)


async def test_a_second_gzip_member_is_refused_not_dropped(gateway, fake_redis, keys):
    """What follows the first gzip member would be silently ignored: refuse the body."""
    client = await gateway(**QUIET)
    body = gzip.compress(NATIVE.one()) + gzip.compress(b"[]")
    response = await hostile_and_good(client, keys, NATIVE, body, {"Content-Encoding": "gzip"})
    await check_error(NATIVE, response, 400)
    await only_good_queued(fake_redis)


# --- the body's shape ---------------------------------------------------------------------------


def nested(depth: int) -> dict[str, Any]:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"a": value}
    return value  # type: ignore[no-any-return]


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
async def test_nesting_deeper_than_the_cap_is_400(gateway, fake_redis, keys, dialect):
    """Counted over the whole body: 40 levels of properties exceed 32 in any dialect."""
    client = await gateway(**QUIET)
    response = await hostile_and_good(client, keys, dialect, dialect.one({"deep": nested(40)}))
    assert "more than 32 levels" in await check_error(dialect, response, 400)
    await only_good_queued(fake_redis)


async def test_nesting_up_to_the_cap_is_accepted(gateway, fake_redis, keys):
    """A value inside exactly 32 arrays or objects passes; one more level does not."""
    client = await gateway(**QUIET)
    headers = {"Authorization": f"Bearer {keys.private}"}
    at_cap = json.dumps([{"name": "e", "properties": nested(30)}]).encode()  # 1 + 1 + 30
    assert (await client.post("/v1/events", data=at_cap, headers=headers)).status == 202
    over = json.dumps([{"name": "e", "properties": nested(31)}]).encode()
    assert (await client.post("/v1/events", data=over, headers=headers)).status == 400


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
async def test_a_string_longer_than_the_cap_is_400(gateway, fake_redis, keys, dialect):
    client = await gateway(max_string_bytes=1000, **QUIET)
    body = dialect.one({"note": 'ab\\"' + "x" * 1000})
    response = await hostile_and_good(client, keys, dialect, body)
    message = await check_error(dialect, response, 400)
    assert "bytes" in message
    assert "at most 1000" in message
    await only_good_queued(fake_redis)


async def test_a_key_longer_than_the_cap_is_400_and_escapes_count_as_sent(gateway, keys):
    client = await gateway(max_string_bytes=10, **QUIET)
    headers = {"Authorization": f"Bearer {keys.private}"}

    async def post(body: bytes) -> int:
        return int((await client.post("/v1/events", data=body, headers=headers)).status)

    assert await post(b'{"name": "e", "properties": {"k1234567890": 1}}') == 400
    assert await post(b'{"name": "e", "properties": {"k": "\\"\\"\\"\\"\\""}}') == 202
    assert await post(b'{"name": "e", "properties": {"k": "\\"\\"\\"\\"\\"\\""}}') == 400


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
async def test_more_properties_than_the_cap_are_refused(gateway, fake_redis, keys, dialect):
    client = await gateway(**QUIET)
    body = dialect.one({f"p{i}": i for i in range(1001)})
    response = await hostile_and_good(client, keys, dialect, body)
    message = await check_error(dialect, response, EVENT_LEVEL.get(dialect.name, 400))
    assert "at most 1000" in message
    await only_good_queued(fake_redis)


@pytest.mark.parametrize(
    ("dialect", "items"),
    [(NATIVE, "items"), (CATALOG, "itemsInCart"), (PEOPLE, "itemsInCart")],
    ids=lambda v: getattr(v, "name", v),
)
async def test_more_items_than_the_cap_are_refused(gateway, fake_redis, keys, dialect, items):
    client = await gateway(max_items=5, **QUIET)
    event = dialect.event({}, None)
    # Native items are a field; the vendors' (itemsInCart) are among the event's properties.
    (event["properties"] if dialect is PEOPLE else event)[items] = [{"sku": "s"}] * 6
    body = json.dumps(dialect.body([event])).encode()
    response = await hostile_and_good(client, keys, dialect, body)
    assert "at most 5" in await check_error(dialect, response, EVENT_LEVEL.get(dialect.name, 400))
    await only_good_queued(fake_redis)


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
async def test_invalid_utf8_in_a_string_is_400(gateway, fake_redis, keys, dialect):
    """msgspec raises UnicodeDecodeError here, not a DecodeError: it was a 500 once."""
    client = await gateway(**QUIET)
    body = dialect.one({"name": "PLACEHOLDER"}).replace(b"PLACEHOLDER", b"caf\xe9")
    response = await hostile_and_good(client, keys, dialect, body)
    assert "UTF-8" in await check_error(dialect, response, 400)
    await only_good_queued(fake_redis)


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
async def test_a_nul_character_is_400(gateway, fake_redis, keys, dialect):
    """PostgreSQL cannot store it, and it would fail the whole job it was grouped into."""
    client = await gateway(**QUIET)
    response = await hostile_and_good(client, keys, dialect, dialect.one({"x": "a\x00b"}))
    assert "NUL" in await check_error(dialect, response, 400)
    await only_good_queued(fake_redis)


async def test_an_escaped_backslash_before_u0000_is_text_not_nul(gateway, keys):
    client = await gateway(**QUIET)
    body = json.dumps({"name": "e", "properties": {"path": "C:\\u0000"}}).encode()
    assert b"\\\\u0000" in body
    headers = {"Authorization": f"Bearer {keys.private}"}
    assert (await client.post("/v1/events", data=body, headers=headers)).status == 202


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
async def test_nan_and_infinity_are_refused(gateway, fake_redis, keys, dialect, literal):
    """Not JSON (NaN, Infinity) or out of a float's range (1e400): never stored as null."""
    client = await gateway(**QUIET)
    body = dialect.one({"x": 0}).replace(b'"x": 0', b'"x": ' + literal)
    response = await hostile_and_good(client, keys, dialect, body)
    assert response.status in (400, 422)
    await check_error(dialect, response, response.status)
    await only_good_queued(fake_redis)


async def test_duplicate_keys_the_last_wins_and_every_one_is_checked(gateway, fake_redis, keys):
    """Documented: the last occurrence wins, at the front door and in the worker alike, and
    an invalid earlier occurrence still refuses the event (nothing slips past validation)."""
    client = await gateway(**QUIET)
    headers = {"Authorization": f"Bearer {keys.private}"}
    twice = b'{"name": "first", "name": "last", "properties": {"a": 1, "a": 2}}'
    assert (await client.post("/v1/events", data=twice, headers=headers)).status == 202
    [batch] = await queued_batches(fake_redis)
    [event] = normalise(batch.parts[0])
    assert (event.name, event.properties) == ("last", {"a": 2})
    invalid_first = b'{"name": 5, "name": "last"}'
    response = await client.post("/v1/events", data=invalid_first, headers=headers)
    await check_error(NATIVE, response, 422)
    assert len(await queued_batches(fake_redis)) == 1


@pytest.mark.parametrize("when", ["1999-01-01T00:00:00Z", "2999-01-01T00:00:00Z"])
@pytest.mark.parametrize("dialect", TIMED, ids=lambda d: d.name)
async def test_timestamps_outside_the_window_are_refused(gateway, fake_redis, keys, dialect, when):
    """More than EVENTGATE_MAX_PAST_S back (10 years) or MAX_FUTURE_S ahead (a day)."""
    client = await gateway(**QUIET)
    response = await hostile_and_good(client, keys, dialect, dialect.one({}, when))
    message = await check_error(dialect, response, EVENT_LEVEL.get(dialect.name, 400))
    assert "too far in the" in message
    await only_good_queued(fake_redis)


async def test_the_time_window_is_configurable(gateway, keys):
    client = await gateway(max_past_s=60, **QUIET)
    headers = {"Authorization": f"Bearer {keys.private}"}
    hour_ago = NATIVE.one({}, "2000-01-01T00:00:00Z")
    assert (await client.post("/v1/events", data=hour_ago, headers=headers)).status == 422


# --- hostile clients: a real socket server --------------------------------------------------------


@dataclass
class Live:
    app: web.Application
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def live(fake_redis, settings) -> AsyncIterator[Callable[..., Awaitable[Live]]]:
    """Factory: the front door on a real port, counting connections as `eventgate serve`."""
    runners: list[web.AppRunner] = []

    async def start(**overrides: object) -> Live:
        app = make_app(msgspec.structs.replace(settings, **QUIET, **overrides), fake_redis)
        runner = web.AppRunner(app, shutdown_timeout=1, **RUNNER_OPTIONS)  # type: ignore[arg-type]
        await runner.setup()
        assert runner.server is not None
        app[CONNECTIONS].attach(runner.server)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return Live(app, runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


async def good_from(live: Live, keys: Keys, host: str = "127.0.0.1") -> int:
    """A well-behaved client's request, from `host` (any 127.x address is this machine)."""
    connector = aiohttp.TCPConnector(local_addr=(host, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        response = await session.post(
            f"{live.url}/v1/events", data=GOOD, headers={"Authorization": f"Bearer {keys.private}"}
        )
        return response.status


async def open_raw(live: Live) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", live.port)


def head(dialect: Dialect, keys: Keys, length: int, extra: str = "") -> bytes:
    path, headers = dialect.target(keys)
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + extra + "\r\n\r\n").encode()


async def read_answer(
    reader: asyncio.StreamReader, timeout_s: float = 5
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one HTTP answer."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    status_line, *lines = raw.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return int(status_line.split()[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bool:
    with suppress(ConnectionError):
        return await asyncio.wait_for(reader.read(), within_s) == b""
    return True


class RawAnswer:
    """A raw answer seen through the interface check_error reads."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.content_type = headers.get("content-type", "").split(";")[0]
        self._body = body

    async def json(self) -> Any:
        return json.loads(self._body)

    async def text(self) -> str:
        return self._body.decode()


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
async def test_a_slow_body_is_408_and_closed(live, fake_redis, keys, dialect):
    """Headers at once, then a trickle: answered 408 when the body deadline passes."""
    server = await live(body_timeout_s=0.5)
    reader, writer = await open_raw(server)
    writer.write(head(dialect, keys, 1000) + b"{")
    await writer.drain()
    assert await good_from(server, keys) == 202
    status, headers, body = await read_answer(reader)
    await check_error(dialect, RawAnswer(status, headers, body), 408)  # type: ignore[arg-type]
    assert headers["connection"] == "close"
    assert await closed_by_server(reader, 4)  # once it stops reading on (LINGER_S)
    writer.close()
    await only_good_queued(fake_redis)


async def test_slow_headers_are_cut_off_at_the_keepalive_timeout(live, fake_redis, keys):
    """A slowloris client sending a header byte now and then is closed; others are served."""
    server = await live(keepalive_timeout_s=0.5)
    reader, writer = await open_raw(server)
    start = asyncio.get_running_loop().time()
    with suppress(ConnectionError):
        for byte in head(NATIVE, keys, 2):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
            if reader.at_eof():
                break
    assert await closed_by_server(reader, 2)
    assert asyncio.get_running_loop().time() - start < 3
    assert await good_from(server, keys) == 202
    writer.close()
    await only_good_queued(fake_redis)


@pytest.mark.parametrize("what", ["one long header", "too many headers", "a long request line"])
async def test_oversized_headers_are_refused_before_any_route(live, fake_redis, keys, what):
    """The HTTP parser answers before a route (and so a dialect) is known: 400 or 431."""
    server = await live(max_header_bytes=1024, max_headers=16)
    reader, writer = await open_raw(server)
    if what == "one long header":
        writer.write(head(NATIVE, keys, 2, "\r\nX-Big: " + "a" * 2000) + b"{}")
    elif what == "too many headers":
        many = "".join(f"\r\nX-H{i}: v" for i in range(20))
        writer.write(head(NATIVE, keys, 2, many) + b"{}")
    else:
        writer.write(b"POST /v1/events?" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert await good_from(server, keys) == 202
    status, _, _ = await read_answer(reader)
    assert status in (400, 431)
    writer.close()
    await only_good_queued(fake_redis)


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
async def test_connections_past_the_per_address_cap_get_429_and_are_closed(
    live, fake_redis, keys, dialect
):
    server = await live(max_connections_per_ip=2)
    idle = [await open_raw(server) for _ in range(2)]
    reader, writer = await open_raw(server)
    body = dialect.one()
    writer.write(head(dialect, keys, len(body)) + body)
    await writer.drain()
    status, headers, answer = await read_answer(reader)
    await check_error(dialect, RawAnswer(status, headers, answer), 429)  # type: ignore[arg-type]
    assert headers["retry-after"] == "1"
    assert await closed_by_server(reader, 2)
    writer.close()
    # Another address is not held back; this one is served again once it lets go.
    assert await good_from(server, keys, host="127.0.0.2") == 202
    for _, idle_writer in idle:
        idle_writer.close()
    await asyncio.sleep(0.1)
    assert server.app[CONNECTIONS].open_count("127.0.0.1") == 0
    assert await good_from(server, keys) == 202
    await only_good_queued(fake_redis, good=2)


async def test_a_connection_past_the_cap_that_sends_nothing_is_closed(live, keys, monkeypatch):
    monkeypatch.setattr("ingest.connections.GRACE_S", 0.2)
    server = await live(max_connections_per_ip=1)
    first = await open_raw(server)
    reader, writer = await open_raw(server)
    assert await closed_by_server(reader, 2)
    assert not first[0].at_eof()
    first[1].close()
    writer.close()


# --- the settings ---------------------------------------------------------------------------------

LIMITS = [
    "max_body_bytes",
    "max_decompressed_bytes",
    "max_gzip_ratio",
    "max_events",
    "max_depth",
    "max_string_bytes",
    "max_properties",
    "max_items",
    "max_past_s",
    "max_future_s",
    "body_timeout_s",
    "keepalive_timeout_s",
    "max_header_bytes",
    "max_headers",
    "max_connections_per_ip",
]


def test_every_limit_is_a_setting_documented_with_its_default():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Limits and security", 1)[1].split("\n## ", 1)[0]
    defaults = Settings()  # type: ignore[call-arg]
    for name in LIMITS:
        variable = f"EVENTGATE_{name.upper()}"
        assert variable in section, variable
        assert name in Settings.__struct_fields__
        assert getattr(defaults, name) is not None


def test_the_defaults_are_the_issues():
    defaults = Settings()  # type: ignore[call-arg]
    assert defaults.max_depth == 32
    assert defaults.max_string_bytes == 64 * 1024
    assert defaults.max_properties == 1000
    assert defaults.max_future_s == 86_400
    assert 9 * 365 * 86_400 < defaults.max_past_s < 11 * 365 * 86_400


async def test_broken_chunked_encoding_is_400_not_a_crash(live, fake_redis, keys):
    server = await live()
    reader, writer = await open_raw(server)
    path, headers = NATIVE.target(keys)
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Transfer-Encoding: chunked"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + b"5\r\n[{}]\r\nzz\r\n")
    await writer.drain()
    assert await good_from(server, keys) == 202
    status, headers_in, body = await read_answer(reader)
    assert status == 400
    if headers_in.get("content-type", "").startswith("application/problem+json"):
        await check_error(NATIVE, RawAnswer(status, headers_in, body), 400)  # type: ignore[arg-type]
    writer.close()
    await only_good_queued(fake_redis)
