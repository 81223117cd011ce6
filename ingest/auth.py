"""API key authentication with a short-lived cache, so revocation reaches every front door."""

from __future__ import annotations

import time

import redis.asyncio as aioredis
import redis.exceptions

from ingest.problems import ForbiddenError, ServiceUnavailableError, UnauthorizedError
from shared.accounts import ApiKey, KeyKind, lookup_key, parse_key, secret_matches

# Distinct key ids remembered at once; a flood of made-up ids only churns the cache.
_MAX_ENTRIES = 10_000


class KeyCache:
    """Key records by id, trusted for `ttl_s`: a revoked key fails within that."""

    def __init__(self, client: aioredis.Redis, ttl_s: float) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, ApiKey | None]] = {}

    async def authenticate(self, presented: str | None, *, allow: frozenset[KeyKind]) -> ApiKey:
        """The key record for a presented key.

        Raises:
            UnauthorizedError: missing, malformed, unknown or revoked key.
            ForbiddenError: a valid key of a kind this route does not accept.
            ServiceUnavailableError: Redis unreachable, so the key cannot be checked.
        """
        if not presented:
            raise UnauthorizedError("no API key; send Authorization: Bearer <key>")
        parsed = parse_key(presented.strip())
        if parsed is None:
            raise UnauthorizedError("malformed API key")
        key_id, secret = parsed
        record = await self._record(key_id)
        # The secret is checked on every request, cached record or not.
        if record is None or not secret_matches(record, secret):
            raise UnauthorizedError("unknown or revoked API key")
        if record.kind not in allow:
            raise ForbiddenError(f"a {record.kind} key cannot be used here")
        return record

    async def _record(self, key_id: str) -> ApiKey | None:
        now = time.monotonic()
        cached = self._entries.get(key_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            record = await lookup_key(self._client, key_id)
        except redis.exceptions.RedisError:
            raise ServiceUnavailableError(
                "cannot check the API key: Redis is unreachable", headers={"Retry-After": "1"}
            ) from None
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        self._entries[key_id] = (now + self._ttl_s, record)
        return record
