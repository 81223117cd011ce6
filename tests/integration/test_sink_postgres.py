"""The PostgreSQL sink against a real server, each test in a schema of its own."""

from __future__ import annotations

import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import psycopg
import pytest
from psycopg import sql

from shared.errors import ConfigError
from workers.sinks import (
    PostgresSink,
    SinkError,
    SinkRejectedError,
    SinkUnavailableError,
    WriteResult,
    pg_bench,
)
from workers.sinks.pg_schema import LATEST, MIGRATIONS

pytestmark = pytest.mark.integration

DSN = os.environ.get("EVENTGATE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def admin():
    """A connection of the test's own, beside the sink's."""
    try:
        conn = psycopg.connect(DSN, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL not reachable at {DSN}: {exc}")
    with conn:
        yield conn


@pytest.fixture
def schema(admin):
    name = f"test_sink_{secrets.token_hex(6)}"
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def sink(schema):
    sink = PostgresSink(DSN, schema=schema)
    yield sink
    sink.close()


def rows(admin, schema) -> list[dict[str, object]]:
    with admin.cursor(row_factory=psycopg.rows.dict_row) as cursor:
        query = sql.SQL("SELECT * FROM {} ORDER BY stored_at, event_id")
        return cursor.execute(query.format(sql.Identifier(schema, "events"))).fetchall()


def test_new_then_duplicate_across_batches(sink, event_factory, admin, schema):
    first = [event_factory() for _ in range(3)]
    assert sink.write_batch(first) == WriteResult(new=3, duplicate=0)
    assert sink.write_batch([*first, event_factory()]) == WriteResult(new=1, duplicate=3)
    assert len(rows(admin, schema)) == 4


def test_duplicates_inside_one_batch_count_as_duplicates(sink, event_factory, admin, schema):
    event = event_factory()
    result = sink.write_batch([event, event, event_factory(), event])
    assert result == WriteResult(new=2, duplicate=2)
    assert len(rows(admin, schema)) == 2


def test_same_event_id_in_another_account_is_new(sink, event_factory):
    event = event_factory()
    other = msgspec.structs.replace(event, account="globex")
    assert sink.write_batch([event, other]) == WriteResult(new=2, duplicate=0)


def test_thousand_row_batch(sink, event_factory, admin, schema):
    events = [event_factory(value=float(i) if i % 2 else None) for i in range(1000)]
    assert sink.write_batch(events) == WriteResult(new=1000, duplicate=0)
    assert sink.write_batch(events[::2]) == WriteResult(new=0, duplicate=500)
    assert len(rows(admin, schema)) == 1000


def test_row_round_trips(sink, event_factory, admin, schema):
    seoul = timezone(timedelta(hours=9))
    event = event_factory(
        occurred_at=datetime(2025, 11, 18, 16, 21, 16, 527000, tzinfo=seoul),
        identity={"email": "ä@example.com", "kakao_id": "k-9"},
        properties={"nested": {"list": [1, 2.5, None, True]}, "text": '日本語 "quoted"'},
        items=[{"sku": "A"}, {"sku": "B", "qty": 3}],
        value=7,  # an int where a float belongs: stored as a float
        currency="KRW",
    )
    other_event = event_factory(value=None, currency=None, items=[])
    before = datetime.now(UTC)
    sink.write_batch([event, other_event])
    by_id = {row["event_id"]: row for row in rows(admin, schema)}
    stored, other = by_id[event.event_id], by_id[other_event.event_id]
    assert stored["occurred_at"] == datetime(2025, 11, 18, 7, 21, 16, 527000, tzinfo=UTC)
    assert stored["received_at"] == event.received_at
    assert before - timedelta(seconds=1) <= stored["stored_at"] <= datetime.now(UTC)
    for field in ("account", "event_id", "name", "source", "identity", "properties", "items"):
        assert stored[field] == getattr(event, field), field
    assert stored["value"] == 7.0
    assert stored["currency"] == "KRW"
    assert (other["value"], other["currency"], other["items"]) == (None, None, [])


@pytest.mark.usefixtures("sink")
def test_table_shape(admin, schema):
    columns = admin.execute(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = 'events' ORDER BY ordinal_position",
        [schema],
    ).fetchall()
    assert columns == [
        ("account", "text", "NO"),
        ("event_id", "text", "NO"),
        ("name", "text", "NO"),
        ("occurred_at", "timestamp with time zone", "NO"),
        ("received_at", "timestamp with time zone", "NO"),
        ("stored_at", "timestamp with time zone", "NO"),
        ("source", "text", "NO"),
        ("identity", "jsonb", "NO"),
        ("properties", "jsonb", "NO"),
        ("items", "jsonb", "NO"),
        ("value", "double precision", "YES"),
        ("currency", "text", "YES"),
    ]
    indexes = admin.execute(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = 'events'"
        " ORDER BY indexname",
        [schema],
    ).fetchall()
    assert [row[0].split(" USING ")[1] for row in indexes] == [
        "btree (account, occurred_at)",
        "btree (account, event_id)",
    ]


def test_sinks_creating_the_table_at_once(schema, event_factory, admin):
    """Workers starting together all succeed, and the table is made once."""
    count = 8
    start = threading.Barrier(count)

    def open_one() -> PostgresSink:
        start.wait()
        return PostgresSink(DSN, schema=schema)

    with ThreadPoolExecutor(count) as pool:
        sinks = list(pool.map(lambda _: open_one(), range(count)))
    try:
        event = event_factory()
        results = [sink.write_batch([event]) for sink in sinks]
        assert results == [WriteResult(1, 0)] + [WriteResult(0, 1)] * (count - 1)
    finally:
        for sink in sinks:
            sink.close()
    assert len(rows(admin, schema)) == 1


@pytest.mark.usefixtures("sink")
def test_existing_table_needs_no_create_privilege(schema, admin, event_factory):
    """A worker role with only INSERT/SELECT on an existing, migrated table (and SELECT on
    schema_migrations) can open the sink."""
    role = f"writer_{secrets.token_hex(4)}"
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        admin.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(schema), sql.Identifier(role)
            )
        )
        admin.execute(
            sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(
                sql.Identifier(schema, "events"), sql.Identifier(role)
            )
        )
        admin.execute(
            sql.SQL("GRANT SELECT ON {} TO {}").format(
                sql.Identifier(schema, "schema_migrations"), sql.Identifier(role)
            )
        )
        dsn = psycopg.conninfo.make_conninfo(DSN, user=role)
        limited = PostgresSink(dsn, schema=schema)
        try:
            assert limited.write_batch([event_factory()]) == WriteResult(1, 0)
        finally:
            limited.close()
    finally:
        admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_killed_connection_reconnects(sink, event_factory, admin, schema):
    """A connection the server ended while idle is replaced; the batch is not lost."""
    sink.write_batch([event_factory()])
    old_pid = sink._conn.info.backend_pid
    admin.execute("SELECT pg_terminate_backend(%s, 5000)", [old_pid])
    assert sink.write_batch([event_factory()]) == WriteResult(1, 0)
    assert sink._conn.info.backend_pid != old_pid
    assert sink.write_batch([event_factory()]) == WriteResult(1, 0)
    assert len(rows(admin, schema)) == 3


def test_server_gone_is_unavailable_until_it_returns(sink, event_factory, admin, schema):
    """Killed and not reachable again at once: the write fails as transient, then heals."""
    sink.write_batch([event_factory()])
    conninfo = sink._conninfo
    sink._conninfo = psycopg.conninfo.make_conninfo(conninfo, port=1)  # nothing listens
    admin.execute("SELECT pg_terminate_backend(%s, 5000)", [sink._conn.info.backend_pid])
    with pytest.raises(SinkUnavailableError, match="unreachable"):
        sink.write_batch([event_factory()])
    sink._conninfo = conninfo
    event = event_factory()
    assert sink.write_batch([event]) == WriteResult(1, 0)
    assert len(rows(admin, schema)) == 2


def test_statement_timeout_is_unavailable(schema, event_factory, admin):
    sink = PostgresSink(DSN, schema=schema, statement_timeout_ms=200)
    try:
        with admin.transaction():
            admin.execute(
                sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                    sql.Identifier(schema, "events")
                )
            )
            with pytest.raises(SinkUnavailableError, match="statement timeout"):
                sink.write_batch([event_factory()])
        assert sink.write_batch([event_factory()]) == WriteResult(1, 0)
    finally:
        sink.close()


@pytest.mark.parametrize(
    "bad",
    [{"name": "nul\x00name"}, {"properties": {"text": "nul\x00"}}],
    ids=["nul-in-text", "nul-in-json"],
)
def test_refused_data_is_rejected_and_nothing_is_stored(bad, sink, event_factory, admin, schema):
    with pytest.raises(SinkRejectedError):
        sink.write_batch([event_factory(), event_factory(**bad)])
    assert rows(admin, schema) == []
    assert sink.write_batch([event_factory()]) == WriteResult(1, 0)


def test_unreachable_server_at_start():
    with pytest.raises(SinkUnavailableError, match="unreachable"):
        PostgresSink("postgresql://postgres@127.0.0.1:1/test")


def test_invalid_dsn_is_a_config_error():
    with pytest.raises(ConfigError, match="DSN"):
        PostgresSink("host=localhost nonsense")


def test_closed_sink_refuses_writes(sink, event_factory):
    sink.close()
    sink.close()
    with pytest.raises(SinkError, match="closed"):
        sink.write_batch([event_factory()])


@pytest.mark.usefixtures("sink")
def test_the_schema_version_is_recorded_once(schema, admin):
    """Migrations run once: opening the sink again changes nothing."""
    PostgresSink(DSN, schema=schema).close()
    versions = admin.execute(
        sql.SQL("SELECT version, name FROM {}").format(sql.Identifier(schema, "schema_migrations"))
    ).fetchall()
    assert versions == [(LATEST, MIGRATIONS[-1].name)]


def test_tables_made_before_migrations_are_adopted(schema, admin, event_factory):
    """A database written by a version without schema_migrations keeps its rows and is
    recorded at version 1 (its tables are version 1's)."""
    events = sql.Identifier(schema, "events")
    admin.execute(MIGRATIONS[0].statements[0].format(events=events))
    admin.execute(
        sql.SQL(
            "INSERT INTO {} (account, event_id, name, occurred_at, received_at, source,"
            " identity, properties, items) VALUES ('acme', 'old', 'n', now(), now(), 'native',"
            " '{{}}', '{{}}', '[]')"
        ).format(events)
    )
    sink = PostgresSink(DSN, schema=schema)
    try:
        old = msgspec.structs.replace(event_factory(), event_id="old")
        assert sink.write_batch([old, event_factory()]) == WriteResult(new=1, duplicate=1)
    finally:
        sink.close()
    version = admin.execute(
        sql.SQL("SELECT max(version) FROM {}").format(sql.Identifier(schema, "schema_migrations"))
    ).fetchone()
    assert version == (LATEST,)


def test_a_role_that_may_not_migrate_is_told_so(schema, admin):
    """A fresh schema and a worker role without CREATE: a ConfigError naming the fix, not a
    crash loop of permission errors."""
    role = f"reader_{secrets.token_hex(4)}"
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        admin.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(schema), sql.Identifier(role)
            )
        )
        with pytest.raises(ConfigError, match="owner"):
            PostgresSink(psycopg.conninfo.make_conninfo(DSN, user=role), schema=schema)
    finally:
        admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_new_and_duplicate_in_one_round_trip_across_accounts(sink, event_factory):
    """COPY + INSERT ... ON CONFLICT ... RETURNING: a batch mixing accounts, repeats and
    rows already stored counts each right."""
    stored = event_factory()
    sink.write_batch([stored])
    other = msgspec.structs.replace(stored, account="globex")
    fresh = event_factory()
    result = sink.write_batch([stored, other, fresh, fresh, other])
    assert result == WriteResult(new=2, duplicate=3)


@pytest.mark.usefixtures("admin")
def test_the_rows_per_second_bench_runs():
    """`python -m workers.sinks.pg_bench`: the three ways, each batch size, schemas dropped."""
    figures = pg_bench.run(DSN, events=200, sizes=(100,), repeats=1)
    assert set(figures) == {"sink/100", "copy/100", "unnest/100"}
    assert all(rate > 0 for rate in figures.values())
