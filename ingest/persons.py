"""Person lookups at the front door: the Redis person index, with a short-lived cache."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import redis.exceptions
from aiohttp import web

from ingest.context import GATEWAY
from ingest.problems import GatewayError, ServiceUnavailableError
from shared.persons import find_person, index_field, normalise_value

if TYPE_CHECKING:
    import redis.asyncio as aioredis

# Distinct identifiers remembered at once; a flood of made-up ones only churns the cache.
_MAX_ENTRIES = 100_000


class UnknownPersonError(GatewayError):
    status, title, code = 404, "No such person", "person_not_found"


class PersonCache:
    """Person ids by identifier, trusted for `ttl_s`.

    Only found persons are cached: an identifier never changes hands once indexed, while
    a person created a moment ago must be found at once, by every front door.
    """

    def __init__(self, client: aioredis.Redis, ttl_s: float) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._entries: dict[tuple[str, str], tuple[float, str]] = {}

    async def find(self, account: str, kind: str, value: str) -> str:
        """The id of the account's person with this identifier (of type `kind`).

        Raises:
            UnknownPersonError: no such person.
            ServiceUnavailableError: Redis unreachable.
        """
        key = (account, index_field(kind, normalise_value(kind, value)))
        now = time.monotonic()
        cached = self._entries.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            person = await find_person(self._client, account, kind, value)
        except (redis.exceptions.RedisError, OSError):
            raise ServiceUnavailableError(
                "cannot look the person up: Redis is unreachable", headers={"Retry-After": "1"}
            ) from None
        if person is None:
            raise UnknownPersonError(f"no person with this {kind} identifier")
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = (now + self._ttl_s, person)
        return person


PERSONS = web.AppKey("persons", PersonCache)


def install(app: web.Application) -> PersonCache:
    """The app's person cache, made on first use by whichever route needs it."""
    if PERSONS not in app:
        gateway = app[GATEWAY]
        app[PERSONS] = PersonCache(gateway.redis, gateway.settings.key_cache_s)
    return app[PERSONS]
