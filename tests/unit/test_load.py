"""`eventgate load`: bodies, resend and invalid ratios, pacing, bounds, and a run against a
local server."""

from __future__ import annotations

import random

import msgspec
import pytest
from aiohttp import web
from typer.testing import CliRunner

from shared.cli import app
from shared.formats.native import decode_body
from shared.load.bodies import BODY_MAKERS, EventSource, RequestMaker, native_request
from shared.load.pacing import (
    MAX_DURATION_S,
    Burst,
    Pacer,
    UnboundedRunError,
    check_bounds,
    expected_requests,
)
from shared.load.runner import LoadConfig, generate
from shared.load.stats import Histogram, Stats, outcome


def maker(**overrides) -> RequestMaker:
    rng = random.Random(7)
    fields = {
        "dialect": "native",
        "keys": ["k1"],
        "batch": 10,
        "source": EventSource("t", 0.0, rng),
        "rng": rng,
    }
    return RequestMaker(**{**fields, **overrides})


# --- bodies ----------------------------------------------------------------------------------


def test_native_batch_is_an_array_the_front_door_decodes():
    """A batch is a JSON array of native events with distinct ids, sent with the Bearer key."""
    request = maker(batch=25).next()
    events = decode_body(request.body)
    assert request.path == "/v1/events"
    assert request.headers["Authorization"] == "Bearer k1"
    assert request.body.startswith(b"[")
    assert len(events) == request.events == 25
    assert len({e.id for e in events}) == 25


def test_single_event_is_sent_as_an_object():
    """Batch 1 sends one object, the other shape the native API takes."""
    request = maker(batch=1).next()
    assert request.body.startswith(b"{")
    assert len(decode_body(request.body)) == 1


def test_invalid_request_fails_native_validation():
    """An invalid request carries one event with an empty name: the front door refuses it."""
    events, _ = EventSource("x").events(3)
    request = native_request(events, "k", True)  # noqa: FBT003
    assert request.invalid
    with pytest.raises(msgspec.ValidationError):
        decode_body(request.body)


def test_native_is_registered_and_unknown_dialects_are_refused():
    assert "native" in BODY_MAKERS
    with pytest.raises(ValueError, match="unknown dialect"):
        maker(dialect="nope")


def test_keys_are_spread_over_requests():
    """Several keys (accounts) are all used."""
    m = maker(keys=["a", "b", "c"])
    used = {m.next().headers["Authorization"] for _ in range(60)}
    assert used == {"Bearer a", "Bearer b", "Bearer c"}


# --- ratios ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5])
def test_duplicate_ratio_resends_that_share_of_ids_already_sent(ratio):
    """About `ratio` of the events reuse an id sent before; the rest are new and unique."""
    source = EventSource("d", ratio, random.Random(1))
    sent: set[str] = set()
    resends = 0
    for _ in range(20_000):
        event, resend = source.event()
        if resend:
            assert event["id"] in sent
            resends += 1
        else:
            assert event["id"] not in sent
            sent.add(event["id"])
    assert resends / 20_000 == pytest.approx(ratio, abs=0.01)


def test_duplicates_are_counted_per_request():
    """A request reports how many of its events are resends."""
    m = maker(source=EventSource("d", 1.0, random.Random(2)), batch=10)
    first = m.next()
    second = m.next()
    assert first.duplicates == 9  # the first event had nothing to resend yet
    assert second.duplicates == 10
    assert {e.id for e in decode_body(second.body)} <= {e.id for e in decode_body(first.body)}


@pytest.mark.parametrize("ratio", [0.0, 0.2, 1.0])
def test_invalid_ratio_makes_that_share_of_requests_invalid(ratio):
    """About `ratio` of the requests are invalid, and exactly those fail validation."""
    m = maker(invalid_ratio=ratio)
    requests = [m.next() for _ in range(3000)]
    invalid = [r for r in requests if r.invalid]
    assert len(invalid) / len(requests) == pytest.approx(ratio, abs=0.03)
    for request in requests[:200]:
        if request.invalid:
            with pytest.raises(msgspec.ValidationError):
                decode_body(request.body)
        else:
            assert decode_body(request.body)


# --- pacing and bounds -----------------------------------------------------------------------


def test_pacer_spaces_slots_at_the_rate():
    pacer = Pacer(100.0)
    slots = [pacer.next_slot() for _ in range(1000)]
    assert slots[1] - slots[0] == pytest.approx(0.01)
    assert slots[-1] == pytest.approx(9.99)


def test_bursts_multiply_the_rate_inside_their_window():
    """10x for 2 s every 30 s: slots in [30, 32) are 10x as dense; the run's count adds up."""
    burst = Burst(10.0, 2.0, 30.0)
    pacer = Pacer(100.0, burst)
    slots = []
    while (slot := pacer.next_slot()) < 60.0:
        slots.append(slot)
    in_burst = [s for s in slots if 30.0 <= s < 32.0]
    before = [s for s in slots if 28.0 <= s < 30.0]
    assert len(in_burst) == pytest.approx(2000, abs=2)
    assert len(before) == pytest.approx(200, abs=2)
    assert len(slots) == pytest.approx(expected_requests(100.0, 60.0, burst), abs=2)
    assert expected_requests(100.0, 60.0, burst) == pytest.approx(7800)


def test_max_speed_has_every_slot_due_at_once():
    pacer = Pacer(None)
    assert {pacer.next_slot() for _ in range(5)} == {0.0}


def test_bursts_need_a_rate_and_sane_windows():
    with pytest.raises(ValueError, match="need a target rate"):
        Pacer(None, Burst(10.0, 2.0, 30.0))
    with pytest.raises(ValueError, match="every > seconds"):
        Burst(10.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="rate must be positive"):
        Pacer(0.0)


def test_unbounded_runs_are_refused():
    """Neither a duration nor a count: refused; past the cap too; a count alone is capped."""
    with pytest.raises(UnboundedRunError, match="unbounded"):
        check_bounds(None, None)
    with pytest.raises(UnboundedRunError):
        check_bounds(MAX_DURATION_S + 1, None)
    with pytest.raises(UnboundedRunError):
        check_bounds(None, 0)
    assert check_bounds(None, 10) == MAX_DURATION_S
    assert check_bounds(5.0, None) == 5.0
    with pytest.raises(UnboundedRunError):
        LoadConfig(keys=("k",)).check()


def test_load_command_refuses_an_unbounded_run():
    """`eventgate load` without --duration or --requests exits 2 before sending anything."""
    result = CliRunner().invoke(app, ["load", "--key", "k"])
    assert result.exit_code == 2
    assert "unbounded" in result.output


def test_config_refuses_other_hosts_schemes_and_bad_ratios():
    with pytest.raises(ValueError, match="http"):
        LoadConfig(url="ftp://x", keys=("k",), requests=1).check()
    with pytest.raises(ValueError, match="ratio"):
        LoadConfig(keys=("k",), requests=1, invalid_ratio=1.5).check()


def test_share_splits_rate_count_and_concurrency_over_processes():
    config = LoadConfig(keys=("k",), rate=90.0, requests=100, concurrency=10, processes=3)
    shares = [config.share(i) for i in range(3)]
    assert sum(s.requests or 0 for s in shares) == 100
    assert sum(s.concurrency for s in shares) == 10
    assert sum(s.rate or 0 for s in shares) == pytest.approx(90.0)
    assert len({s.prefix for s in shares}) == 3


# --- counting --------------------------------------------------------------------------------


def test_histogram_percentiles_within_two_percent():
    histogram = Histogram()
    for ms in range(1, 1001):
        histogram.record(ms / 1000)
    assert histogram.percentile(50) == pytest.approx(0.5, rel=0.02)
    assert histogram.percentile(99) == pytest.approx(0.99, rel=0.02)
    other = Histogram()
    other.record(2.0)
    histogram.merge(other)
    assert histogram.total == 1001
    assert histogram.percentile(100) == pytest.approx(2.0, rel=0.02)


def test_outcomes_and_unexpected_answers():
    assert [outcome(s) for s in (202, 400, 429, 503, 500, None)] == [
        "2xx",
        "4xx",
        "429",
        "503",
        "5xx",
        "error",
    ]
    stats = Stats()
    stats.record(202, 0.01, events=10, duplicates=2, invalid=False)
    stats.record(422, 0.01, events=10, duplicates=0, invalid=True)
    stats.record(202, 0.01, events=10, duplicates=0, invalid=True)  # should have been refused
    assert stats.events_accepted == 20
    assert stats.unexpected == 1
    assert stats.summary()["duplicates_sent"] == 2


# --- a run -----------------------------------------------------------------------------------


async def test_generate_sends_the_requests_asked_for(aiohttp_server):
    """Against a server that refuses invalid bodies: every request is answered as expected."""

    async def handler(request: web.Request) -> web.Response:
        try:
            decode_body(await request.read())
        except msgspec.ValidationError:
            return web.json_response({}, status=422)
        return web.json_response({}, status=202)

    server_app = web.Application()
    server_app.router.add_post("/v1/events", handler)
    server = await aiohttp_server(server_app)
    config = LoadConfig(
        url=str(server.make_url("")),
        keys=("k",),
        batch=5,
        requests=60,
        concurrency=4,
        invalid_ratio=0.25,
        seed=3,
    )
    stats = await generate(config)
    assert stats.sent == 60
    assert stats.answers.get("2xx", 0) + stats.answers.get("4xx", 0) == 60
    assert stats.answers.get("4xx", 0) == stats.invalid_sent > 0
    assert stats.unexpected == 0
    assert stats.events_accepted == 5 * stats.answers["2xx"]


async def test_generate_paces_requests(aiohttp_server):
    """20 requests at 200/s take about 0.1 s, not as fast as the server answers."""

    async def handler(_request: web.Request) -> web.Response:
        return web.json_response({}, status=202)

    server_app = web.Application()
    server_app.router.add_post("/v1/events", handler)
    server = await aiohttp_server(server_app)
    config = LoadConfig(url=str(server.make_url("")), keys=("k",), batch=1, requests=20, rate=200.0)
    stats = await generate(config)
    assert stats.sent == 20
    assert stats.elapsed_s >= 0.09
