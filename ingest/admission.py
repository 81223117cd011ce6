"""Whether the front door takes a request at all: backpressure (503), then rate limits (429).

Dialects call `admit` right after authenticating, before reading the body: a refused
request costs no body read, no decode and nothing queued.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from ingest.backpressure import Backpressure
from ingest.context import GATEWAY
from ingest.problems import RateLimitedError
from ingest.ratelimit import RequestLimiter, Verdict
from shared import keys
from shared.limits import key_limit, request_limit

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import redis.asyncio as aioredis

    from shared.accounts import ApiKey
    from shared.limits import Limit
    from shared.settings import Settings

log = structlog.get_logger("ingest.admission")

RATE_LIMIT = web.RequestKey("rate_limit", Verdict)
# Browsers read only these from a cross-origin answer (the bulk dialect's).
_EXPOSE = "Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset"


class Admission:
    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.settings = settings
        self.backpressure = Backpressure(client, settings)
        self.limiter = RequestLimiter(client, settings.redis_timeout_s)


ADMISSION = web.AppKey("admission", Admission)


def setup(app: web.Application, settings: Settings, client: aioredis.Redis) -> None:
    """Install admission on `app`: its background tasks and the RateLimit-* headers."""
    admission = app[ADMISSION] = Admission(client, settings)

    async def tasks(_app: web.Application) -> AsyncIterator[None]:
        admission.backpressure.start()
        admission.limiter.start()
        yield
        await admission.limiter.stop()
        await admission.backpressure.stop()

    app.cleanup_ctx.append(tasks)
    app.on_response_prepare.append(_rate_headers)


def check_backpressure(request: web.Request) -> None:
    """For routes that queue without a rate limit (profiles).

    Raises:
        BacklogFullError: backpressure is engaged.
    """
    request.app[ADMISSION].backpressure.check()


async def admit(request: web.Request, key: ApiKey, dialect: str) -> None:
    """Let a request of `key` on `dialect`'s API in, or refuse it.

    Raises:
        BacklogFullError: backpressure is engaged (503, Retry-After).
        RateLimitedError: over a request rate limit (429, Retry-After, RateLimit-*).
        ServiceUnavailableError: Redis unreachable.
    """
    admission = request.app[ADMISSION]
    admission.backpressure.check()
    view = await request.app[GATEWAY].accounts.view(key.account)
    if view is None:
        return  # the account is gone: the handler refuses the key
    settings = admission.settings
    buckets: list[tuple[str, Limit]] = []
    if limit := request_limit(view.account, dialect, settings):
        buckets.append((keys.request_bucket(key.account, dialect), limit))
    if limit := key_limit(key, settings):
        buckets.append((keys.key_bucket(key.account, key.key_id), limit))
    if not buckets:
        return
    verdict = await admission.limiter.check(key.account, buckets)
    request[RATE_LIMIT] = verdict
    if not verdict.allowed:
        raise RateLimitedError(
            f"over the request rate limit; retry in {verdict.retry_after_s} s",
            headers={"Retry-After": str(verdict.retry_after_s)},
        )


async def _rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    """RateLimit-* on every answer of a limited request, success or error alike."""
    verdict = request.get(RATE_LIMIT)
    if verdict is None:
        return
    response.headers.update(verdict.headers())
    if "Access-Control-Allow-Origin" in response.headers:
        response.headers["Access-Control-Expose-Headers"] = _EXPOSE
