"""Front-door request limits: every waiting request's buckets checked in one Redis call.

Each request takes a token from its account's bucket for the API (and its key's, if the key
has a limit of its own) in shared/lua/request_limit.lua, atomically and on Redis's clock,
so any number of front doors share the buckets. Like the enqueuer, one task owns the calls:
requests that arrive while a call is out wait for the next one, so a busy front door makes
one EVALSHA per round trip instead of one per request.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, NamedTuple

import redis.exceptions
import structlog

from ingest.problems import ServiceUnavailableError
from shared import keys
from shared.scripts import lua

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from shared.limits import Limit

log = structlog.get_logger("ingest.ratelimit")

# Requests in one script call: bounds how long Redis runs one script (~1 ms at this size).
_MAX_PER_CALL = 256
_US = 1_000_000


class Verdict(NamedTuple):
    """A request's answer from its buckets, with the figures of the tightest one."""

    allowed: bool
    limit: int  # that bucket's burst
    remaining: int  # tokens it has left
    reset_s: int  # whole seconds until it is full again
    retry_after_s: int  # whole seconds until it has a token (0 if allowed)

    def headers(self) -> dict[str, str]:
        """RateLimit-* (draft-ietf-httpapi-ratelimit-headers), on every answer."""
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }


def whole_seconds(us: int) -> int:
    """Rounded up, never 0: some vendor SDKs int() a Retry-After and crash on `1.5`,
    and a 0 invites an immediate retry that is refused again."""
    return max(1, math.ceil(us / _US))


class _Check:
    __slots__ = ("account", "buckets", "done")

    def __init__(
        self, account: str, buckets: list[tuple[str, Limit]], done: asyncio.Future[Verdict]
    ) -> None:
        self.account = account
        self.buckets = buckets
        self.done = done


class RequestLimiter:
    """Checks requests against their buckets; start() before use, stop() at shutdown.

    Cheap per request (measured: asyncio.wait_for + shield per request was most of the
    limiter's CPU): a request appends its check and awaits one future; one timer per group
    of requests waiting together bounds their wait, and a script call names each bucket
    and its size once however many of the group's requests share it.
    """

    def __init__(self, client: aioredis.Redis, timeout_s: float) -> None:
        self._script = client.register_script(lua("request_limit"))
        self._timeout_s = timeout_s
        self._waiting: list[_Check] = []
        self._timer: asyncio.TimerHandle | None = None  # the waiting group's
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.calls = 0  # script calls made, for tests and the benchmark

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="eventgate-ratelimit")

    async def stop(self) -> None:
        """Answer what is waiting, then stop (never cancelled mid-call: that can leave a
        pooled connection in an unknown state)."""
        if self._task is not None:
            self._closing = True
            self._wake.set()
            await self._task
            self._task = None

    async def check(self, account: str, buckets: list[tuple[str, Limit]]) -> Verdict:
        """Take a token from every bucket (Redis key, limit), or from none.

        Raises:
            ServiceUnavailableError: Redis failed or did not answer in time.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Verdict] = loop.create_future()
        if not self._waiting:  # the first of a group: its timer covers the whole group
            self._timer = loop.call_later(self._timeout_s, _fail, self._waiting)
        self._waiting.append(_Check(account, buckets, done))
        self._wake.set()
        return await done

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            waiting, self._waiting, timer = self._waiting, [], self._timer
            for start in range(0, len(waiting), _MAX_PER_CALL):
                await self._call(waiting[start : start + _MAX_PER_CALL])
            if timer is not None:
                timer.cancel()
            if self._closing and not self._waiting:
                return

    async def _call(self, checks: list[_Check]) -> None:
        """One script call for `checks`: KEYS are the distinct buckets, then the distinct
        counters hashes; ARGV the number of buckets, each bucket's size, then per request
        the indexes of its counters hash and its buckets."""
        buckets: dict[str, int] = {}
        sizes: list[int] = []
        counters: dict[str, int] = {}
        requests: list[str] = []
        for check in checks:
            indexes = [counters.setdefault(check.account, len(counters))]
            for key, limit in check.buckets:
                if key not in buckets:
                    buckets[key] = len(buckets) + 1
                    sizes.extend(limit.args())
                indexes.append(buckets[key])
            requests.append(" ".join(map(str, indexes)))
        script_keys = [*buckets, *(keys.counters(account) for account in counters)]
        # Counters indexes were counted from 0: they follow the buckets in KEYS.
        args: list[int | str] = [len(buckets), *sizes, *requests]
        try:
            replies = await self._script(keys=script_keys, args=args)
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("ratelimit.failed", error=str(exc), requests=len(checks))
            _fail(checks)
            return
        self.calls += 1
        for check, reply in zip(checks, replies, strict=True):
            if not check.done.done():
                check.done.set_result(_verdict(check, reply))


def _fail(checks: list[_Check]) -> None:
    """A 503 for whoever is still waiting: Redis failed, or the group's time is up."""
    for check in checks:
        if not check.done.done():
            check.done.set_exception(_unavailable())
            check.done.exception()  # retrieved, so an abandoned request does not warn


def _verdict(check: _Check, reply: list[int]) -> Verdict:
    allowed, remaining, reset_us, retry_us, index = reply
    return Verdict(
        allowed=bool(allowed),
        limit=check.buckets[index - 1][1].burst,
        remaining=remaining,
        reset_s=math.ceil(reset_us / _US),
        retry_after_s=whole_seconds(retry_us) if not allowed else 0,
    )


def _unavailable() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "cannot check the rate limit: Redis is unavailable", headers={"Retry-After": "1"}
    )
