"""Rows/s of the PostgreSQL sink against a plain COPY of the same rows, in the same run.

    python -m workers.sinks.pg_bench --dsn postgresql://postgres@127.0.0.1:5432/test

Each schema it makes is its own (random name) and dropped at the end. Every figure is the
median of `--repeats` runs, the three ways interleaved, so a noisy neighbour hits them all.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from shared.event import Event, new_event_id
from workers.sinks.base import COLUMNS, event_row
from workers.sinks.postgres import PostgresSink

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from psycopg.rows import TupleRow

    from workers.sinks.base import Row

_BASE = datetime(2025, 11, 18, 7, 21, 16, tzinfo=UTC)


def make_events(count: int, account: str = "bench") -> list[Event]:
    """Events shaped like a shop's: an identity, a few properties, one line item."""
    return [
        Event(
            account=account,
            event_id=new_event_id(),
            name="purchase",
            occurred_at=_BASE + timedelta(milliseconds=n),
            received_at=_BASE + timedelta(milliseconds=n, seconds=1),
            source="native",
            identity={"external_id": f"cust-{n % 977}"},
            properties={"productCode": f"P-{n % 101}", "quantity": n % 5 + 1, "gift": False},
            items=[{"sku": f"S-{n % 31}", "qty": 2, "price": 9.99}],
            value=19.98,
            currency="EUR",
        )
        for n in range(count)
    ]


class Bench:
    """The three ways of writing, each into a schema of its own on one server."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        tag = secrets.token_hex(4)
        self.schemas = {way: f"eg_bench_{way}_{tag}" for way in ("sink", "copy", "unnest")}
        self.admin = psycopg.connect(dsn, autocommit=True)
        for schema in self.schemas.values():
            self.admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        self.sink = PostgresSink(dsn, schema=self.schemas["sink"])
        # The same tables (made by the sink's migration) for the baselines.
        for way in ("copy", "unnest"):
            PostgresSink(dsn, schema=self.schemas[way]).close()
        self.conn: psycopg.Connection[TupleRow] = psycopg.connect(dsn, autocommit=True)

    def close(self) -> None:
        self.sink.close()
        self.conn.close()
        for schema in self.schemas.values():
            self.admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        self.admin.close()

    def sink_write(self, batches: Sequence[Sequence[Event]]) -> float:
        started = time.perf_counter()
        for batch in batches:
            self.sink.write_batch(batch)
        return time.perf_counter() - started

    def plain_copy(self, batches: Sequence[Sequence[Event]]) -> float:
        """COPY straight into `events`, one transaction per batch: no staging, no conflict
        check, nothing returned. Rows are built the sink's way (`event_row`), in the timing."""
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(self.schemas["copy"], "events"),
            sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
        )
        started = time.perf_counter()
        for batch in batches:
            with (
                self.conn.transaction(),
                self.conn.cursor() as cursor,
                cursor.copy(statement) as copy,
            ):
                for event in batch:
                    copy.write_row(event_row(event))
        return time.perf_counter() - started

    def unnest_insert(self, batches: Sequence[Sequence[Event]]) -> float:
        """The sink before COPY: one INSERT ... SELECT * FROM unnest(binary arrays) ON
        CONFLICT DO NOTHING per batch."""
        types = ["text"] * 3 + ["timestamptz"] * 2 + ["text"] + ["jsonb"] * 3 + ["float8", "text"]
        statement = sql.SQL(
            "INSERT INTO {} ({}) SELECT * FROM unnest({}) ON CONFLICT (account, event_id)"
            " DO NOTHING"
        ).format(
            sql.Identifier(self.schemas["unnest"], "events"),
            sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
            sql.SQL(", ").join(sql.SQL("%b::{}[]").format(sql.SQL(t)) for t in types),
        )
        started = time.perf_counter()
        for batch in batches:
            rows: list[Row] = sorted(map(event_row, batch), key=lambda r: (r[0], r[1]))
            params = [list(column) for column in zip(*rows, strict=True)]
            with self.conn.transaction():
                self.conn.execute(statement, params)
        return time.perf_counter() - started


def run(dsn: str, *, events: int, sizes: Sequence[int], repeats: int) -> dict[str, float]:
    """Rows/s per way and batch size, e.g. {"sink/100": ..., "copy/100": ...}."""
    bench = Bench(dsn)
    ways: dict[str, Callable[[Sequence[Sequence[Event]]], float]] = {
        "sink": bench.sink_write,
        "copy": bench.plain_copy,
        "unnest": bench.unnest_insert,
    }
    try:
        bench.sink_write([make_events(100)])  # warm the connection, stage and caches
        bench.plain_copy([make_events(100)])
        bench.unnest_insert([make_events(100)])
        rates: dict[str, list[float]] = {}
        for _ in range(repeats):
            for size in sizes:
                for way, write in ways.items():
                    stream = make_events(events)
                    batches = [stream[i : i + size] for i in range(0, events, size)]
                    rates.setdefault(f"{way}/{size}", []).append(events / write(batches))
        return {name: statistics.median(values) for name, values in rates.items()}
    finally:
        bench.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--events", type=int, default=20_000, help="rows per run and way")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = (100, 1000)
    figures = run(args.dsn, events=args.events, sizes=sizes, repeats=args.repeats)
    print(f"{'batch':>6} {'sink rows/s':>12} {'plain COPY':>12} {'sink/COPY':>10} {'unnest':>10}")  # noqa: T201
    for size in sizes:
        sink, copy, unnest = (figures[f"{way}/{size}"] for way in ("sink", "copy", "unnest"))
        print(f"{size:>6} {sink:>12,.0f} {copy:>12,.0f} {sink / copy:>10.2f} {unnest:>10,.0f}")  # noqa: T201


if __name__ == "__main__":
    main()
