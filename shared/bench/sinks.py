"""The benchmark's side door into the sinks: emptying them, the plain bulk insert the worker
is measured against, and reading back when rows were stored."""

from __future__ import annotations

import secrets
import sqlite3
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, Self
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

if TYPE_CHECKING:
    from pathlib import Path

    from psycopg.rows import TupleRow


class BenchSink(Protocol):
    name: str
    url: str  # what EVENTGATE_SINK says to a worker

    def ready(self) -> bool:
        """Whether the worker has created the events table yet."""

    def clear(self) -> None: ...

    def insert(self, rows: list[dict[str, Any]], chunk: int) -> float:
        """Plain bulk insert of prebuilt rows, `chunk` per transaction; seconds taken."""

    def latencies_ms(self, account: str) -> list[float]:
        """stored_at - received_at of the account's rows."""

    def close(self) -> None: ...


def _ms(stored: object, received: object) -> float:
    def when(value: object) -> datetime:
        return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))

    return (when(stored) - when(received)).total_seconds() * 1000


class SqliteBench:
    """The worker's SQLite file, opened a second time (WAL: both may use it)."""

    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            # As the sink writes: every batch one fsynced transaction.
            self._conn.execute("PRAGMA synchronous = FULL")
        return self._conn

    def ready(self) -> bool:
        if not self.path.exists():
            return False
        found = self._connection().execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
        )
        return found.fetchone() is not None

    def clear(self) -> None:
        conn = self._connection()
        conn.execute("DELETE FROM events")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def insert(self, rows: list[dict[str, Any]], chunk: int) -> float:
        conn = self._connection()
        columns = [
            c[1] for c in conn.execute("PRAGMA table_info(events)") if rows and c[1] in rows[0]
        ]
        statement = (
            f"INSERT INTO events ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"  # noqa: S608 - column names from the table
            " ON CONFLICT (account, event_id) DO NOTHING"
        )
        tuples = [tuple(row[c] for c in columns) for row in rows]
        started = time.perf_counter()
        for i in range(0, len(tuples), chunk):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(statement, tuples[i : i + chunk])
            conn.execute("COMMIT")
        return time.perf_counter() - started

    def latencies_ms(self, account: str) -> list[float]:
        found = self._connection().execute(
            "SELECT stored_at, received_at FROM events WHERE account = ?", (account,)
        )
        return [_ms(stored, received) for stored, received in found]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PostgresBench:
    """A database of the benchmark's own on the server `dsn` names, dropped at close: the
    worker's sink writes `public.events`, which must not be anybody else's table."""

    name = "postgresql"

    def __init__(self, dsn: str) -> None:
        self._admin_dsn = dsn
        self.database = f"eventgate_bench_{secrets.token_hex(4)}"
        self.url = _with_database(dsn, self.database)
        self._conn: psycopg.Connection[TupleRow] | None = None

    def __enter__(self) -> Self:
        """Raises:
        psycopg.Error: the server is unreachable or refuses CREATE DATABASE.
        """
        with psycopg.connect(self._admin_dsn, autocommit=True, connect_timeout=3) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
        self._conn = psycopg.connect(self.url, autocommit=True)
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
        with psycopg.connect(self._admin_dsn, autocommit=True, connect_timeout=3) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.database)
                )
            )

    @property
    def conn(self) -> psycopg.Connection[TupleRow]:
        if self._conn is None:
            raise RuntimeError("use PostgresBench as a context manager")
        return self._conn

    def ready(self) -> bool:
        found = self.conn.execute(
            "SELECT 1 FROM pg_catalog.pg_tables"
            " WHERE schemaname = 'public' AND tablename = 'events'"
        )
        return found.fetchone() is not None

    def clear(self) -> None:
        self.conn.execute("TRUNCATE events")

    def insert(self, rows: list[dict[str, Any]], chunk: int) -> float:
        """The sink's own way (one INSERT of unnested binary arrays per chunk), minus the queue."""
        types: dict[str, str] = dict(
            self.conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = 'public.events'::regclass AND attnum > 0 AND NOT attisdropped"
            ).fetchall()
        )
        columns = [c for c in types if rows and c in rows[0]]
        statement = sql.SQL(
            "INSERT INTO events ({}) SELECT * FROM unnest({}) ON CONFLICT (account, event_id)"
            " DO NOTHING"
        ).format(
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join([sql.SQL("%b::{}[]").format(sql.SQL(types[c])) for c in columns]),
        )
        chunks = [
            [[row[c] for row in rows[i : i + chunk]] for c in columns]
            for i in range(0, len(rows), chunk)
        ]
        started = time.perf_counter()
        for params in chunks:
            with self.conn.transaction():
                self.conn.execute(statement, params)
        return time.perf_counter() - started

    def latencies_ms(self, account: str) -> list[float]:
        found = self.conn.execute(
            "SELECT stored_at, received_at FROM events WHERE account = %s", [account]
        )
        return [_ms(stored, received) for stored, received in found]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def pg_reachable(dsn: str) -> str | None:
    """None if PostgreSQL at `dsn` answers, else why not."""
    try:
        _with_database(dsn, "x")
        conninfo_to_dict(dsn)
        with psycopg.connect(dsn, connect_timeout=3):
            return None
    except ValueError as exc:
        return str(exc)
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _with_database(dsn: str, database: str) -> str:
    """The URL `dsn` with another database (the worker's EVENTGATE_SINK must be a URL).

    Raises:
        ValueError: `dsn` is not a postgresql:// URL.
    """
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("the PostgreSQL DSN must be a postgresql:// URL")
    return urlunsplit(parts._replace(path=f"/{database}"))
