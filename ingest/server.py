"""Running the front door: one process, graceful on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
import structlog
from aiohttp import web

from ingest.app import make_app
from ingest.connections import CONNECTIONS

if TYPE_CHECKING:
    from shared.settings import Settings

log = structlog.get_logger("ingest.server")

# In-flight requests get this long to finish after SIGTERM.
SHUTDOWN_TIMEOUT_S = 30.0


def redis_client(settings: Settings, url: str) -> aioredis.Redis:
    """A client that fails fast when Redis is down (503 at once, not a hang) and
    reconnects by itself when it is back."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=10,
    )


# auto_decompress=False: ingest.body inflates gzip itself, under a cap. No access log: the
# app logs one line per refused request, and 202s at debug (a line per request costs).
RUNNER_OPTIONS: dict[str, object] = {"auto_decompress": False, "access_log": None}


def make_runner(app: web.Application) -> web.AppRunner:
    return web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT_S, **RUNNER_OPTIONS)  # type: ignore[arg-type]


async def serve(settings: Settings, redis_url: str) -> None:
    """Serve until SIGTERM or SIGINT, then let in-flight requests finish and flush."""
    client = redis_client(settings, redis_url)
    app = make_app(settings, client)
    runner = make_runner(app)
    await runner.setup()
    if runner.server is not None:  # set by setup()
        app[CONNECTIONS].attach(runner.server)
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    log.info("server.listening", url=f"http://{host}:{port}")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("server.stopping", grace_s=SHUTDOWN_TIMEOUT_S)
    await runner.cleanup()
    await client.aclose()
    log.info("server.stopped")
