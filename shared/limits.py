"""Rate limits: how big each token bucket is, for a request, a key and an account's events.

Buckets live in Redis (shared/lua/request_limit.lua, shared/lua/process_limit.lua) as GCRA
times: one number per bucket, read against Redis's clock, so every process shares it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from shared import keys
from shared.accounts import AccountError, ApiKey, find_key

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from shared.accounts import Account
    from shared.settings import Settings


class Limit(NamedTuple):
    """A token bucket: `rate` tokens a second, at most `burst` at once."""

    rate: float
    burst: int

    @property
    def interval_us(self) -> int:
        """Microseconds per token: whole, so that Lua's doubles add up exactly."""
        return max(1, round(1_000_000 / self.rate))

    def args(self) -> tuple[int, int]:
        """(interval, tolerance) in us, as the Lua scripts take them."""
        return self.interval_us, self.burst * self.interval_us


# The vendors' documented limits, per account (seed 002: 250 requests/s; seed 004: burst 10,
# steady 150/min). An account's own rate replaces them; its own burst alone keeps the rate.
VENDOR_LIMITS: dict[str, Limit] = {"people": Limit(250.0, 250), "bulk": Limit(150 / 60, 10)}


def make_limit(rate: float | None, burst: int | None) -> Limit | None:
    """None for no limit (no rate, or 0); a burst of one second's worth unless given."""
    if not rate:
        return None
    return Limit(rate, burst or max(1, math.ceil(rate)))


def request_limit(account: Account, dialect: str, settings: Settings) -> Limit | None:
    """The account's bucket on one API: its own rate, else the vendor's, else the setting's."""
    if not settings.request_limits:
        return None
    if account.rate is not None:
        return make_limit(account.rate, account.burst)
    vendor = VENDOR_LIMITS.get(dialect)
    if vendor is not None:
        return vendor._replace(burst=account.burst or vendor.burst)
    return make_limit(settings.request_rate, account.burst or settings.request_burst)


def key_limit(key: ApiKey, settings: Settings) -> Limit | None:
    """A key's own bucket, if it carries one; its account's applies as well."""
    return make_limit(key.rate, key.burst) if settings.request_limits else None


def process_limit(account: Account, settings: Settings) -> Limit | None:
    """Events/s the workers write for the account; the burst is one second's worth."""
    rate = settings.process_rate if account.process_rate is None else account.process_rate
    return make_limit(rate, None)


async def set_key_limit(
    client: aioredis.Redis, key: str, *, rate: float | None, burst: int | None
) -> ApiKey:
    """Give a key (in full, or its id) a request limit of its own; rate None removes it.
    Front doors use it within EVENTGATE_KEY_CACHE_S.

    Raises:
        AccountError: no such key, or a negative rate or a burst under 1.
    """
    record = await find_key(client, key)
    fields = {**msgspec.structs.asdict(record), "rate": rate, "burst": burst}
    try:
        updated = msgspec.convert(fields, ApiKey)
    except msgspec.ValidationError as exc:
        raise AccountError(f"invalid key limit: {exc}") from None
    await client.hset(keys.API_KEYS, record.key_id, msgspec.json.encode(updated))
    return updated
