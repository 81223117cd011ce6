"""Running a load: async senders over one HTTP session, in one process or several."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
import msgspec

from shared.load.bodies import BODY_MAKERS, EventSource, LoadRequest, RequestMaker
from shared.load.pacing import Burst, Pacer, check_bounds
from shared.load.stats import Stats

if TYPE_CHECKING:
    from collections.abc import Iterable
    from multiprocessing.queues import Queue

ProgressCallback = Callable[[Stats], None]

DEFAULT_URL = "http://127.0.0.1:8080"
# How often senders report their counters (to the display, or from a child process).
REPORT_EVERY_S = 0.25
_MAX_CONCURRENCY = 10_000


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """One load run. `rate` (requests/s), `requests` and `concurrency` are totals over
    all processes; `duration_s` or `requests` must bound it."""

    url: str = DEFAULT_URL
    keys: tuple[str, ...] = ()
    dialect: str = "native"
    batch: int = 100
    rate: float | None = None  # None: as fast as the concurrency allows
    concurrency: int = 16
    burst: Burst | None = None
    duplicate_ratio: float = 0.0
    invalid_ratio: float = 0.0
    duration_s: float | None = None
    requests: int | None = None
    processes: int = 1
    timeout_s: float = 10.0
    seed: int | None = None
    # Event ids are `<prefix>-<process>-<n>`: unique per run unless resent on purpose.
    prefix: str = field(default_factory=lambda: f"load-{secrets.token_hex(4)}")

    def check(self) -> float:
        """The run's time limit in seconds.

        Raises:
            UnboundedRunError: no duration or count, or out of range.
            ValueError: any other option out of range.
        """
        limit = check_bounds(self.duration_s, self.requests)
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url must be an http(s) URL (got {self.url!r})")
        if self.dialect not in BODY_MAKERS:
            raise ValueError(f"unknown dialect {self.dialect!r}; known: {', '.join(BODY_MAKERS)}")
        if not self.keys:
            raise ValueError("no API key: pass --key, or --accounts N to make some")
        for name, ratio in (("duplicate", self.duplicate_ratio), ("invalid", self.invalid_ratio)):
            if not 0 <= ratio <= 1:
                raise ValueError(f"--{name}-ratio must be within [0, 1] (got {ratio:g})")
        if self.batch < 1 or not 1 <= self.processes <= self.concurrency <= _MAX_CONCURRENCY:
            raise ValueError(
                "need --batch >= 1 and 1 <= --processes <= --concurrency <= "
                f"{_MAX_CONCURRENCY} (got {self.batch}, {self.processes}, {self.concurrency})"
            )
        Pacer(self.rate, self.burst)  # raises on a bad rate or a burst without a rate
        return limit

    def share(self, index: int) -> LoadConfig:
        """Process `index`'s part of the run: its slice of rate, count and concurrency."""
        n = self.processes

        def split(total: int) -> int:
            return total // n + (index < total % n)

        return replace(
            self,
            rate=None if self.rate is None else self.rate / n,
            requests=None if self.requests is None else split(self.requests),
            concurrency=split(self.concurrency),
            processes=1,
            seed=None if self.seed is None else self.seed + index,
            prefix=f"{self.prefix}-{index}",
        )


async def generate(config: LoadConfig, on_progress: ProgressCallback | None = None) -> Stats:
    """Send the run's requests from this process; its counters at the end.

    Raises:
        UnboundedRunError, ValueError: see `LoadConfig.check`.
    """
    limit = config.check()
    rng = random.Random(config.seed)  # noqa: S311 - load, not secrets
    maker = RequestMaker(
        dialect=config.dialect,
        keys=list(config.keys),
        batch=config.batch,
        source=EventSource(config.prefix, config.duplicate_ratio, rng),
        invalid_ratio=config.invalid_ratio,
        rng=rng,
    )
    pacer = Pacer(config.rate, config.burst)
    stats = Stats()
    loop = asyncio.get_running_loop()
    base = config.url.rstrip("/")
    issued = 0
    connector = aiohttp.TCPConnector(limit=config.concurrency)
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    start = loop.time()

    async def sender(session: aiohttp.ClientSession) -> None:
        nonlocal issued
        while config.requests is None or issued < config.requests:
            slot = pacer.next_slot()
            if slot >= limit:
                return
            issued += 1
            if (delay := start + slot - loop.time()) > 0:
                await asyncio.sleep(delay)
            if loop.time() - start >= limit:
                return
            request = maker.next()
            began = time.perf_counter()
            status = await _send(session, base + request.path, request)
            stats.record(
                status,
                time.perf_counter() - began,
                events=request.events,
                duplicates=request.duplicates,
                invalid=request.invalid,
            )

    async def reporter() -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            stats.elapsed_s = loop.time() - start
            if on_progress is not None:
                on_progress(stats)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        reporting = asyncio.create_task(reporter())
        try:
            await asyncio.gather(*(sender(session) for _ in range(config.concurrency)))
        finally:
            reporting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporting
    stats.elapsed_s = loop.time() - start
    if on_progress is not None:
        on_progress(stats)
    return stats


async def _send(session: aiohttp.ClientSession, url: str, request: LoadRequest) -> int | None:
    """The answer's status, or None on a connection error or timeout."""
    try:
        async with session.post(url, data=request.body, headers=dict(request.headers)) as answer:
            await answer.read()
            return answer.status
    except (aiohttp.ClientError, TimeoutError):
        return None


def run_load(
    config: LoadConfig, on_progress: ProgressCallback | None = None, *, isolate: bool = False
) -> Stats:
    """Run the load, in this process or (`processes` > 1, or `isolate`) in child processes,
    whose counters are merged as they report.

    Raises:
        UnboundedRunError, ValueError: see `LoadConfig.check`.
        RuntimeError: a child process died without reporting its end.
    """
    limit = config.check()
    if config.processes == 1 and not isolate:
        return asyncio.run(generate(config, on_progress))
    context = multiprocessing.get_context("spawn")  # no inherited event loop or threads
    reports: Queue[tuple[int, bool, bytes]] = context.Queue()
    children = [
        context.Process(target=_child, args=(config.share(i), i, reports), daemon=True)
        for i in range(config.processes)
    ]
    for child in children:
        child.start()
    latest = {i: Stats() for i in range(len(children))}
    finished: set[int] = set()
    # Startup (spawn, imports) and the child's own time limit, with room to finish.
    deadline = time.monotonic() + limit + config.timeout_s + 30
    try:
        while len(finished) < len(children):
            try:
                index, final, data = reports.get(timeout=REPORT_EVERY_S)
            except queue.Empty:
                dead = [i for i, c in enumerate(children) if not c.is_alive()]
                if (set(dead) - finished and reports.empty()) or time.monotonic() > deadline:
                    raise RuntimeError("a load process died or hung; see its output") from None
                continue
            latest[index] = msgspec.msgpack.decode(data, type=Stats)
            if final:
                finished.add(index)
            if on_progress is not None:
                on_progress(merge(latest.values()))
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
    return merge(latest.values())


def merge(parts: Iterable[Stats]) -> Stats:
    total = Stats()
    for part in parts:
        total.merge(part)
    return total


def _child(config: LoadConfig, index: int, reports: Queue[tuple[int, bool, bytes]]) -> None:
    def report(stats: Stats) -> None:
        reports.put((index, False, msgspec.msgpack.encode(stats)))

    stats = asyncio.run(generate(config, report))
    reports.put((index, True, msgspec.msgpack.encode(stats)))
