"""A forward target for tests: an aiohttp app that fails, throttles, hangs and recovers on
cue, and dedupes batches by Idempotency-Key as a well-behaved receiver would."""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import Iterator


@dataclass
class Received:
    key: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def event_ids(self) -> list[tuple[str, str]]:
        return [(e["account"], e["event_id"]) for e in self.body["events"]]


@dataclass
class Target:
    """`script`: what to do with the next requests, one step each, then 200 for all.
    Steps: an int status (with `Retry-After` from `retry_after` for 429/503), "hang" (take
    the batch, then answer too late: the sender times out although it was stored)."""

    script: list[int | str] = field(default_factory=list)
    retry_after: str = "1"
    hang_s: float = 3.0
    requests: list[Received] = field(default_factory=list)
    stored: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # key -> events

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/ingest", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()  # aiohttp inflates a gzip body (Content-Encoding)
        received = Received(
            request.headers.get("Idempotency-Key", ""), dict(request.headers), json.loads(raw)
        )
        self.requests.append(received)
        step = self.script.pop(0) if self.script else 200
        if step == "hang":
            self.store(received)
            await asyncio.sleep(self.hang_s)
            return web.json_response({"stored": True})
        if isinstance(step, int) and step != 200:
            headers = {"Retry-After": self.retry_after} if step in {429, 503} else {}
            return web.json_response({"error": step}, status=step, headers=headers)
        duplicate = received.key in self.stored
        self.store(received)
        return web.json_response({"duplicate": duplicate})

    def store(self, received: Received) -> None:
        """Keep a batch once per key: what dedupe by Idempotency-Key leaves."""
        self.stored.setdefault(received.key, received.event_ids)

    def deduped(self) -> list[tuple[str, str]]:
        """Every event the target keeps after dropping repeated keys."""
        return [event for events in self.stored.values() for event in events]

    def every_received(self) -> list[tuple[str, str]]:
        return [event for r in self.requests for event in r.event_ids]


@contextmanager
def serving(target: Target) -> Iterator[str]:
    """Serve `target` on a loop in a thread of its own (rq's worker must own the main
    thread); yields its URL."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runner = web.AppRunner(target.app())
    address: list[str] = []

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        address.append(f"http://127.0.0.1:{port}/ingest")
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    started.wait(10)
    try:
        yield address[0]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
