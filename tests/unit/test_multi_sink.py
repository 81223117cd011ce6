"""Several sinks at once: each has its own progress, so one that fails neither blocks nor
duplicates the others; EVENTGATE_SINK lists them."""

from __future__ import annotations

import threading
import time

import pytest
from rq import Queue

from shared.dead_letters import DeadLetters
from shared.envelope import EnvelopeSerializer
from shared.errors import ConfigError
from tests.delivery_support import counters, drain, native, queue_job, quick, run_burst, scheduled
from workers import sinks as sinks_module
from workers.delivery import Delivery, Unit
from workers.processor import BatchProcessor
from workers.riders import RiderClaims
from workers.sinks import (
    HttpSink,
    JsonlSink,
    SinkUnavailableError,
    SqliteSink,
    open_sinks,
)
from workers.sinks.memory import MemorySink


def ids(sink: MemorySink) -> list[str]:
    return sorted(e.event_id for e in sink.received)


@pytest.fixture
def sinks() -> tuple[MemorySink, MemorySink]:
    """A keyed sink (counted: the first) and a forward-like one (no key: markers guard it)."""
    return MemorySink("db"), MemorySink("forward", keyed=False, max_events=4)


def test_a_failing_second_sink_is_retried_alone(sinks, sync_redis, settings):
    """The forward target is down: the database gets every event once, counted once; when
    the target returns, the retries send it every event once and leave the database be."""
    db, forward = sinks
    forward.fail = SinkUnavailableError("connection refused")
    processor = quick(BatchProcessor([db, forward], sync_redis))
    for n in range(4):
        queue_job(sync_redis, settings, f"j{n}", native([f"{n}-{i}" for i in range(5)]))
    queue_job(sync_redis, settings, "resend", native(["0-0", "0-1"]))

    run_burst(sync_redis, settings, processor)
    assert len(db.rows) == 20
    assert sorted(scheduled(sync_redis, settings)) == ["j0", "j1", "j2", "j3", "resend"]
    db_writes = db.writes

    def heal(round_: int) -> None:
        if round_ == 1:
            forward.fail = None

    drain(sync_redis, settings, processor, between=heal)
    assert db.writes == db_writes, "the database was written again"
    assert ids(forward) == sorted(f"{n}-{i}" for n in range(4) for i in range(5))
    assert counters(sync_redis) == {"accepted": 22, "persisted": 20, "duplicate": 2}
    assert sync_redis.keys("eg:sink-done:*") == [], "progress kept after every sink had it"
    assert sync_redis.keys("eg:fwd-batch:*") == []


def test_a_failing_first_sink_does_not_duplicate_the_second(sinks, sync_redis, settings):
    db, forward = sinks
    db.fail = SinkUnavailableError("database restarting")
    processor = quick(BatchProcessor([db, forward], sync_redis))
    queue_job(sync_redis, settings, "j", native(["a", "b", "c"]))
    run_burst(sync_redis, settings, processor)
    assert ids(forward) == ["a", "b", "c"]
    assert counters(sync_redis) == {"accepted": 3}  # counted with the first sink only
    db.fail = None
    drain(sync_redis, settings, processor)
    assert ids(forward) == ["a", "b", "c"]
    assert sorted(i for _, i in db.rows) == ["a", "b", "c"]
    assert counters(sync_redis) == {"accepted": 3, "persisted": 3, "duplicate": 0}


def test_a_poison_event_on_one_sink_only(sinks, sync_redis, settings):
    """Refused by the forward target alone: dead-lettered for it (not counted: the first
    sink has it), every sink has everything else."""
    db, forward = sinks
    forward.reject = lambda e: e.event_id == "x"
    queue_job(sync_redis, settings, "j", native(["a", "x", "b"]))
    drain(sync_redis, settings, quick(BatchProcessor([db, forward], sync_redis)))
    assert sorted(i for _, i in db.rows) == ["a", "b", "x"]
    assert ids(forward) == ["a", "b"]
    [letter] = DeadLetters(sync_redis).list()
    assert (letter.sink, letter.count, letter.counted) == ("forward", 1, False)
    assert counters(sync_redis) == {"accepted": 3, "persisted": 3, "duplicate": 0}


def test_window_over_dead_letters_for_the_failing_sink_only(sinks, sync_redis, settings):
    db, forward = sinks
    forward.fail = SinkUnavailableError("down for days")
    processor = quick(BatchProcessor([db, forward], sync_redis, retry_window_s=1))
    queue_job(sync_redis, settings, "j", native(["a", "b"]))
    run_burst(sync_redis, settings, processor)
    time.sleep(1.1)
    drain(sync_redis, settings, processor)
    assert sorted(i for _, i in db.rows) == ["a", "b"]
    [letter] = DeadLetters(sync_redis).list()
    assert (letter.sink, letter.kind, letter.count, letter.counted) == (
        "forward",
        "exhausted",
        2,
        False,
    )
    assert counters(sync_redis) == {"accepted": 2, "persisted": 2, "duplicate": 0}


def test_an_idle_worker_waits_out_a_dead_sink_instead_of_spinning(sync_redis, event_factory):
    """With every sink backing off, a job waits (bounded) rather than fail at once, so a
    worker does not race through the queue; with another sink healthy, it does not wait."""
    down = MemorySink("down")
    down.fail = SinkUnavailableError("refused")
    delivery = Delivery([down], sync_redis, retry_window_s=60, marker_ttl_s=60, backoff_max_s=0.3)
    unit = Unit("env", "acme", [event_factory()])
    with pytest.raises(SinkUnavailableError):
        delivery.deliver([unit])
    delivery.breakers["down"].failed(retry_after=5)  # e.g. the sink's Retry-After
    started = time.monotonic()
    with pytest.raises(SinkUnavailableError, match="backing off"):
        delivery.deliver([unit])
    assert time.monotonic() - started >= 0.29  # waited, up to the backoff cap
    assert down.writes == 1  # the backoff outlasted the wait: not tried again yet

    healthy = MemorySink("up")
    both = Delivery([healthy, down], sync_redis, retry_window_s=60, marker_ttl_s=60)
    with pytest.raises(SinkUnavailableError):
        both.deliver([Unit("env2", "acme", [event_factory()])])
    started = time.monotonic()
    with pytest.raises(SinkUnavailableError, match="backing off"):
        both.deliver([Unit("env3", "acme", [event_factory()])])
    assert time.monotonic() - started < 0.2
    assert len(healthy.rows) == 2


def test_a_stop_cuts_the_wait_short(sync_redis, event_factory):
    stopping = threading.Event()
    down = MemorySink("down")
    down.fail = SinkUnavailableError("refused")
    delivery = Delivery([down], sync_redis, retry_window_s=60, marker_ttl_s=60, stopping=stopping)
    unit = Unit("env", "acme", [event_factory()])
    with pytest.raises(SinkUnavailableError):
        delivery.deliver([unit])
    delivery.breakers["down"].failed(retry_after=30)
    threading.Timer(0.2, stopping.set).start()
    started = time.monotonic()
    with pytest.raises(SinkUnavailableError):
        delivery.deliver([unit])
    assert time.monotonic() - started < 2


def test_the_setting_lists_sinks_in_order(tmp_path):
    setting = (
        f"sqlite:///{tmp_path}/events.db, jsonl:///{tmp_path}/e.jsonl#keep=2,"
        "https://hooks.example.com/in?a=1,b=2#batch=100"
    )
    opened = open_sinks(setting)
    try:
        assert [type(s) for s in opened] == [SqliteSink, JsonlSink, HttpSink]
        assert opened[2].name == "https://hooks.example.com/in"
        assert opened[2].url == "https://hooks.example.com/in?a=1,b=2"  # its comma kept
        assert opened[2].max_events == 100
    finally:
        for sink in opened:
            sink.close()


def test_a_sink_listed_twice_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="more than once"):
        open_sinks(f"jsonl:///{tmp_path}/a.jsonl,jsonl:///{tmp_path}/a.jsonl#keep=3")


def test_an_empty_setting_is_refused_like_before():
    with pytest.raises(ConfigError, match="EVENTGATE_SINK"):
        open_sinks("")


def test_distinct_names_are_required(sync_redis):
    with pytest.raises(ValueError, match="distinct"):
        Delivery([MemorySink(), MemorySink()], sync_redis, retry_window_s=1, marker_ttl_s=1)


def test_a_worker_started_during_an_outage_waits_for_its_sinks(monkeypatch):
    """Opening the sinks is tried again with backoff while one is unavailable, instead of
    the worker exiting and being restarted in a loop; a stop ends the wait."""
    calls = []

    def flaky(setting: str) -> list[MemorySink]:
        calls.append(setting)
        if len(calls) < 3:
            raise SinkUnavailableError("PostgreSQL unreachable")
        return [MemorySink()]

    monkeypatch.setattr(sinks_module, "open_sinks", flaky)
    monkeypatch.setattr(sinks_module, "equal_jitter", lambda *_, **__: 0.01)
    opened = sinks_module.open_sinks_when_up("postgresql://db/x", threading.Event())
    assert opened is not None
    assert len(calls) == 3
    stopping = threading.Event()
    stopping.set()
    assert sinks_module.open_sinks_when_up("postgresql://db/x", stopping) is None


def test_linger_waits_once_for_more_riders(sync_redis, settings):
    """A sink's linger: with fewer waiting jobs than riders allowed, a worker waits that long
    once, and takes what arrived meanwhile."""
    queue = Queue(settings.queue, connection=sync_redis, serializer=EnvelopeSerializer)
    queue_job(sync_redis, settings, "early", native(["a"]))
    threading.Timer(0.05, lambda: queue_job(sync_redis, settings, "late", native(["b"]))).start()
    started = time.monotonic()
    riders = RiderClaims(sync_redis, max_riders=5, linger_s=0.3).claim(queue)
    assert [r.job_id for r in riders] == ["early", "late"]
    assert 0.29 <= time.monotonic() - started < 1
    assert RiderClaims(sync_redis, max_riders=5).claim(queue) == []  # no linger: at once
