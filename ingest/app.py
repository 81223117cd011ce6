"""The aiohttp application: routes, middleware and the lifecycle of the flusher."""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis.exceptions
from aiohttp import web

from ingest import (
    account_api,
    admin,
    admission,
    connections,
    dashboard,
    openapi,
    persons_api,
    stats,
)
from ingest.accounts import AccountCache
from ingest.auth import KeyCache
from ingest.body import BodyLimits
from ingest.context import GATEWAY, Gateway
from ingest.dialects import bulk, catalog, import_, native, people
from ingest.enqueue import Enqueuer
from ingest.metrics import METRICS, FrontDoorMetrics
from ingest.problems import ERROR_RENDERERS, problems_middleware
from shared.jobs import ShardQueues

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import redis.asyncio as aioredis

    from shared.settings import Settings


def make_app(settings: Settings, client: aioredis.Redis) -> web.Application:
    """The front door for `settings`, talking to Redis through `client`.

    Serve it with `auto_decompress=False` (see ingest.server): gzip is inflated by
    ingest.body under a size and ratio cap, never by aiohttp without one.
    """
    metrics = FrontDoorMetrics()
    app = web.Application(
        middlewares=[metrics.middleware(), problems_middleware],
        handler_args=connections.handler_args(settings),
    )
    app[METRICS] = metrics
    accounts = AccountCache(client, settings.key_cache_s)
    enqueuer = Enqueuer(
        client,
        queues=ShardQueues(settings),
        job_max_events=settings.job_max_events,
        timeout_s=settings.redis_timeout_s,
        shard_override=accounts.cached_shard,
    )
    enqueuer.metrics = metrics
    app[GATEWAY] = Gateway(
        settings=settings,
        redis=client,
        keys=KeyCache(client, settings.key_cache_s),
        accounts=accounts,
        enqueuer=enqueuer,
        body_limits=BodyLimits.from_settings(settings),
    )
    app[ERROR_RENDERERS] = {}
    admission.setup(app, settings, client)
    native.add_routes(app)
    catalog.add_routes(app)
    import_.add_routes(app)
    admin.add_routes(app)
    people.add_routes(app)
    bulk.add_routes(app)
    persons_api.add_routes(app)
    account_api.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    stats.add_routes(app)
    dashboard.add_routes(app)
    openapi.add_routes(app)
    connections.install(app, settings)
    # Registered before the flusher, so it is cleaned up after it: the last counts go too.
    app.cleanup_ctx.append(metrics.pusher(client))

    async def flusher(_app: web.Application) -> AsyncIterator[None]:
        enqueuer.start()
        yield
        await enqueuer.stop()

    app.cleanup_ctx.append(flusher)
    return app


async def healthz(_request: web.Request) -> web.Response:
    """The process is alive and its event loop answers (liveness)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Whether to send this front door traffic: Redis answers, no backpressure (readiness)."""
    backpressure = request.app[admission.ADMISSION].backpressure
    if backpressure.engaged:
        return web.json_response({"status": "backpressure", "why": backpressure.reason}, status=503)
    try:
        await request.app[GATEWAY].redis.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        return web.json_response({"status": "unavailable", "redis": str(exc)}, status=503)
    return web.json_response({"status": "ready"})
