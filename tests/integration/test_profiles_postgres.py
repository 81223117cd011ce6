"""The PostgreSQL sink's `profiles` table against a real server, in a schema of its own."""

from __future__ import annotations

import os
import secrets
import threading
from datetime import timedelta

import fakeredis
import psycopg
import pytest
from psycopg import sql

from shared.persons import Profile
from tests.conftest import BASE_TIME
from tests.support import profile_rows
from workers.profiles import ProfileRecorder
from workers.sinks import PostgresSink, SqliteSink

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
    name = f"test_profiles_{secrets.token_hex(6)}"
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
        query = sql.SQL("SELECT * FROM {} ORDER BY account, identifier_type, identifier")
        return cursor.execute(query.format(sql.Identifier(schema, "profiles"))).fetchall()


def profile(identifier: str = "p-1", **fields: object) -> Profile:
    base: dict[str, object] = {
        "account": "acme",
        "identifier_type": "ID",
        "identifier": identifier,
        "person_id": identifier,
        "attributes": {},
        "first_seen": BASE_TIME,
        "last_seen": BASE_TIME,
    }
    return Profile(**{**base, **fields})


@pytest.mark.usefixtures("sink")
def test_table_shape(admin, schema):
    columns = admin.execute(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = 'profiles' ORDER BY ordinal_position",
        [schema],
    ).fetchall()
    assert columns == [
        ("account", "text", "NO"),
        ("identifier_type", "text", "NO"),
        ("identifier", "text", "NO"),
        ("person_id", "text", "NO"),
        ("attributes", "jsonb", "NO"),
        ("first_seen", "timestamp with time zone", "NO"),
        ("last_seen", "timestamp with time zone", "NO"),
    ]
    indexes = admin.execute(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = 'profiles'"
        " ORDER BY indexname",
        [schema],
    ).fetchall()
    assert [row[0].split(" USING ")[1] for row in indexes] == [
        "btree (account, person_id)",
        "btree (account, identifier_type, identifier)",
    ]


# Each step is one upsert call; both sinks must end with the same rows.
STEPS = [
    [profile(attributes={"a": 1, "loc": {"city": "Seoul", "zip": "1"}, "gone": "x"})],
    [
        profile(
            attributes={"loc": {"city": "Busan"}, "b": [1, {"c": True}]},
            last_seen=BASE_TIME + timedelta(days=1),
        )
    ],
    [profile(attributes={"a": None}, first_seen=BASE_TIME - timedelta(days=1), person_id="other")],
    [profile(attributes={}), profile("p-2", attributes={"new": "yes", "unset": None})],
    [
        profile(attributes={"gone": None, "b": "text"}),
        profile(attributes={"b": 2}),
    ],  # one key twice
]


def test_upserts_match_the_sqlite_sinks(sink, admin, schema, tmp_path):
    """Attributes merge at the top level, nulls unset, seen times widen, person ids stay:
    the same calls leave the same rows in PostgreSQL as in SQLite."""
    lite = SqliteSink(tmp_path / "events.db")
    try:
        for step in STEPS:
            assert sink.upsert_profiles(step) == lite.upsert_profiles(step)
    finally:
        lite.close()
    stored = rows(admin, schema)
    expected = profile_rows(tmp_path / "events.db")
    assert len(stored) == len(expected) == 2
    for pg_row, lite_row in zip(stored, expected, strict=True):
        assert pg_row["person_id"] == lite_row["person_id"]
        assert pg_row["attributes"] == lite_row["attributes"]
        assert pg_row["first_seen"].isoformat(timespec="microseconds") == lite_row["first_seen"]
        assert pg_row["last_seen"].isoformat(timespec="microseconds") == lite_row["last_seen"]
    first = stored[0]
    assert first["person_id"] == "p-1"
    assert first["attributes"] == {"loc": {"city": "Busan"}, "b": 2}
    assert first["first_seen"] == BASE_TIME - timedelta(days=1)
    assert first["last_seen"] == BASE_TIME + timedelta(days=1)


def test_a_thousand_profiles_in_one_call(sink, admin, schema):
    batch = [profile(f"p-{i}", attributes={"n": i}) for i in range(1000)]
    assert sink.upsert_profiles([*batch, *batch[:10]]) == 1000
    assert sink.upsert_profiles(batch[::2]) == 500
    assert len(rows(admin, schema)) == 1000


def test_concurrent_upserts_of_overlapping_rows(schema, admin):
    """Workers upserting the same persons at once neither deadlock nor lose an update."""
    count = 4
    start = threading.Barrier(count)
    failures: list[BaseException] = []

    def upsert(worker: int) -> None:
        sink = PostgresSink(DSN, schema=schema)
        try:
            start.wait()
            for round_ in range(20):
                keys = range(50) if (worker + round_) % 2 else reversed(range(50))
                sink.upsert_profiles(
                    [profile(f"p-{k}", attributes={f"w{worker}": round_}) for k in keys]
                )
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
        finally:
            sink.close()

    threads = [threading.Thread(target=upsert, args=(w,)) for w in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    stored = rows(admin, schema)
    assert len(stored) == 50
    assert all(row["attributes"] == {f"w{w}": 19 for w in range(count)} for row in stored)


def test_a_batchs_sightings_reach_postgres(sink, admin, schema, event_factory):
    """The worker's profile step over a real PostgreSQL sink: one person per identity."""
    recorder = ProfileRecorder(sink, fakeredis.FakeRedis())
    events = [
        event_factory(identity={"email": "Ann@x.y", "customer_code": "C-1"}),
        event_factory(identity={"email": "ann@x.y"}, occurred_at=BASE_TIME + timedelta(hours=1)),
        event_factory(identity={}),
    ]
    assert recorder.record({"acme": events}, []) == 3
    stored = {(r["identifier_type"], r["identifier"]): r for r in rows(admin, schema)}
    person = stored["CUSTOMER_CODE", "C-1"]["person_id"]
    assert sorted(stored) == [("CUSTOMER_CODE", "C-1"), ("EMAIL", "ann@x.y"), ("ID", person)]
    assert {r["person_id"] for r in stored.values()} == {person}
    assert stored["EMAIL", "ann@x.y"]["last_seen"] == BASE_TIME + timedelta(hours=1)
