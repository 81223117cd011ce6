"""The front door's peak memory while it refuses a 10 MB -> 10 GiB gzip bomb and bodies far over
the size limit (declared, and chunked): bounded by its caps, not by what the client sends.

Read from the process itself (VmHWM, its resident high-water mark) and written to
test-artifacts/hostile-memory.json.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
import redis.asyncio as aioredis

from shared.errors import ConfigError
from shared.redis_server import find_server_binary, redis_url_for
from shared.settings import MiB, load_settings
from tests.dialects import Keys, gzip_bomb, make_account
from tests.processes import Processes

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

try:
    find_server_binary()
except ConfigError as exc:
    pytest.skip(f"no Redis server binary to embed: {exc}", allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
BODY_LIMIT = 11 * MiB  # so that a 10 MB bomb gets past the size check to the gzip caps
# Above the idle process: the body limit read (and joined), the inflated cap, and slack.
BUDGET = BODY_LIMIT * 2 + 20 * MiB + 40 * MiB


@pytest.fixture
def front_door(tmp_path: Path) -> Iterator[tuple[Processes, Keys]]:
    with redis_url_for(load_settings({"EVENTGATE_DATA_DIR": str(tmp_path / "redis")})) as url:

        async def account() -> Keys:
            client = aioredis.Redis.from_url(url)
            try:
                return await make_account(client)
            finally:
                await client.aclose()

        keys = asyncio.run(account())
        procs = Processes(tmp_path, url, max_body_bytes=str(BODY_LIMIT), request_limits="false")
        procs.start_web()
        try:
            yield procs, keys
        finally:
            procs.close()


def high_water(procs: Processes) -> int:
    """The front door's peak resident memory so far, in bytes."""
    assert procs.web is not None
    status = Path(f"/proc/{procs.web.pid}/status").read_text()
    [line] = [line for line in status.splitlines() if line.startswith("VmHWM:")]
    return int(line.split()[1]) * 1024


async def chunked(total: int) -> AsyncIterator[bytes]:
    """`total` bytes of JSON-ish filler, sent without a length."""
    chunk = b" " * (1 << 20)
    for _ in range(total // len(chunk)):
        yield chunk


async def test_peak_memory_during_a_gzip_bomb_and_oversized_bodies(front_door):
    procs, keys = front_door
    url = f"{procs.url}/v1/events"
    auth = {"Authorization": f"Bearer {keys.private}"}
    measured: dict[str, int] = {}
    async with aiohttp.ClientSession() as session:
        for _ in range(20):  # warm up: the idle process as it serves
            async with session.post(url, data=b'{"name": "warm"}', headers=auth) as response:
                assert response.status == 202
        measured["idle"] = high_water(procs)

        declared = {**auth, "Content-Length": str(100 * MiB)}
        try:
            async with session.post(url, data=chunked(100 * MiB), headers=declared) as response:
                assert response.status == 413
        except aiohttp.ClientError:
            pass  # answered and closed before the client could send it all: refused too
        async with session.post(url, data=chunked(50 * MiB), headers=auth) as response:
            assert response.status == 413
        measured["oversized"] = high_water(procs)

        bomb = gzip_bomb(10 << 30)
        assert 9 * MiB < len(bomb) < BODY_LIMIT
        headers = {**auth, "Content-Encoding": "gzip"}
        async with session.post(url, data=io.BytesIO(bomb), headers=headers) as response:
            assert response.status == 413
            assert "inflates" in (await response.json())["detail"]
        measured["gzip_bomb"] = high_water(procs)

    report = {
        "idle_bytes": measured["idle"],
        "after_oversized_bytes": measured["oversized"],
        "after_gzip_bomb_bytes": measured["gzip_bomb"],
        "gzip_bomb": f"10 GiB of zeros in {len(bomb)} bytes, body limit {BODY_LIMIT}",
        "oversized": f"100 MiB declared, 50 MiB chunked, body limit {BODY_LIMIT}",
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "hostile-memory.json").write_text(json.dumps(report, indent=2) + "\n")
    assert measured["gzip_bomb"] - measured["idle"] < BUDGET, report
