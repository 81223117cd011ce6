"""Metrics: counters kept in Redis add up, /metrics parses with the agreed names, /v1/stats shows
each key what it may see, and the dashboard page is served whole by the front door."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest.metrics import METRICS
from shared import accounts, keys, stats
from tests.unit.test_deploy import METRICS as AGREED

if TYPE_CHECKING:
    from aiohttp.test_utils import TestClient


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(client: TestClient, key: str, events: object, query: str = "") -> int:
    response = await client.post(f"/v1/events{query}", json=events, headers=auth(key))
    await response.read()
    return response.status


async def scrape(client: TestClient) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """/metrics as {sample name: {sorted labels: value}}, parsed by prometheus-client."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


async def stats_of(client: TestClient, key: str) -> dict:
    response = await client.get("/v1/stats", headers=auth(key))
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    return await response.json()


@pytest.fixture
async def operator_key(fake_redis) -> str:
    await accounts.create_account(fake_redis, "ops")
    return await accounts.create_key(fake_redis, "ops", "private", operator=True)


@pytest.fixture
async def other_key(fake_redis) -> str:
    await accounts.create_account(fake_redis, "globex")
    return await accounts.create_key(fake_redis, "globex", "private")


def batch(prefix: str, n: int) -> list[dict[str, str]]:
    return [{"name": "sale", "id": f"{prefix}-{i}"} for i in range(n)]


async def test_counters_in_redis_add_up_to_what_was_sent(
    gateway, key, other_key, operator_key, run_worker
):
    """Accepted (front door), persisted and duplicate (worker) per account, and in_queue is
    what they leave: 0 once the worker ran, the accepted events before."""
    client = await gateway()
    assert await post(client, key, batch("a", 5)) == 202
    assert await post(client, key, batch("a", 5)) == 202  # resent: 5 duplicates
    assert await post(client, other_key, batch("g", 3)) == 202

    before = await stats_of(client, operator_key)
    rows = {row["account"]: row for row in before["accounts"]}
    assert rows["acme"]["accepted"] == 10
    assert rows["acme"]["in_queue"] == 10
    assert before["queues"][0]["backlog_jobs"] >= 1
    run_worker()

    after = await stats_of(client, operator_key)
    rows = {row["account"]: row for row in after["accounts"]}
    assert rows["acme"] == {
        "account": "acme",
        "accepted": 10,
        "persisted": 5,
        "duplicate": 5,
        "deferred": 0,
        "dead_lettered": 0,
        "in_queue": 0,
        "rate_limited": 0,
    }
    assert rows["globex"]["persisted"] == 3
    assert rows["ops"]["accepted"] == 0
    assert after["totals"]["accepted"] == 13
    assert after["totals"]["persisted"] == 8
    assert after["identity"] == stats.IDENTITY
    assert [q["backlog_jobs"] for q in after["queues"]] == [0]
    # One write per account per batch; how jobs are packed into batches is the worker's.
    writes = after["sink_write"]["count"]
    assert writes >= 2
    assert after["sink_write"]["buckets"][-1] == {"le": "+Inf", "count": writes}
    assert after["sink_write"]["p99_s"] > 0


async def test_deferred_and_dead_lettered_are_read_when_kept(gateway, key, fake_redis):
    """Fields other parts of eventgate keep in the counters hash count in the identity."""
    await fake_redis.hset(
        keys.counters("acme"),
        mapping={"accepted": 10, "persisted": 4, "duplicate": 1, "deferred": 2, "dead_lettered": 1},
    )
    client = await gateway()
    row = (await stats_of(client, key))["accounts"][0]
    assert row["in_queue"] == 2
    assert row["accepted"] == sum(
        row[f] for f in ("persisted", "duplicate", "deferred", "dead_lettered", "in_queue")
    )


async def test_metrics_text_has_the_agreed_names_and_figures(gateway, key, run_worker):
    """/metrics parses, has every metric the Grafana dashboard reads with its type and
    labels, and its numbers are what was sent."""
    client = await gateway()
    assert await post(client, key, batch("a", 4)) == 202
    assert await post(client, key, batch("a", 4)) == 202
    assert await post(client, key, [{"name": "sale", "id": "x", "timestamp": "nope"}]) == 422
    assert await post(client, "eg_sk_000000000000.nope-nope-nope-nope-nope", batch("b", 1)) == 401
    run_worker()

    response = await client.get("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    for name, (kind, labels) in AGREED.items():
        family = families[name.removesuffix("_total")]
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)

    samples = await scrape(client)
    requests = samples["eventgate_requests_total"]
    assert requests[("dialect", "native"), ("status", "202")] == 2
    assert requests[("dialect", "native"), ("status", "422")] == 1
    assert requests[("dialect", "native"), ("status", "401")] == 1
    assert samples["eventgate_events_accepted_total"][(("account", "acme"),)] == 8
    assert samples["eventgate_events_rejected_total"][(("dialect", "native"),)] == 1
    assert samples["eventgate_events_persisted_total"][(("account", "acme"),)] == 4
    assert samples["eventgate_events_duplicate_total"][(("account", "acme"),)] == 4
    assert samples["eventgate_events_in_queue"][(("account", "acme"),)] == 0
    assert samples["eventgate_queue_backlog_jobs"][(("queue", "unit"),)] == 0
    assert samples["eventgate_queue_oldest_job_age_seconds"][(("queue", "unit"),)] == 0
    assert samples["eventgate_workers_alive"][()] == 0  # the burst worker has left
    assert samples["eventgate_sink_write_seconds_count"][()] >= 1
    assert samples["eventgate_enqueue_seconds_count"][()] == 2
    assert sum(samples["eventgate_group_commit_events_sum"].values()) == 8
    assert samples["eventgate_redis_up"][()] == 1
    assert "process_resident_memory_bytes" in samples or "python_info" in samples


async def test_backlog_and_oldest_job_age_while_queued(gateway, key):
    """Queued jobs show as backlog, and the head job's age as lag."""
    client = await gateway()
    assert await post(client, key, batch("a", 2)) == 202
    samples = await scrape(client)
    assert samples["eventgate_queue_backlog_jobs"][(("queue", "unit"),)] == 1
    assert samples["eventgate_queue_oldest_job_age_seconds"][(("queue", "unit"),)] >= 0
    assert samples["eventgate_events_in_queue"][(("account", "acme"),)] == 2


async def test_operator_routes_are_not_counted_but_unknown_paths_are(gateway, key):
    """Scrapes, stats reads and the page do not inflate request counts; a wrong path does."""
    client = await gateway()
    for path in ("/metrics", "/healthz", "/dashboard", "/nowhere"):
        await (await client.get(path)).read()
    await (await client.get("/v1/stats", headers=auth(key))).read()
    requests = (await scrape(client))["eventgate_requests_total"]
    assert requests == {(("dialect", "none"), ("status", "404")): 1}


async def test_rejected_events_are_counted_per_event(gateway, key):
    """Each invalid event counts once: in a refused strict batch and in a partial accept."""
    client = await gateway()
    bad = {"name": "sale", "timestamp": "nope"}
    good = {"name": "sale"}
    assert await post(client, key, [bad, good, bad]) == 422
    assert await post(client, key, [bad, good, good], "?strict=false") == 202
    response = await client.post("/events", json=[{"customerCode": "c"}], headers=auth(key))
    assert response.status == 400
    samples = await scrape(client)
    rejected = samples["eventgate_events_rejected_total"]
    assert rejected[(("dialect", "native"),)] == 3
    assert rejected[(("dialect", "catalog"),)] == 1
    assert samples["eventgate_events_accepted_total"][(("account", "acme"),)] == 2


async def test_request_counts_reach_redis_for_every_front_door(
    gateway, key, operator_key, fake_redis
):
    """Each front door adds its request counts to one hash that /v1/stats reads."""
    first, second = await gateway(), await gateway()
    assert await post(first, key, batch("a", 1)) == 202
    assert await post(second, key, batch("b", 1)) == 202
    assert await post(second, key, [{"name": "sale", "timestamp": "x"}]) == 422
    for client in (first, second):
        await client.server.app[METRICS].push(fake_redis)
    figures = await stats_of(first, operator_key)
    assert figures["requests"] == {"native": {"202": 2, "422": 1}}
    assert figures["rejected"] == {"native": 1}


async def test_unpushed_counts_wait_for_redis(gateway, key, fake_server, fake_redis):
    """Counts that could not be pushed are kept and pushed later, not lost or doubled."""
    client = await gateway()
    metrics = client.server.app[METRICS]
    metrics.count_request("native", 202)
    fake_server.connected = False
    await metrics.push(fake_redis)
    fake_server.connected = True
    metrics.count_request("native", 202)
    await metrics.push(fake_redis)
    assert await fake_redis.hgetall(keys.FRONT_DOOR_COUNTS) == {b"requests:native:202": b"2"}


async def test_the_last_counts_are_pushed_at_shutdown(gateway, key, fake_redis):
    """A front door stopping adds its last request counts to Redis: none are lost."""
    client = await gateway()
    assert await post(client, key, batch("a", 1)) == 202
    await client.close()  # the app's cleanup: the flusher, then the pusher
    assert await fake_redis.hgetall(keys.FRONT_DOOR_COUNTS) == {b"requests:native:202": b"1"}


async def test_stats_isolation(gateway, key, other_key, operator_key, fake_redis):
    """An account's key sees its own account only; an operator key sees every account and
    the gateway; a public key is refused with 403 and no key with 401."""
    client = await gateway()
    assert await post(client, key, batch("a", 2)) == 202
    assert await post(client, other_key, batch("g", 3)) == 202

    own = await stats_of(client, key)
    assert own["scope"] == "account"
    assert [row["account"] for row in own["accounts"]] == ["acme"]
    assert own["totals"]["accepted"] == 2
    for gateway_figure in ("queues", "workers_alive", "sink_write", "requests", "rejected"):
        assert own[gateway_figure] is None
    assert "globex" not in str(own)

    everything = await stats_of(client, operator_key)
    assert everything["scope"] == "operator"
    assert [row["account"] for row in everything["accounts"]] == ["acme", "globex", "ops"]
    assert everything["totals"]["accepted"] == 5
    assert everything["queues"] is not None

    public = await accounts.create_key(fake_redis, "acme", "public")
    response = await client.get("/v1/stats", headers=auth(public))
    assert response.status == 403
    assert response.content_type == "application/problem+json"
    assert (await client.get("/v1/stats")).status == 401
    bad = await client.get("/v1/stats", headers=auth(key[:-2] + "xx"))
    assert bad.status == 401


async def test_operator_keys_are_private(fake_redis):
    await accounts.create_account(fake_redis, "ops")
    with pytest.raises(accounts.AccountError, match="operator"):
        await accounts.create_key(fake_redis, "ops", "public", operator=True)
    key = await accounts.create_key(fake_redis, "ops", "private", operator=True)
    parsed = accounts.parse_key(key)
    assert parsed is not None
    record = await accounts.lookup_key(fake_redis, parsed[0])
    assert record is not None
    assert record.operator


async def test_redis_down_metrics_still_answer_stats_503(gateway, key, fake_server):
    """/metrics answers with this process's metrics and eventgate_redis_up 0; /v1/stats 503."""
    client = await gateway()
    assert await post(client, key, batch("a", 1)) == 202
    assert (await client.get("/v1/stats", headers=auth(key))).status == 200  # key now cached
    fake_server.connected = False
    samples = await scrape(client)
    assert samples["eventgate_redis_up"][()] == 0
    assert "eventgate_events_persisted_total" not in samples
    assert samples["eventgate_requests_total"][("dialect", "native"), ("status", "202")] == 1
    response = await client.get("/v1/stats", headers=auth(key))
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"


async def test_dashboard_is_served_whole_by_the_front_door(gateway):
    """The page, its script and its stylesheet; nothing it loads comes from elsewhere."""
    client = await gateway()
    page = await client.get("/dashboard")
    assert page.status == 200
    assert page.content_type == "text/html"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    html = await page.text()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sorted(assets) == [
        "dashboard/dashboard.css",
        "dashboard/dashboard.js",
        "dashboard/favicon.svg",
    ]
    for asset, kind in (
        ("dashboard.js", "text/javascript"),
        ("dashboard.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ):
        response = await client.get(f"/dashboard/{asset}")
        assert response.status == 200
        assert response.content_type == kind
        text = await response.text()
        # The SVG namespace is a name, not a download; no other absolute URL.
        assert re.findall(r"\w+://[^\s\"']+", text) in ([], ["http://www.w3.org/2000/svg"])
    assert "fetch(STATS_URL" in (await (await client.get("/dashboard/dashboard.js")).text())


def test_quantile_interpolates_within_a_bucket():
    buckets = [(0.1, 0), (0.2, 10), (float("inf"), 10)]
    assert stats.quantile(0.5, buckets) == pytest.approx(0.15)
    assert stats.quantile(0.5, [(0.1, 0), (float("inf"), 0)]) is None
    assert stats.quantile(0.99, [(0.1, 1), (float("inf"), 5)]) == 0.1  # beyond the last bound


def test_sink_write_histogram_round_trips(sync_redis):
    """What a worker records reads back as Prometheus's cumulative buckets."""
    with sync_redis.pipeline(transaction=False) as pipe:
        for seconds in (0.0004, 0.003, 0.003, 45.0):
            stats.record_sink_write(pipe, seconds)
        pipe.execute()
    latency = stats.latency(sync_redis.hgetall(keys.SINK_WRITE))
    assert latency.count == 4
    assert latency.sum_s == pytest.approx(45.0064)
    cumulative = {bucket.le: bucket.count for bucket in latency.buckets}
    assert cumulative["0.001"] == 1
    assert cumulative["0.0025"] == 1
    assert cumulative["0.005"] == 3
    assert cumulative["30"] == 3
    assert cumulative["+Inf"] == 4
