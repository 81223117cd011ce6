"""Front-door fixtures: the app over fakeredis, an account and its keys; a worker into SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import fakeredis
import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from rq import Queue

from ingest.app import make_app
from ingest.server import RUNNER_OPTIONS
from shared import accounts
from shared.envelope import EnvelopeSerializer
from shared.settings import Settings, load_settings
from workers import jobs as worker_jobs
from workers.processor import BatchProcessor
from workers.sinks import open_sink
from workers.worker import GatewayWorker

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        {"EVENTGATE_DATA_DIR": str(tmp_path), "EVENTGATE_QUEUE": "unit", "EVENTGATE_SHARDS": "1"}
    )


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


@pytest.fixture
def sync_redis(fake_server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fake_server)


@pytest.fixture
def sink_path(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
def run_worker(sync_redis, sink_path, settings: Settings):  # type: ignore[no-untyped-def]
    """Run a burst worker over the queue: every job, then return."""

    def run(max_riders: int = settings.worker_max_riders) -> None:
        sink = open_sink(f"sqlite:///{sink_path}")
        worker_jobs.install(BatchProcessor(sink, sync_redis))
        try:
            queue = Queue(settings.queue, connection=sync_redis, serializer=EnvelopeSerializer)
            worker = GatewayWorker(
                [queue], connection=sync_redis, heartbeat_s=2, max_riders=max_riders
            )
            worker.work(burst=True, logging_level="WARNING")
        finally:
            worker_jobs.install(None)
            sink.close()

    return run
