"""End to end: a real front door and worker get a known mix of events (valid, duplicate,
invalid, a bad key, a wrong path), and /metrics, /v1/stats and the dashboard page, in a real
headless Chromium, all show exactly what was sent."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from shared import accounts
from shared.redis_server import redis_url_for
from shared.settings import load_settings
from tests.processes import Processes

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
# Debian's chromium as root, on a machine with no way out: no sandbox (root), and no
# background connections that the closed network would refuse.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
COUNTED = ("accepted", "persisted", "duplicate", "deferred", "dead_lettered", "in_queue")
ROW = (*COUNTED, "rate_limited")
# Over-limit requests are in the mix where the front door has request rate limits (settable
# per account): an account allowed a burst of 2 requests, and next to no steady rate, sends 5.
LIMITER = "rate" in accounts.Account.__struct_fields__


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test's own (embedded): the counters start at zero."""
    settings = load_settings({"EVENTGATE_DATA_DIR": str(tmp_path / "redis")})
    with redis_url_for(settings) as url:
        yield url


@pytest.fixture
def stack(tmp_path: Path, redis_url: str) -> Iterator[Processes]:
    procs = Processes(tmp_path, redis_url, sink=f"sqlite:///{tmp_path / 'events.db'}")
    procs.start_web()
    procs.start_worker()
    yield procs
    procs.close()


@dataclass
class Keys:
    shop: str
    globex: str
    operator: str
    shop_public: str
    limited: str | None


async def make_keys(redis_url: str) -> Keys:
    client = aioredis.Redis.from_url(redis_url)
    try:
        for name in ("shop", "globex", "ops"):
            await accounts.create_account(client, name)
        limited = None
        if LIMITER:
            await accounts.create_account(client, "limited")
            await accounts.update_account(client, "limited", changes={"rate": 0.001, "burst": 2})
            limited = await accounts.create_key(client, "limited", "private")
        return Keys(
            shop=await accounts.create_key(client, "shop", "private"),
            globex=await accounts.create_key(client, "globex", "private"),
            operator=await accounts.create_key(client, "ops", "private", operator=True),
            shop_public=await accounts.create_key(client, "shop", "public"),
            limited=limited,
        )
    finally:
        await client.aclose()


@dataclass
class Sent:
    """What the mix sent, as the figures should show it."""

    accounts: dict[str, dict[str, int]] = field(default_factory=dict)
    requests: dict[str, dict[str, int]] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)

    def answered(self, dialect: str, status: int) -> None:
        by_status = self.requests.setdefault(dialect, {})
        by_status[str(status)] = by_status.get(str(status), 0) + 1

    def add(self, account: str, **counts: int) -> None:
        row = self.accounts.setdefault(account, dict.fromkeys(ROW, 0))
        for name, count in counts.items():
            row[name] += count


def native(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"name": "sale", "id": f"{prefix}-{i}", "value": 9.5} for i in range(n)]


INVALID = {"name": "sale", "timestamp": "not a time"}


async def send_mix(url: str, keys: Keys, pause_s: float = 0.0) -> Sent:
    """The known mix, one request at a time (`pause_s` apart, so charts have a shape)."""
    sent = Sent()
    sent.add("ops")
    # valid: 4 x 10 new events
    steps: list[tuple[str, str, str, object, int]] = [
        ("native", "/v1/events", keys.shop, native(f"s{n}", 10), 202) for n in range(4)
    ]
    steps.append(("native", "/v1/events", keys.shop, native("s1", 10), 202))  # 10 duplicates
    steps.append(("native", "/v1/events", keys.shop, [native("x", 1)[0], INVALID, INVALID], 422))
    partial = [native("p", 1)[0], INVALID, {"name": "sale", "id": "p-9"}]
    steps.append(("native", "/v1/events?strict=false", keys.shop, partial, 202))
    sale = {"type": "EventSale", "customerCode": "c-1", "productCode": "P-1", "quantity": 2}
    # catalog: 3 x 2 events, ids minted at the front door
    steps += [("catalog", "/events", keys.globex, [sale, sale], 202)] * 3
    steps.append(("catalog", "/events", keys.globex, [{**sale, "quantity": "two"}], 400))
    steps.append(("native", "/v1/events", "eg_sk_0123456789ab.not-a-real-secret-at-all", [], 401))
    steps.append(("none", "/v1/nowhere", keys.shop, [], 404))

    async with aiohttp.ClientSession() as session:
        for dialect, path, key, body, expected in steps:
            headers = {"Authorization": f"Bearer {key}"}
            async with session.post(f"{url}{path}", json=body, headers=headers) as response:
                assert response.status == expected, (path, await response.text())
            sent.answered(dialect, expected)
            await asyncio.sleep(pause_s)
        if keys.limited:
            await send_over_limit(session, url, keys.limited, sent)
    sent.add("shop", accepted=40 + 10 + 2, persisted=40 + 2, duplicate=10)
    sent.add("globex", accepted=6, persisted=6)
    sent.rejected = {"native": 2 + 1, "catalog": 1}
    return sent


async def send_over_limit(session: aiohttp.ClientSession, url: str, key: str, sent: Sent) -> None:
    """5 one-event requests against a burst of 2: what is admitted is accepted, the rest 429."""
    statuses = []
    for i in range(5):
        body = native(f"l{i}", 1)
        headers = {"Authorization": f"Bearer {key}"}
        async with session.post(f"{url}/v1/events", json=body, headers=headers) as response:
            statuses.append(response.status)
            sent.answered("native", response.status)
    assert set(statuses) == {202, 429}, statuses
    admitted, refused = statuses.count(202), statuses.count(429)
    sent.add("limited", accepted=admitted, persisted=admitted, rate_limited=refused)


async def get_stats(url: str, key: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v1/stats", headers=headers) as response,
    ):
        return response.status, await response.json(content_type=None)


async def settled(url: str, key: str, sent: Sent, timeout_s: float = 30.0) -> dict[str, Any]:
    """/v1/stats once the worker caught up and every front door pushed its counts."""
    deadline = time.monotonic() + timeout_s
    while True:
        _, stats = await get_stats(url, key)
        done = stats["totals"]["accepted"] == sum(a["accepted"] for a in sent.accounts.values())
        if done and stats["totals"]["in_queue"] == 0 and stats["requests"] == sent.requests:
            return stats
        if time.monotonic() > deadline:
            pytest.fail(f"figures did not settle: {stats}")
        await asyncio.sleep(0.25)


def rows(stats: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {row["account"]: {k: row[k] for k in ROW} for row in stats["accounts"]}


async def test_metrics_and_stats_show_what_was_sent(stack, redis_url):
    keys = await make_keys(redis_url)
    sent = await send_mix(stack.url, keys)
    stats = await settled(stack.url, keys.operator, sent)

    # /v1/stats, operator: every account, the gateway.
    assert rows(stats) == sent.accounts
    assert stats["requests"] == sent.requests
    assert stats["rejected"] == sent.rejected
    assert stats["workers_alive"] == 1
    assert [q["backlog_jobs"] for q in stats["queues"]] == [0] * len(stats["queues"])
    assert stats["sink_write"]["count"] >= 1

    # An account's key: its own figures only. A public key: 403. No key: 401.
    status, own = await get_stats(stack.url, keys.shop)
    assert status == 200
    assert rows(own) == {"shop": sent.accounts["shop"]}
    assert own["queues"] is None
    assert (await get_stats(stack.url, keys.shop_public))[0] == 403
    assert (await get_stats(stack.url, None))[0] == 401

    # /metrics: the same numbers, parsed by Prometheus's own parser.
    async with aiohttp.ClientSession() as session, session.get(f"{stack.url}/metrics") as resp:
        text = await resp.text()
    samples: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    requests = {
        (dict(labels)["dialect"], dict(labels)["status"]): int(value)
        for labels, value in samples["eventgate_requests_total"].items()
    }
    assert requests == {
        (dialect, status): n
        for dialect, by_status in sent.requests.items()
        for status, n in by_status.items()
    }
    for metric, field_name in (
        ("eventgate_events_accepted_total", "accepted"),
        ("eventgate_events_persisted_total", "persisted"),
        ("eventgate_events_duplicate_total", "duplicate"),
        ("eventgate_events_in_queue", "in_queue"),
        ("eventgate_requests_rate_limited_total", "rate_limited"),
    ):
        figures = {dict(labels)["account"]: int(v) for labels, v in samples[metric].items()}
        expected = {a: row[field_name] for a, row in sent.accounts.items()}
        if field_name == "accepted":  # this process's counter: accounts it queued events for
            expected = {a: n for a, n in expected.items() if n}
        assert figures == expected, metric
    rejected = {
        dict(k)["dialect"]: int(v) for k, v in samples["eventgate_events_rejected_total"].items()
    }
    assert rejected == sent.rejected
    assert samples["eventgate_workers_alive"][frozenset()] == 1
    assert set(samples["eventgate_queue_backlog_jobs"].values()) == {0}
    assert samples["eventgate_sink_write_seconds_count"][frozenset()] >= 1


# What the page shows: every element with a figure carries it in data-value as well.
READ_PAGE = """() => ({
  tiles: Object.fromEntries([...document.querySelectorAll('.tile .value')]
    .map(e => [e.id.replace('tile-', ''), {value: e.dataset.value, text: e.textContent}])),
  accounts: [...document.querySelectorAll('#accounts tbody tr')].map(tr => [tr.dataset.account,
    Object.fromEntries([...tr.querySelectorAll('td[data-field]')]
      .map(td => [td.dataset.field, td.dataset.value ?? td.textContent]))]),
  requests: [...document.querySelectorAll('#requests tbody tr')].map(tr => [tr.dataset.dialect,
    tr.dataset.status, tr.querySelector('td[data-field=requests]').dataset.value]),
  status: document.getElementById('status').textContent,
})"""


def page_figures(page: dict[str, Any]) -> dict[str, Any]:
    """The page's figures in /v1/stats's shape, checking each shown text is its value."""
    for name, tile in page["tiles"].items():
        if name in COUNTED or name in ("backlog", "workers", "rejected"):
            assert tile["text"].replace(",", "") == tile["value"], (name, tile)
    requests: dict[str, dict[str, int]] = {}
    rejected: dict[str, int] = {}
    for dialect, status, value in page["requests"]:
        if status == "rejected":
            rejected[dialect] = int(value)
        else:
            requests.setdefault(dialect, {})[status] = int(value)
    return {
        "totals": {k: int(page["tiles"][k]["value"]) for k in COUNTED},
        "accounts": {name: {k: int(row[k]) for k in ROW} for name, row in page["accounts"]},
        "requests": requests,
        "rejected": rejected,
        "workers_alive": int(page["tiles"]["workers"]["value"]),
        "backlog": int(page["tiles"]["backlog"]["value"]),
    }


def stats_figures(stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "totals": {k: stats["totals"][k] for k in COUNTED},
        "accounts": rows(stats),
        "requests": stats["requests"],
        "rejected": stats["rejected"],
        "workers_alive": stats["workers_alive"],
        "backlog": sum(q["backlog_jobs"] for q in stats["queues"]),
    }


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no browser: {CHROMIUM} is not installed")
async def test_dashboard_page_shows_what_was_sent(stack, redis_url):
    from playwright.async_api import async_playwright  # noqa: PLC0415 - only with a browser

    keys = await make_keys(redis_url)
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            await page.goto(f"{stack.url}/dashboard?refresh=0.5")
            await page.fill("#key", keys.operator)
            await page.click("#key-form button[type=submit]")
            await page.wait_for_selector('#accounts tr[data-account="ops"]')

            # Sent while the page watches, so its charts have something to draw.
            sent = await send_mix(stack.url, keys, pause_s=0.4)
            stats = await settled(stack.url, keys.operator, sent)
            expected = stats_figures(stats)
            assert expected["accounts"] == sent.accounts
            assert expected["requests"] == sent.requests
            assert expected["rejected"] == sent.rejected

            deadline = time.monotonic() + 15
            while (shown := page_figures(await page.evaluate(READ_PAGE))) != expected:
                assert time.monotonic() < deadline, (shown, expected)
                await asyncio.sleep(0.25)
            # A few more samples with the queue drained, then the picture.
            await asyncio.sleep(2)
            assert page_figures(await page.evaluate(READ_PAGE)) == expected
            assert await page.locator("#chart-rate polyline").count() == 2
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # An account's key: its own row only, no gateway figures.
            own = await browser.new_page(viewport={"width": 1400, "height": 800})
            await own.goto(f"{stack.url}/dashboard")
            await own.fill("#key", keys.shop)
            await own.click("#key-form button[type=submit]")
            await own.wait_for_selector('#accounts tr[data-account="shop"]')
            shown = await own.evaluate(READ_PAGE)
            assert [name for name, _ in shown["accounts"]] == ["shop"]
            assert await own.locator("#chart-backlog").is_hidden()
            assert "account shop" in shown["status"]
            await own.screenshot(path=str(ARTIFACTS / "dashboard-account.png"), full_page=True)

            # A public key is refused, and the page says so.
            refused = await browser.new_page()
            await refused.goto(f"{stack.url}/dashboard")
            await refused.fill("#key", keys.shop_public)
            await refused.click("#key-form button[type=submit]")
            await refused.wait_for_selector("#key-error:not([hidden])")
            assert "public" in await refused.inner_text("#key-error")
        finally:
            await browser.close()
