"""Front-door fixtures: the app over fakeredis, an account and its keys."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import fakeredis
import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ingest.app import make_app
from ingest.server import RUNNER_OPTIONS
from shared import accounts
from shared.settings import Settings, load_settings

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({"EVENTGATE_DATA_DIR": str(tmp_path), "EVENTGATE_QUEUE": "unit"})


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
async def fake_redis(fake_server: fakeredis.FakeServer) -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis(server=fake_server)
    yield client
    await client.aclose()


MakeClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def gateway(aiohttp_client, fake_redis, settings) -> MakeClient:  # type: ignore[no-untyped-def]
    """Factory: a test client of the front door, with settings overridden by keyword."""

    async def make(**overrides: object) -> TestClient:
        app_settings = msgspec.structs.replace(settings, **overrides) if overrides else settings
        server = TestServer(make_app(app_settings, fake_redis))
        await server.start_server(**RUNNER_OPTIONS)
        return await aiohttp_client(server)

    return make


@pytest.fixture
async def key(fake_redis) -> str:  # type: ignore[no-untyped-def]
    await accounts.create_account(fake_redis, "acme")
    return await accounts.create_key(fake_redis, "acme", "private")
