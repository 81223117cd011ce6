"""Backpressure: refuse new events (503) while the queues or Redis memory are too full.

Measured by a background task every `backpressure_check_s`, never per request: a request
only reads the flag. Hysteresis: it engages at a high-water mark and releases only below a
low one, so a front door near the mark does not flap between accepting and refusing.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, NamedTuple

import redis.exceptions
import structlog

from ingest.problems import BacklogFullError
from shared import jobs

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from shared.settings import Settings

log = structlog.get_logger("ingest.backpressure")


class Load(NamedTuple):
    backlog_jobs: int  # jobs waiting in the gateway's queues (not deferred, not running)
    used_memory: int
    memory_limit: int  # 0: unknown, unchecked


def over(load: Load, settings: Settings, *, engaged: bool) -> str:
    """Why new events must wait, or "" if they need not. Engaged, the low-water marks
    apply (it stays on until both are under them); released, the high-water marks."""
    high = settings.backlog_high_jobs
    backlog_mark = min(settings.backlog_low_jobs, high) if engaged else high
    memory_share = settings.memory_low if engaged else settings.memory_high
    if high and load.backlog_jobs >= backlog_mark:
        return f"{load.backlog_jobs} jobs waiting (high-water mark {high})"
    if load.memory_limit and load.used_memory >= memory_share * load.memory_limit:
        share = load.used_memory / load.memory_limit
        return f"Redis memory at {share:.0%} of {load.memory_limit} bytes"
    return ""


class Backpressure:
    """The flag, and the task that keeps it fresh; start() before use, stop() at shutdown."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self.reason = ""  # why it is engaged; "" when it is not
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @property
    def engaged(self) -> bool:
        return bool(self.reason)

    def check(self) -> None:
        """Raises:
        BacklogFullError: engaged (503 with Retry-After; the request is not read).
        """
        if self.reason:
            raise BacklogFullError(
                f"backpressure: {self.reason}; retry later",
                headers={"Retry-After": str(self._settings.backpressure_retry_s)},
            )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="eventgate-backpressure")

    async def stop(self) -> None:
        """Let a check in flight finish (cancelled mid-call, a pooled connection may be left
        in an unknown state), then stop."""
        if self._task is not None:
            self._stopping.set()
            await self._task
            self._task = None

    async def refresh(self) -> None:
        """Measure once and set the flag.

        Raises:
            redis.exceptions.RedisError: Redis did not answer; the flag is left as it was.
        """
        reason = over(await self.measure(), self._settings, engaged=self.engaged)
        if bool(reason) != self.engaged:
            log.warning("backpressure.engaged" if reason else "backpressure.released", why=reason)
        self.reason = reason

    async def measure(self) -> Load:
        """The backlog of the gateway's queues (every queue rq lists as `queue` or a shard
        `queue.N`) and Redis's memory: two round trips."""
        settings = self._settings
        async with self._client.pipeline(transaction=False) as pipe:
            _ = pipe.smembers(jobs.QUEUES_KEY)
            _ = pipe.info("memory")
            queue_keys, memory = await pipe.execute(raise_on_error=False)
        if isinstance(queue_keys, Exception):
            raise queue_keys
        base = jobs.queue_key(settings.queue)
        ours = [
            key
            for key in (k.decode() for k in queue_keys)
            if key == base or key.startswith(f"{base}.")
        ]
        backlog = 0
        if ours:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in ours:
                    _ = pipe.llen(key)
                backlog = sum(await pipe.execute())
        if isinstance(memory, Exception):  # INFO refused (some managed Redis): unchecked
            return Load(backlog, 0, 0)
        limit = settings.memory_limit_bytes or int(memory.get("maxmemory", 0))
        return Load(backlog, int(memory.get("used_memory", 0)), limit)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.refresh()
            except (redis.exceptions.RedisError, OSError) as exc:
                # Redis down is answered 503 by the request path itself; keep the flag.
                log.debug("backpressure.unmeasured", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._settings.backpressure_check_s)
