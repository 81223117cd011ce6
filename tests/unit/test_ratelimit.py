"""Front-door request limits: token buckets, 429 in every dialect's shape, settings and keys."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import contextmanager

import fakeredis
import pytest
import redis.exceptions
from typer.testing import CliRunner

from ingest.ratelimit import RequestLimiter, whole_seconds
from shared import accounts, cli, keys
from shared.limits import VENDOR_LIMITS, Limit, process_limit, request_limit
from shared.limits import set_key_limit as set_key_limit_
from tests.support import queued_batches

REVISION = {"revision": "2024-10-15"}
NATIVE_EVENT = b'{"name": "page_view"}'
BULK_BODY = json.dumps(
    {
        "data": {
            "type": "event-bulk-create",
            "attributes": {
                "profile": {"data": {"type": "profile", "attributes": {"email": "a@b.c"}}},
                "events": {
                    "data": [
                        {
                            "type": "event",
                            "attributes": {
                                "metric": {"data": {"type": "metric", "attributes": {"name": "x"}}}
                            },
                        }
                    ]
                },
            },
        }
    }
).encode()
IMPORT_BODY = json.dumps(
    {
        "common": {"identity": {"external_id": "u-1"}},
        "events": [
            {
                "event_log_id": "b0c9cf18-f3c0-4879-bb2e-92c65858dabc",
                "event_name": "df_login",
                "event_datetime": "2024-06-24T06:01:48.501Z",
            }
        ],
    }
).encode()


async def set_rate(fake_redis, rate: float | None, burst: int | None = None) -> None:
    await accounts.update_account(fake_redis, "acme", changes={"rate": rate, "burst": burst})


def request_for(dialect: str, key: str, public_key: str) -> tuple[str, dict[str, str], bytes]:
    """(url, headers, body) of a valid request of `dialect` by account acme."""
    bearer = {"Authorization": f"Bearer {key}"}
    return {
        "native": ("/v1/events", bearer, NATIVE_EVENT),
        "catalog": ("/events", bearer, b'{"type": "EventLogin", "customerCode": "c1"}'),
        "import": ("/api/v1/events?service_id=acme", {"access_token": key}, IMPORT_BODY),
        # No such person: admission comes first, so the first answer is a 404, the next 429.
        "people": (
            "/peopleevents/2/persons/a%40b.c/definitions/addToCart/events?identifierType=EMAIL",
            {"Authorization": f"App {key}"},
            b'{"properties": {}}',
        ),
        "bulk": (f"/client/event-bulk-create/?company_id={public_key}", REVISION, BULK_BODY),
    }[dialect]


@pytest.fixture
async def public_key(fake_redis, key) -> str:
    return await accounts.create_key(fake_redis, "acme", "public")


# --- bucket sizes ------------------------------------------------------------------------


def test_limits_come_from_the_account_then_the_vendor_then_the_settings(settings):
    """The seeds' limits apply per API by default; an account's own rate replaces them; the
    setting covers APIs without a vendor limit; switched off, nothing is limited."""
    plain = accounts.Account(name="a", created_at=accounts.datetime.now(accounts.UTC))
    assert request_limit(plain, "people", settings) == Limit(250.0, 250)
    assert request_limit(plain, "bulk", settings) == Limit(2.5, 10)
    assert request_limit(plain, "native", settings) is None
    tuned = accounts.msgspec.structs.replace(plain, rate=40.0)
    assert request_limit(tuned, "people", settings) == Limit(40.0, 40)
    assert request_limit(tuned, "native", settings) == Limit(40.0, 40)
    burst_only = accounts.msgspec.structs.replace(plain, burst=30)
    assert request_limit(burst_only, "bulk", settings) == Limit(2.5, 30)
    defaults = accounts.msgspec.structs.replace(settings, request_rate=100.0, request_burst=5)
    assert request_limit(plain, "catalog", defaults) == Limit(100.0, 5)
    off = accounts.msgspec.structs.replace(settings, request_limits=False)
    assert request_limit(tuned, "people", off) is None
    unlimited = accounts.msgspec.structs.replace(plain, rate=0.0)
    assert request_limit(unlimited, "people", settings) is None
    assert process_limit(plain, settings) is None
    assert process_limit(accounts.msgspec.structs.replace(plain, process_rate=7.5), settings) == (
        Limit(7.5, 8)
    )


def test_retry_after_is_whole_seconds_rounded_up():
    """Vendor SDKs int() Retry-After: 1.5 s is 2, a few microseconds is 1, never 0."""
    assert whole_seconds(1_500_000) == 2
    assert whole_seconds(3) == 1
    assert whole_seconds(0) == 1
    assert whole_seconds(2_000_000) == 2


# --- the bucket script -------------------------------------------------------------------


async def test_bucket_admits_its_burst_then_its_rate(fake_redis):
    """A fresh bucket takes `burst` requests at once, then refuses until a token comes back;
    a token comes back every 1/rate s."""
    limiter = RequestLimiter(fake_redis, timeout_s=2)
    limiter.start()
    bucket = [(keys.request_bucket("acme", "native"), Limit(rate=20.0, burst=5))]
    try:
        verdicts = [await limiter.check("acme", bucket) for _ in range(7)]
        assert [v.allowed for v in verdicts] == [True] * 5 + [False] * 2
        assert [v.remaining for v in verdicts] == [4, 3, 2, 1, 0, 0, 0]
        assert {v.limit for v in verdicts} == {5}
        assert verdicts[-1].retry_after_s == 1  # 50 ms, rounded up
        assert verdicts[4].reset_s == 1  # full again after 5 x 50 ms
        await asyncio.sleep(0.06)
        assert (await limiter.check("acme", bucket)).allowed
        assert not (await limiter.check("acme", bucket)).allowed
    finally:
        await limiter.stop()
    assert await fake_redis.hget(keys.counters("acme"), "rate_limited") == b"3"


async def test_concurrent_requests_share_one_call_and_never_over_admit(fake_redis):
    """Requests waiting together are checked in one script call, in order: exactly the
    burst is admitted, whatever the concurrency."""
    limiter = RequestLimiter(fake_redis, timeout_s=2)
    limiter.start()
    bucket = [(keys.request_bucket("acme", "native"), Limit(rate=1.0, burst=10))]
    try:
        verdicts = await asyncio.gather(*(limiter.check("acme", bucket) for _ in range(50)))
    finally:
        await limiter.stop()
    assert sum(v.allowed for v in verdicts) == 10
    assert limiter.calls <= 2


async def test_a_request_takes_from_both_buckets_or_neither(fake_redis):
    """Refused by its key's bucket, a request takes nothing from its account's."""
    limiter = RequestLimiter(fake_redis, timeout_s=2)
    limiter.start()
    account = (keys.request_bucket("acme", "native"), Limit(rate=1.0, burst=10))
    own = (keys.key_bucket("acme", "k1"), Limit(rate=1.0, burst=2))
    try:
        verdicts = [await limiter.check("acme", [account, own]) for _ in range(4)]
        assert [v.allowed for v in verdicts] == [True, True, False, False]
        assert verdicts[1].limit == 2  # the figures are of the tighter bucket
        assert verdicts[1].remaining == 0
        # The account's bucket lost two tokens, not four: another key still gets 8.
        other = [await limiter.check("acme", [account]) for _ in range(9)]
        assert [v.allowed for v in other] == [True] * 8 + [False]
    finally:
        await limiter.stop()


async def test_the_bucket_follows_the_redis_clock(fake_redis, monkeypatch):
    """Tokens come back as Redis's clock moves (TIME, read inside the script), and the
    bucket stores that clock's time. fakeredis's clock is time.time: moved 10 s ahead here,
    the empty bucket is full again though no time passed. (tests/integration shows a front
    door whose own clock is off changes nothing.)"""
    limiter = RequestLimiter(fake_redis, timeout_s=2)
    limiter.start()
    bucket_key = keys.request_bucket("acme", "native")
    bucket = [(bucket_key, Limit(rate=1.0, burst=3))]
    try:
        before = [await limiter.check("acme", bucket) for _ in range(4)]
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 10)
        seconds, micros = await fake_redis.time()
        redis_now = seconds * 1_000_000 + micros
        after = [await limiter.check("acme", bucket) for _ in range(4)]
        tat = int(await fake_redis.get(bucket_key))
    finally:
        monkeypatch.undo()
        await limiter.stop()
    assert [v.allowed for v in before] == [True, True, True, False]
    assert [v.allowed for v in after] == [True, True, True, False]
    assert abs(tat - (redis_now + 3_000_000)) < 500_000


async def test_redis_down_is_503_not_a_hang(fake_redis, fake_server):
    """A limiter that cannot reach Redis answers 503 at once."""
    limiter = RequestLimiter(fake_redis, timeout_s=2)
    limiter.start()
    fake_server.connected = False
    try:
        with pytest.raises(Exception, match="Redis is unavailable") as caught:
            await limiter.check("acme", [(keys.request_bucket("acme", "x"), Limit(1.0, 1))])
    finally:
        fake_server.connected = True
        await limiter.stop()
    assert caught.value.status == 503  # type: ignore[attr-defined]
    assert not isinstance(caught.value, redis.exceptions.RedisError)


# --- the answers, dialect by dialect ------------------------------------------------------

EXPECTED_429 = {
    "native": lambda body: body["status"] == 429 and body["type"].endswith("/rate_limited"),
    "catalog": lambda body: body["error"]["code"] == "too_many_requests",
    "import": lambda body: (body["code"], body["message"]) == ("40401", "TOO_MANY_REQUEST"),
    "people": lambda body: (
        body["requestError"]["serviceException"]["messageId"] == "TOO_MANY_REQUESTS"
    ),
    "bulk": lambda body: (
        body["errors"][0]["code"] == "throttled" and body["errors"][0]["status"] == 429
    ),
}


@pytest.mark.parametrize("dialect", list(EXPECTED_429))
async def test_over_the_limit_is_429_in_the_dialects_shape_with_headers(
    gateway, fake_redis, key, public_key, dialect
):
    """Past its burst a producer gets 429 in its vendor's shape, a whole-second
    Retry-After and the RateLimit-* headers; nothing of the refused request is queued and
    the refusal is counted."""
    await set_rate(fake_redis, 0.5, 2)
    client = await gateway()
    url, headers, body = request_for(dialect, key, public_key)
    first = [await client.post(url, data=body, headers=headers) for _ in range(2)]
    for response in first:
        assert response.status != 429
        assert response.headers["RateLimit-Limit"] == "2"
    assert [r.headers["RateLimit-Remaining"] for r in first] == ["1", "0"]
    queued = len(await queued_batches(fake_redis))
    refused = await client.post(url, data=body, headers=headers)
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "2"  # one token every 2 s, rounded up
    assert refused.headers["RateLimit-Limit"] == "2"
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert int(refused.headers["RateLimit-Reset"]) in (3, 4)
    assert EXPECTED_429[dialect](await refused.json(content_type=None))
    assert len(await queued_batches(fake_redis)) == queued
    assert await fake_redis.hget(keys.counters("acme"), "rate_limited") == b"1"
    if dialect == "bulk":  # browsers may read the headers of a cross-origin answer
        assert "Retry-After" in refused.headers["Access-Control-Expose-Headers"]


async def test_successful_answers_carry_the_headers(gateway, fake_redis, key):
    """A 202 says how much of the bucket is left."""
    await set_rate(fake_redis, 10.0, 20)
    client = await gateway()
    response = await client.post(
        "/v1/events", data=NATIVE_EVENT, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status == 202
    assert response.headers["RateLimit-Limit"] == "20"
    assert response.headers["RateLimit-Remaining"] == "19"
    assert response.headers["RateLimit-Reset"] == "1"


async def test_unlimited_accounts_make_no_redis_call(gateway, fake_redis, key):
    """Without a limit (native's default) no bucket is checked and no header is sent."""
    client = await gateway()
    response = await client.post(
        "/v1/events", data=NATIVE_EVENT, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status == 202
    assert "RateLimit-Limit" not in response.headers
    assert not await fake_redis.keys("eg:rl:*")


async def test_the_bulk_vendor_default_is_burst_10(gateway, fake_redis, public_key):
    """Seed 004: ten requests at once, the eleventh waits (150/min: a token every 0.4 s)."""
    client = await gateway()
    url, headers, body = request_for("bulk", "", public_key)
    statuses = [(await client.post(url, data=body, headers=headers)).status for _ in range(11)]
    assert statuses == [202] * 10 + [429]


async def test_a_key_with_a_lower_limit_of_its_own(gateway, fake_redis, key):
    """A key's own limit binds before its account's; another key of the account is not held."""
    await set_rate(fake_redis, 100.0, 100)
    await set_key_limit_(fake_redis, key, rate=1.0, burst=1)
    other = await accounts.create_key(fake_redis, "acme", "private")
    client = await gateway()

    async def post(k: str) -> int:
        headers = {"Authorization": f"Bearer {k}"}
        return (await client.post("/v1/events", data=NATIVE_EVENT, headers=headers)).status

    assert [await post(key), await post(key), await post(other)] == [202, 429, 202]
    record = await accounts.find_key(fake_redis, key)
    assert (record.rate, record.burst) == (1.0, 1)


async def test_limits_reach_the_front_door_within_the_cache_time(gateway, fake_redis, key):
    """A changed rate applies once the account cache expires (EVENTGATE_KEY_CACHE_S)."""
    client = await gateway(key_cache_s=0.2)
    headers = {"Authorization": f"Bearer {key}"}
    assert (await client.post("/v1/events", data=NATIVE_EVENT, headers=headers)).status == 202
    await set_rate(fake_redis, 1.0, 1)
    await asyncio.sleep(0.25)
    statuses = [
        (await client.post("/v1/events", data=NATIVE_EVENT, headers=headers)).status
        for _ in range(2)
    ]
    assert statuses == [202, 429]


# --- settings: the admin API and the CLI ---------------------------------------------------


async def test_account_api_reads_and_patches_the_keys_own_account(gateway, fake_redis, key):
    """GET shows the settings and the limits in force; PATCH changes what a tenant may
    change; limits need an operator key (a tenant must not lift its own rate)."""
    client = await gateway()
    auth = {"Authorization": f"Bearer {key}"}
    shown = await (await client.get("/v1/account", headers=auth)).json()
    assert shown["account"]["name"] == "acme"
    assert shown["effective"]["requests"]["people"] == {"rate": 250.0, "burst": 250}
    assert shown["effective"]["requests"]["native"] is None
    patched = await client.patch(
        "/v1/account", data=b'{"accept_unregistered": false}', headers=auth
    )
    assert patched.status == 200
    assert (await patched.json())["account"]["accept_unregistered"] is False
    refused = await client.patch("/v1/account", data=b'{"rate": 1000}', headers=auth)
    assert refused.status == 403
    operator = await accounts.create_key(fake_redis, "acme", "private", operator=True)
    op = {"Authorization": f"Bearer {operator}"}
    patched = await client.patch(
        "/v1/account", data=b'{"rate": 50, "burst": 5, "process_rate": 20, "shard": 2}', headers=op
    )
    body = await patched.json()
    assert patched.status == 200, body
    assert body["effective"]["requests"]["bulk"] == {"rate": 50.0, "burst": 5}
    assert body["effective"]["process"] == {"rate": 20.0, "burst": 20}
    assert body["account"]["shard"] == 2
    cleared = await (
        await client.patch("/v1/account", data=b'{"rate": null, "burst": null}', headers=op)
    ).json()
    assert cleared["effective"]["requests"]["bulk"] == {"rate": 2.5, "burst": 10}
    bad = await client.patch("/v1/account", data=b'{"rate": -1}', headers=op)
    assert bad.status == 422
    typo = await client.patch("/v1/account", data=b'{"rte": 1}', headers=op)
    assert typo.status == 422
    public = await accounts.create_key(fake_redis, "acme", "public")
    assert (
        await client.get("/v1/account", headers={"Authorization": f"Bearer {public}"})
    ).status == 403


def test_cli_sets_and_lists_account_and_key_limits(monkeypatch, tmp_path, fake_server, sync_redis):
    """`eventgate accounts set --rate --burst --process-rate --shard`, 'default' to clear;
    `eventgate keys set KEY --rate`; bad values exit 1 or 2 with the reason."""
    monkeypatch.setenv("EVENTGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(cli, "_redis", _fake_redis_for(fake_server))
    runner = CliRunner()
    assert runner.invoke(cli.app, ["accounts", "create", "shop"]).exit_code == 0
    result = runner.invoke(
        cli.app,
        ["accounts", "set", "shop", "--rate", "100", "--burst", "200", "--process-rate", "50"],
    )
    assert result.exit_code == 0, result.output
    assert "rate 100, burst 200, process rate 50, shard default" in _words(result.output)
    result = runner.invoke(
        cli.app, ["accounts", "set", "shop", "--shard", "3", "--rate", "default"]
    )
    assert "rate default, burst 200, process rate 50, shard 3" in _words(result.output)
    listed = runner.invoke(cli.app, ["accounts", "list"]).output
    assert "shop" in listed
    assert "200" in listed
    assert runner.invoke(cli.app, ["accounts", "set", "shop", "--rate", "-5"]).exit_code == 1
    assert runner.invoke(cli.app, ["accounts", "set", "shop", "--rate", "fast"]).exit_code == 2
    created = runner.invoke(cli.app, ["keys", "create", "shop"])
    full_key = created.stdout.strip().splitlines()[-1]
    result = runner.invoke(cli.app, ["keys", "set", full_key, "--rate", "5"])
    assert result.exit_code == 0, result.output
    assert "rate 5, burst default" in _words(result.output)
    raw = sync_redis.hget(keys.API_KEYS, full_key.split("_")[2].split(".")[0])
    assert json.loads(raw)["rate"] == 5.0


def _words(text: str) -> str:
    """Rich wraps lines to the terminal's width."""
    return " ".join(text.split())


def _fake_redis_for(fake_server):
    @contextmanager
    def fake(_settings):
        yield fakeredis.FakeAsyncRedis(server=fake_server)

    return fake


def test_vendor_limits_are_the_seeds():
    """People: 250 requests/s; bulk: burst 10, steady 150 a minute."""
    assert VENDOR_LIMITS["people"] == Limit(250.0, 250)
    assert VENDOR_LIMITS["bulk"].burst == 10
    assert VENDOR_LIMITS["bulk"].rate * 60 == pytest.approx(150)


def test_cli_stats_shows_queues_and_per_account_counts(
    monkeypatch, tmp_path, fake_server, sync_redis
):
    """`eventgate stats`: per queue its waiting jobs and the oldest one's age; per account
    accepted, persisted, duplicate, deferred, rate-limited; `--json` the same as data."""
    monkeypatch.setenv("EVENTGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("EVENTGATE_QUEUE", "unit")
    monkeypatch.setattr(cli, "_redis", _fake_redis_for(fake_server))
    runner = CliRunner()
    assert runner.invoke(cli.app, ["accounts", "create", "shop"]).exit_code == 0
    sync_redis.hset(
        keys.counters("shop"),
        mapping={"accepted": 9, "persisted": 4, "duplicate": 1, "deferred": 3, "rate_limited": 7},
    )
    sync_redis.sadd("rq:queues", "rq:queue:unit")
    sync_redis.rpush("rq:queue:unit", "j1")
    sync_redis.hset("rq:job:j1", "enqueued_at", "2020-01-01T00:00:00.000000Z")
    result = runner.invoke(cli.app, ["stats"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    cells = _words(result.output.replace("│", " "))  # the table's cells, in order
    assert "rate-limited requests" in cells
    assert "shop 9 4 1 3 0 1 7" in cells  # ... deferred 3, dead-lettered 0, in queue 1
    assert "unit 1" in cells
    as_json = json.loads(runner.invoke(cli.app, ["stats", "--json"]).stdout)
    [shop] = as_json["accounts"]
    assert (shop["deferred"], shop["rate_limited"], shop["in_queue"]) == (3, 7, 1)
    [queue] = as_json["gateway"]["queues"]
    assert queue["backlog_jobs"] == 1
    assert queue["oldest_job_age_s"] > 3600
