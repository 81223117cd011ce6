"""The JSON Lines sink: one event per line, rotation by size, several writers at once, and
the markers that keep a re-run batch from being appended twice."""

from __future__ import annotations

import json
import threading

import pytest

from tests.delivery_support import drain, native, queue_job, quick
from workers.forwarding import ForwardGuard
from workers.processor import BatchProcessor
from workers.sinks import JsonlSink, SinkUnavailableError, WriteResult, open_sink


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_event_is_one_json_line(tmp_path, event_factory):
    sink = JsonlSink(tmp_path / "out" / "events.jsonl")
    events = [event_factory() for _ in range(3)]
    assert sink.write_batch(events) == WriteResult(3, 0)
    assert sink.write_batch(events[:1]) == WriteResult(1, 0)  # no key: it appends
    written = lines(tmp_path / "out" / "events.jsonl")
    assert [w["event_id"] for w in written] == [e.event_id for e in [*events, events[0]]]
    assert written[0]["account"] == "acme"
    assert written[0]["occurred_at"] == "2025-11-18T07:21:16.527000+00:00"
    assert written[0]["items"] == events[0].items
    assert sink.write_batch([]) == WriteResult(0, 0)


def test_rotates_by_size_and_keeps_the_newest_files(tmp_path, event_factory):
    """Past max_bytes the file moves to .1 (.1 to .2 ...); a batch is never split; files
    beyond `keep` go."""
    path = tmp_path / "events.jsonl"
    probe = tmp_path / "probe.jsonl"
    JsonlSink(probe).write_batch([event_factory()])
    one_line = probe.stat().st_size  # every event of the factory makes a line this long
    sink = JsonlSink(path, max_bytes=one_line * 3, keep=2)
    written = [event_factory() for _ in range(12)]
    for start in range(0, 12, 2):
        sink.write_batch(written[start : start + 2])
    files = sorted(p.name for p in tmp_path.glob("events.jsonl*") if not p.name.endswith(".lock"))
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    kept = [w["event_id"] for f in (".2", ".1", "") for w in lines(tmp_path / f"events.jsonl{f}")]
    assert kept == [e.event_id for e in written[-6:]]
    for f in ("", ".1", ".2"):
        assert len(lines(tmp_path / f"events.jsonl{f}")) == 2


def test_writers_in_parallel_never_interleave_lines(tmp_path, event_factory):
    """Workers share the file: whole batches, valid lines, nothing lost across a rotation."""
    path = tmp_path / "events.jsonl"
    sinks = [JsonlSink(path, max_bytes=20_000, keep=100) for _ in range(4)]
    batches = [[event_factory(properties={"pad": "x" * 200}) for _ in range(10)] for _ in range(20)]

    def write(n: int) -> None:
        for batch in batches[n::4]:
            sinks[n].write_batch(batch)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    files = [p for p in tmp_path.glob("events.jsonl*") if not p.name.endswith(".lock")]
    ids = [w["event_id"] for p in files for w in lines(p)]
    assert sorted(ids) == sorted(e.event_id for b in batches for e in b)


def test_an_unwritable_file_is_unavailable(tmp_path, event_factory):
    (tmp_path / "events.jsonl").mkdir()  # a directory where the file should be
    with pytest.raises(SinkUnavailableError):
        JsonlSink(tmp_path / "events.jsonl").write_batch([event_factory()])


def test_open_sink_reads_the_path_and_options(tmp_path, monkeypatch):
    sink = open_sink(f"jsonl:///{tmp_path}/a.jsonl#max_bytes=1000&keep=3")
    assert isinstance(sink, JsonlSink)
    assert (sink.path, sink.max_bytes, sink.keep) == (tmp_path / "a.jsonl", 1000, 3)
    assert sink.name == f"jsonl://{tmp_path}/a.jsonl"
    monkeypatch.chdir(tmp_path)
    relative = open_sink("jsonl:///logs/b.jsonl")
    assert str(relative.path) == "logs/b.jsonl"


def test_markers_keep_a_rerun_batch_from_being_appended_twice(tmp_path, sync_redis, event_factory):
    sink = JsonlSink(tmp_path / "events.jsonl")
    guard = ForwardGuard(sync_redis, sink, pending_ttl_s=600, delivered_ttl_s=600)
    events = [event_factory() for _ in range(5)]
    assert guard.write(events) == WriteResult(5, 0)
    assert guard.write([*events, event_factory()]) == WriteResult(1, 5)
    assert len(lines(tmp_path / "events.jsonl")) == 6


def test_through_a_worker_with_a_retried_job(tmp_path, sync_redis, settings):
    """A job retried after the file could not be written appends its events once."""
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    processor = quick(BatchProcessor(sink, sync_redis))
    queue_job(sync_redis, settings, "j1", native(["a", "b"]))
    queue_job(sync_redis, settings, "j2", native(["b", "c"]))  # "b" resent

    def heal(round_: int) -> None:
        # A directory in the file's place: the first round fails, then it is gone.
        if round_ == 0:
            path.mkdir()
        elif path.is_dir():
            path.rmdir()

    drain(sync_redis, settings, processor, between=heal)
    assert sorted(w["event_id"] for w in lines(path)) == ["a", "b", "c"]
