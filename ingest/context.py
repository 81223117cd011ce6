"""What every route needs, built once per app: settings, Redis, key cache, enqueuer."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from aiohttp import web

from ingest.accounts import AccountCache
from ingest.auth import KeyCache
from ingest.body import BodyLimits
from ingest.enqueue import Enqueuer
from ingest.problems import REQUEST_ID
from shared.event import new_event_id
from shared.settings import Settings


@dataclass(frozen=True, slots=True)
class Gateway:
    settings: Settings
    redis: aioredis.Redis
    keys: KeyCache
    accounts: AccountCache
    enqueuer: Enqueuer
    body_limits: BodyLimits


GATEWAY = web.AppKey("gateway", Gateway)


def begin_request(request: web.Request) -> tuple[Gateway, str, int]:
    """The gateway, a fresh request id (bound to every log line of this request) and the
    received time in ns."""
    request_id = new_event_id()
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    # The route's pattern, never the path: a path can hold a person's email or phone.
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "?"
    structlog.contextvars.bind_contextvars(request_id=request_id, route=route)
    return request.app[GATEWAY], request_id, time.time_ns()
