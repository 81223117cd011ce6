"""The front door with a real redis.asyncio client and no working Redis behind it: a 503 with
Retry-After at once when the port refuses, and within the Redis timeout when the server is
silent; never a hang."""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
import socket
import time
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import pytest
from aiohttp.test_utils import TestServer

from ingest.app import make_app
from ingest.context import GATEWAY
from ingest.server import RUNNER_OPTIONS, redis_client
from shared.accounts import ApiKey
from shared.settings import load_settings

if TYPE_CHECKING:
    from collections.abc import Iterator

    import redis.asyncio as aioredis
    from aiohttp.test_utils import TestClient

pytestmark = pytest.mark.timeout(30)

REFUSED_BOUND_S = 0.5
SILENT_TIMEOUT_S = 1.0
SILENT_MARGIN_S = 0.75
EVENTS = [{"name": "sale", "id": "a"}, {"name": "view", "id": "b"}]


def port_outside_ephemeral_range() -> int:
    """A port nothing listens on, below the ephemeral range: a client connecting to a closed
    port inside that range may be handed the same port as its own (a TCP self-connect)."""
    low = 32768
    with suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randint(max(1024, low - 12000), low - 1)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections (the kernel does) but never reads or answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


@pytest.fixture
async def front_door(aiohttp_client, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: a test client of the front door whose Redis client points at `port`."""
    made: list[tuple[TestClient, aioredis.Redis]] = []

    async def make(port: int, *, cached_key: bool) -> tuple[TestClient, str]:
        settings = load_settings({"EVENTGATE_DATA_DIR": str(tmp_path), "EVENTGATE_QUEUE": "unit"})
        settings = msgspec.structs.replace(settings, redis_timeout_s=SILENT_TIMEOUT_S)
        redis = redis_client(settings, f"redis://127.0.0.1:{port}")
        app = make_app(settings, redis)
        key = make_key(app, cached=cached_key)
        server = TestServer(app)
        await server.start_server(**RUNNER_OPTIONS)
        client = await aiohttp_client(server)
        made.append((client, redis))
        return client, key

    yield make
    for client, redis in made:
        await client.close()  # the app and its flusher first, then the Redis client
        await redis.aclose()


def make_key(app, *, cached: bool) -> str:  # type: ignore[no-untyped-def]
    """A well-formed key; with `cached`, its record is already in the front door's key cache,
    so the request gets past authentication and meets Redis in the enqueuer instead."""
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    if cached:
        record = ApiKey(
            key_id=key_id,
            account="acme",
            kind="private",
            secret_sha256=hashlib.sha256(secret.encode()).hexdigest(),
            created_at=datetime.now(UTC),
        )
        app[GATEWAY].keys._entries[key_id] = (time.monotonic() + 3600, record)
    return f"eg_sk_{key_id}.{secret}"


async def post(client: TestClient, key: str) -> tuple[int, dict[str, str], bytes, float]:
    started = time.perf_counter()
    response = await client.post(
        "/v1/events", json=EVENTS, headers={"Authorization": f"Bearer {key}"}
    )
    body = await response.read()
    return response.status, dict(response.headers), body, time.perf_counter() - started


def assert_unavailable(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 503, body
    assert re.fullmatch(r"[0-9]+", headers.get("Retry-After", "")), headers
    assert headers["Content-Type"].split(";")[0] == "application/problem+json"
    problem = json.loads(body)
    assert problem["status"] == 503
    assert problem["type"].endswith("/unavailable")
    assert "Traceback" not in body.decode()


@pytest.mark.parametrize("cached_key", [False, True], ids=["key-lookup", "enqueue"])
async def test_refused_port_is_503_at_once(front_door, cached_key):
    """Nothing listening on Redis's port: the native route answers 503 + Retry-After in well
    under a second, whether the key lookup or the enqueue meets the refusal."""
    client, key = await front_door(port_outside_ephemeral_range(), cached_key=cached_key)
    for _ in range(3):  # and again: no state left behind makes the next one slower
        status, headers, body, elapsed_s = await post(client, key)
        assert_unavailable(status, headers, body)
        assert elapsed_s < REFUSED_BOUND_S, elapsed_s


@pytest.mark.parametrize("cached_key", [False, True], ids=["key-lookup", "enqueue"])
async def test_silent_server_is_503_within_the_redis_timeout(front_door, silent_server, cached_key):
    """A server that accepts TCP but never answers: the native route answers 503 +
    Retry-After once redis_timeout_s has passed, not later and never a hang."""
    client, key = await front_door(silent_server, cached_key=cached_key)
    status, headers, body, elapsed_s = await post(client, key)
    assert_unavailable(status, headers, body)
    assert SILENT_TIMEOUT_S * 0.8 <= elapsed_s < SILENT_TIMEOUT_S + SILENT_MARGIN_S, elapsed_s
