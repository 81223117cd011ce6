"""The SQLite sink and `open_sink`: counting, the stored row, locking, URL parsing."""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from shared.errors import ConfigError
from shared.settings import load_settings
from workers.sinks import (
    PostgresSink,
    SinkUnavailableError,
    SqliteSink,
    WriteResult,
    open_sink,
)
from workers.sinks.base import COLUMNS

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "events.db"


@pytest.fixture
def sink(db_path):
    sink = SqliteSink(db_path)
    yield sink
    sink.close()


def rows(db_path) -> list[dict[str, object]]:
    with sqlite3.connect(db_path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM events ORDER BY rowid")]


def test_new_then_duplicate_across_batches(sink, event_factory, db_path):
    first = [event_factory() for _ in range(3)]
    assert sink.write_batch(first) == WriteResult(new=3, duplicate=0)
    # A resent batch with one new event: only that one is stored.
    assert sink.write_batch([*first, event_factory()]) == WriteResult(new=1, duplicate=3)
    assert len(rows(db_path)) == 4


def test_duplicates_inside_one_batch_count_as_duplicates(sink, event_factory, db_path):
    event = event_factory()
    result = sink.write_batch([event, event, event_factory(), event])
    assert result == WriteResult(new=2, duplicate=2)
    assert len(rows(db_path)) == 2


def test_same_event_id_in_another_account_is_new(sink, event_factory):
    event = event_factory()
    other = msgspec.structs.replace(event, account="globex")
    assert sink.write_batch([event, other]) == WriteResult(new=2, duplicate=0)


def test_first_write_wins(sink, event_factory, db_path):
    """A duplicate never overwrites: the row keeps what was stored first."""
    event = event_factory(name="first")
    sink.write_batch([event])
    sink.write_batch([msgspec.structs.replace(event, name="second")])
    assert [row["name"] for row in rows(db_path)] == ["first"]


def test_empty_batch(sink, db_path):
    assert sink.write_batch([]) == WriteResult(new=0, duplicate=0)
    assert rows(db_path) == []


def test_row_round_trips(sink, event_factory, db_path):
    event = event_factory(
        identity={"email": "ä@example.com", "kakao_id": "k-9"},
        properties={"nested": {"list": [1, 2.5, None, True]}, "text": '日本語 "quoted"'},
        items=[{"sku": "A"}, {"sku": "B", "qty": 3}],
        value=None,
        currency=None,
    )
    sink.write_batch([event])
    (row,) = rows(db_path)
    assert list(row) == [*COLUMNS[:5], "stored_at", *COLUMNS[5:]]
    assert (row["account"], row["event_id"], row["name"], row["source"]) == (
        event.account,
        event.event_id,
        event.name,
        event.source,
    )
    assert msgspec.json.decode(row["identity"]) == event.identity
    assert msgspec.json.decode(row["properties"]) == event.properties
    assert msgspec.json.decode(row["items"]) == event.items
    assert row["value"] is None
    assert row["currency"] is None


def test_json_columns_are_queryable_text(sink, event_factory, db_path):
    sink.write_batch([event_factory(value=12.5, currency="KRW")])
    with sqlite3.connect(db_path) as conn:
        found = conn.execute(
            "SELECT json_extract(properties, '$.productCode'), json_extract(items, '$[0].sku'),"
            " typeof(identity), value, currency FROM events"
        ).fetchone()
    assert found == ("P-1", "S-1", "text", 12.5, "KRW")


def test_timestamps_are_stored_in_utc(sink, event_factory, db_path):
    seoul = timezone(timedelta(hours=9))
    event = event_factory(
        occurred_at=datetime(2025, 11, 18, 16, 21, 16, 527000, tzinfo=seoul),
        received_at=datetime(2025, 11, 18, 7, 21, 17),  # noqa: DTZ001 - naive on purpose
    )
    before = datetime.now(UTC)
    sink.write_batch([event])
    (row,) = rows(db_path)
    assert row["occurred_at"] == "2025-11-18T07:21:16.527000+00:00"
    assert row["received_at"] == "2025-11-18T07:21:17.000000+00:00"
    assert ISO_UTC.match(str(row["stored_at"]))
    stored_at = datetime.fromisoformat(str(row["stored_at"]))
    # SQLite's clock has millisecond precision.
    assert before - timedelta(milliseconds=1) <= stored_at <= datetime.now(UTC)


def test_creates_missing_directories(tmp_path, event_factory):
    path = tmp_path / "a" / "b" / "events.db"
    sink = SqliteSink(path)
    try:
        assert sink.write_batch([event_factory()]).new == 1
    finally:
        sink.close()
    assert path.is_file()


def test_wal_and_full_sync(sink):
    assert sink._conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert sink._conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


def test_reopening_keeps_rows(db_path, event_factory):
    event = event_factory()
    first = SqliteSink(db_path)
    first.write_batch([event])
    first.close()
    second = SqliteSink(db_path)
    try:
        assert second.write_batch([event]) == WriteResult(new=0, duplicate=1)
    finally:
        second.close()


def test_locked_database_is_unavailable_then_recovers(db_path, event_factory):
    sink = SqliteSink(db_path, busy_timeout_ms=50)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(SinkUnavailableError, match="locked"):
            sink.write_batch([event_factory()])
        other.execute("ROLLBACK")
        # Nothing of the failed batch was kept, and the sink works again.
        event = event_factory()
        assert sink.write_batch([event, event]) == WriteResult(new=1, duplicate=1)
        assert len(rows(db_path)) == 1
    finally:
        other.close()
        sink.close()


def test_unopenable_path_is_unavailable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SinkUnavailableError, match="cannot open"):
        SqliteSink(blocker / "events.db")


@pytest.mark.parametrize(
    ("url", "relative"),
    [("sqlite:///{abs}", False), ("SQLITE:///{abs}", False), ("sqlite:///{rel}", True)],
)
def test_open_sink_sqlite_urls(url, relative, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sink = open_sink(url.format(abs=tmp_path / "dir" / "abs.db", rel="rel/relative.db"))
    try:
        assert isinstance(sink, SqliteSink)
        expected = "rel/relative.db" if relative else str(tmp_path / "dir" / "abs.db")
        assert str(sink.path) == expected
    finally:
        sink.close()
    assert (tmp_path / expected).is_file()


def test_open_sink_default_settings_url(tmp_path):
    """`Settings.sink_url` (sqlite:/// + an absolute path) opens that file."""
    settings = load_settings({"EVENTGATE_DATA_DIR": str(tmp_path)})
    sink = open_sink(settings.sink_url)
    try:
        assert isinstance(sink, SqliteSink)
        assert sink.path == tmp_path.resolve() / "events.db"
    finally:
        sink.close()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "events.db",
        "/var/lib/events.db",
        "sqlite://",
        "sqlite:///",
        "sqlite://host/events.db",
        "sqlite:events.db",
        "mysql://user@host/db",
        "postgresql:/no-slashes",
        "ftp://collector.example.com",
        "jsonl:///",
        "jsonl://relative.jsonl",
    ],
)
def test_open_sink_rejects_other_urls(url):
    with pytest.raises(ConfigError, match="EVENTGATE_SINK") as caught:
        open_sink(url)
    assert "sqlite:///" in str(caught.value)
    assert "postgresql://" in str(caught.value)


def test_open_sink_error_does_not_echo_a_password():
    with pytest.raises(ConfigError) as caught:
        open_sink("postgressql://user:s3cret@db/events")
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_open_sink_postgres_schemes(scheme, monkeypatch):
    opened = []
    monkeypatch.setattr(PostgresSink, "__init__", lambda _self, dsn, **_: opened.append(dsn))
    sink = open_sink(f"{scheme}://user@db.internal:5432/events")
    assert isinstance(sink, PostgresSink)
    assert opened == [f"{scheme}://user@db.internal:5432/events"]
