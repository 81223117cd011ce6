"""Dead letters: a poison event bisected out alone, a refusing sink, a retry window run out;
replay lands each event once; the `eventgate dlq` commands."""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from rq.job import Job
from typer.testing import CliRunner

from shared import dlq_command
from shared.cli import app
from shared.dead_letters import DeadLetters, entry_id
from shared.envelope import EnvelopeSerializer
from shared.event import Event
from tests.delivery_support import (
    counters,
    drain,
    native,
    queue_job,
    quick,
    release_scheduled,
    run_burst,
    scheduled,
)
from workers.bisection import write_bisecting
from workers.processor import BatchProcessor
from workers.replay import Replayer
from workers.retries import FIRST_FAILURE
from workers.sinks.base import SinkRefusedError, SinkUnavailableError
from workers.sinks.memory import MemorySink


def poison(event) -> bool:
    return event.properties.get("bad") is True


def replayer(sinks, client) -> Replayer:
    return Replayer(sinks, client, pending_ttl_s=600, delivered_ttl_s=600)


def test_a_poison_event_ends_in_the_dead_letters_alone(sync_redis, settings):
    """One event the sink refuses: the other 99 are written, it alone is dead-lettered with
    the sink's reason, and the counters add up."""
    sink = MemorySink()
    sink.reject = poison
    ids = [f"e{n}" for n in range(100)]
    events = native(ids)
    events[37]["properties"] = {"bad": True}
    queue_job(sync_redis, settings, "job", events)
    drain(sync_redis, settings, quick(BatchProcessor(sink, sync_redis)))
    assert sorted(event_id for _, event_id in sink.rows) == sorted(set(ids) - {"e37"})
    [letter] = DeadLetters(sync_redis).list()
    assert (letter.sink, letter.account, letter.kind, letter.count) == (
        "memory",
        "acme",
        "rejected",
        1,
    )
    assert "e37" in letter.reason
    full = DeadLetters(sync_redis).get(letter.id)
    assert [e.event_id for e in full.events] == ["e37"]
    assert sink.writes <= 16  # a bisection, not one write per event
    figures = counters(sync_redis)
    assert figures == {"accepted": 100, "persisted": 99, "duplicate": 0, "dead_lettered": 1}


def test_several_poison_events_each_alone():
    """write_bisecting finds each refused event, and writes every other one."""
    sink = MemorySink()
    sink.reject = lambda e: e.event_id in {"3", "4", "90"}
    now = datetime.now(UTC)
    events = [
        Event(account="a", event_id=str(n), name="x", occurred_at=now, received_at=now, source="s")
        for n in range(128)
    ]
    result, refused = write_bisecting(sink.write_batch, events)
    assert result.new == 125
    assert sorted(e.event_id for bad in refused for e in bad.events) == ["3", "4", "90"]
    assert all(len(bad.events) == 1 for bad in refused)


def test_replay_lands_each_event_once_and_moves_the_counters(sync_redis, settings):
    sink = MemorySink()
    sink.reject = poison
    queue_job(
        sync_redis, settings, "job", [*native(["ok"]), *native(["bad"], properties={"bad": True})]
    )
    drain(sync_redis, settings, quick(BatchProcessor(sink, sync_redis)))
    [letter] = DeadLetters(sync_redis).list()

    still = replayer([sink], sync_redis).replay(letter.id)  # still poison: it stays
    assert still.outcome == "refused"
    again = DeadLetters(sync_redis).get(letter.id)
    assert again is not None
    assert again.attempts == 2

    sink.reject = lambda _: False  # fixed (say, the column widened)
    done = replayer([sink], sync_redis).replay(letter.id)
    assert (done.outcome, done.new, done.duplicate) == ("replayed", 1, 0)
    assert DeadLetters(sync_redis).list() == []
    assert sorted(i for _, i in sink.rows) == ["bad", "ok"]
    assert replayer([sink], sync_redis).replay(letter.id).outcome == "gone"
    assert counters(sync_redis) == {
        "accepted": 2,
        "persisted": 2,
        "duplicate": 0,
        "dead_lettered": 0,
    }


def test_replay_of_events_already_in_the_sink_counts_duplicates(sync_redis, event_factory):
    """An entry whose events reached the sink anyway (a crash after the write) replays as
    duplicates: still one row each."""
    sink = MemorySink()
    events = [event_factory() for _ in range(3)]
    sink.write_batch(events[:2])
    letters = DeadLetters(sync_redis)
    entry = letters.add(sink="memory", events=events, kind="exhausted", reason="down", counted=True)
    result = replayer([sink], sync_redis).replay(entry)
    assert (result.new, result.duplicate) == (1, 2)
    assert len(sink.rows) == 3
    assert counters(sync_redis) == {"dead_lettered": 0, "persisted": 1, "duplicate": 2}


def test_the_same_events_make_one_entry(sync_redis, event_factory):
    """Dead-lettered again (a retry, a replay): one entry, counted once; a producer's resend
    of them: one entry, the copy counted as duplicate (as a sink counts a resend)."""
    letters = DeadLetters(sync_redis)
    events = [event_factory() for _ in range(2)]
    first = letters.add(sink="s", events=events, kind="rejected", reason="no", counted=True)
    again = letters.add(
        sink="s", events=events, kind="rejected", reason="still", counted=True, copy=False
    )
    assert first == again == entry_id("s", events)
    assert counters(sync_redis) == {"dead_lettered": 2}
    letters.add(sink="s", events=events, kind="rejected", reason="resent", counted=True)
    [letter] = letters.list()
    assert (letter.attempts, letter.reason, letter.count) == (3, "resent", 2)
    assert counters(sync_redis) == {"dead_lettered": 2, "duplicate": 2}
    assert letters.remove(letter) is True  # purged: still counted as dead-lettered
    assert letters.remove(letter) is False
    assert counters(sync_redis) == {"dead_lettered": 2, "duplicate": 2}


def test_a_sink_refusing_everything_dead_letters_the_batch_whole(sync_redis, settings):
    """Credentials refused: no bisection (that would cost a write per event), no retry."""
    sink = MemorySink()
    sink.fail = SinkRefusedError("401 unauthorized")
    queue_job(sync_redis, settings, "job", native([f"e{n}" for n in range(50)]))
    drain(sync_redis, settings, quick(BatchProcessor(sink, sync_redis)))
    assert sink.writes == 1
    [letter] = DeadLetters(sync_redis).list()
    assert (letter.kind, letter.count) == ("refused", 50)
    assert scheduled(sync_redis, settings) == []


def test_an_outage_longer_than_the_window_is_dead_lettered(sync_redis, settings):
    """While the sink is down the job is retried (rq Retry, backoff) and stays queued; past
    the retry window its events go to the dead letters with their attempts and times."""
    sink = MemorySink()
    sink.fail = SinkUnavailableError("connection refused")
    processor = quick(BatchProcessor(sink, sync_redis, retry_window_s=3600))
    queue_job(sync_redis, settings, "job", native(["a", "b", "c"]))
    for _ in range(3):
        run_burst(sync_redis, settings, processor)
        assert scheduled(sync_redis, settings) == ["job"]
        release_scheduled(sync_redis, settings)
    job = Job.fetch("job", connection=sync_redis, serializer=EnvelopeSerializer)
    assert job.number_of_retries == 3
    assert DeadLetters(sync_redis).list() == []
    # An hour later, still down:
    job.meta[FIRST_FAILURE] = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    job.save_meta()
    run_burst(sync_redis, settings, processor)
    assert scheduled(sync_redis, settings) == []
    assert sync_redis.exists("rq:job:job") == 0  # done: its events are dead letters now
    [letter] = DeadLetters(sync_redis).list()
    assert (letter.kind, letter.count, letter.attempts) == ("exhausted", 3, 4)
    assert letter.first_failure < datetime.now(UTC) - timedelta(hours=1)
    assert "connection refused" in letter.reason
    assert counters(sync_redis) == {"accepted": 3, "dead_lettered": 3}

    sink.fail = None
    assert replayer([sink], sync_redis).replay(letter.id).new == 3
    assert counters(sync_redis) == {
        "accepted": 3,
        "dead_lettered": 0,
        "persisted": 3,
        "duplicate": 0,
    }


def test_the_retry_delay_honours_retry_after(sync_redis, settings):
    sink = MemorySink()
    sink.fail = SinkUnavailableError("throttled", retry_after=90)
    queue_job(sync_redis, settings, "job", native(["a"]))
    run_burst(sync_redis, settings, quick(BatchProcessor(sink, sync_redis)))
    [(job_id, due)] = sync_redis.zrange(f"rq:scheduled:{settings.queue}", 0, -1, withscores=True)
    assert job_id == b"job"
    assert due >= datetime.now(UTC).timestamp() + 85


def test_unknown_sink_entries_are_left_alone(sync_redis, event_factory):
    letters = DeadLetters(sync_redis)
    entry = letters.add(
        sink="gone-sink", events=[event_factory()], kind="exhausted", reason="x", counted=False
    )
    assert replayer([MemorySink()], sync_redis).replay(entry).outcome == "no-sink"
    assert letters.get(entry) is not None


@pytest.fixture
def cli(monkeypatch, sync_redis, settings):
    """`eventgate dlq` over fakeredis."""

    @contextmanager
    def letters():
        yield DeadLetters(sync_redis), sync_redis, settings

    monkeypatch.setattr(dlq_command, "_letters", letters)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["dlq", *args])


def test_cli_lists_shows_and_purges(cli, sync_redis, event_factory):
    letters = DeadLetters(sync_redis)
    events = [event_factory(), event_factory()]
    entry = letters.add(
        sink="memory", events=events, kind="rejected", reason="NUL in jsonb", counted=True
    )
    other = letters.add(
        sink="other", events=[event_factory()], kind="exhausted", reason="down", counted=False
    )
    listed = cli("list")
    assert listed.exit_code == 0, listed.output
    assert entry in listed.output
    assert "2 entries, 3 events" in listed.output
    shown = cli("show", entry)
    assert shown.exit_code == 0
    assert "NUL in jsonb" in shown.output
    rows = [json.loads(line) for line in shown.output.splitlines() if line.startswith("{")]
    assert [r["event_id"] for r in rows] == [e.event_id for e in events]
    assert cli("show", "dl-nothing").exit_code == 1
    assert cli("purge").exit_code == 2
    purged = cli("purge", "--all", "--sink", "other")
    assert "purged 1 entry" in purged.output
    assert [x.id for x in letters.list()] == [entry]
    assert other not in cli("list").output
