"""The embedded default sink: `events` and `profiles` tables in a local SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from shared.persons import merge_profiles
from workers.sinks.base import (
    COLUMNS,
    PROFILE_COLUMNS,
    SinkRejectedError,
    SinkUnavailableError,
    WriteResult,
    event_row,
    profile_row,
)

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable, Sequence

    from shared.event import Event
    from shared.persons import Profile

# stored_at has the same fixed-width shape as the other timestamps; SQLite's clock has
# millisecond precision, so the last three digits are zeros.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    account TEXT NOT NULL,
    event_id TEXT NOT NULL,
    name TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    stored_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f000+00:00', 'now')),
    source TEXT NOT NULL,
    identity TEXT NOT NULL,
    properties TEXT NOT NULL,
    items TEXT NOT NULL,
    value REAL,
    currency TEXT,
    PRIMARY KEY (account, event_id)
);
CREATE INDEX IF NOT EXISTS events_account_occurred_at_idx ON events (account, occurred_at);
CREATE TABLE IF NOT EXISTS profiles (
    account TEXT NOT NULL,
    identifier_type TEXT NOT NULL,
    identifier TEXT NOT NULL,
    person_id TEXT NOT NULL,
    attributes TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    PRIMARY KEY (account, identifier_type, identifier)
);
CREATE INDEX IF NOT EXISTS profiles_account_person_id_idx ON profiles (account, person_id);
"""

# Only the constant COLUMNS are formatted in; the values travel as parameters.
_INSERT = (
    f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"  # noqa: S608
    " ON CONFLICT (account, event_id) DO NOTHING"
)

# Attributes merge at the top level: the update's keys are first removed (json_patch with
# nulls), then set; a null in the update (an unset) stays removed. Timestamps are
# fixed-width text, so min/max compare them in time order.
_UPSERT_PROFILES = (
    f"INSERT INTO profiles ({', '.join(PROFILE_COLUMNS)})"  # noqa: S608 - constant columns
    f" VALUES ({', '.join('?' * len(PROFILE_COLUMNS))})"
    " ON CONFLICT (account, identifier_type, identifier) DO UPDATE SET"
    " attributes = CASE WHEN excluded.attributes = '{}' THEN profiles.attributes"
    " ELSE json_patch(json_patch(profiles.attributes,"
    " (SELECT json_group_object(key, NULL) FROM json_each(excluded.attributes))),"
    " excluded.attributes) END,"
    " first_seen = min(profiles.first_seen, excluded.first_seen),"
    " last_seen = max(profiles.last_seen, excluded.last_seen)"
)


class SqliteSink:
    """One connection in WAL mode; every batch is one fsynced transaction."""

    keyed = True
    keeps_profiles = True
    max_events: int | None = None

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000) -> None:
        """Open (creating the file, its directories and the table) the database at `path`.

        `busy_timeout_ms` is how long a write waits for another writer's lock.

        Raises:
            SinkUnavailableError: the directory or file cannot be created or opened.
        """
        self.path = Path(path)
        self.name = f"sqlite:///{self.path}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are begun explicitly, as BEGIN IMMEDIATE.
            self._conn = sqlite3.connect(
                self.path, timeout=busy_timeout_ms / 1000, isolation_level=None
            )
        except (OSError, sqlite3.Error) as exc:
            raise SinkUnavailableError(f"cannot open SQLite database {self.path}: {exc}") from exc
        try:
            # WAL: readers (users' queries) never block the writer, nor it them.
            self._conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed batch survives a power cut; NORMAL in WAL mode may lose the
            # last ones, and the worker acknowledges a batch once write_batch returns.
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._conn.close()
            raise SinkUnavailableError(f"cannot set up SQLite database {self.path}: {exc}") from exc

    def write_batch(self, events: Sequence[Event]) -> WriteResult:
        """Insert the events in one transaction; existing (account, event_id) are skipped.

        Raises:
            SinkUnavailableError: the database is locked past the busy timeout, or a disk
                error (full, I/O, read-only).
            SinkRejectedError: SQLite refuses a value.
        """
        if not events:
            return WriteResult(new=0, duplicate=0)
        new = self._execute_many(_INSERT, map(event_row, events))
        return WriteResult(new=new, duplicate=len(events) - new)

    def upsert_profiles(self, profiles: Sequence[Profile]) -> int:
        """Upsert one row per identifier in one transaction (see `Sink.upsert_profiles`).

        Raises:
            SinkUnavailableError: as `write_batch`.
            SinkRejectedError: as `write_batch`.
        """
        if not profiles:
            return 0
        rows = [profile_row(p) for p in merge_profiles(profiles)]
        self._execute_many(_UPSERT_PROFILES, rows)
        return len(rows)

    def _execute_many(self, statement: str, rows: Iterable[tuple[object, ...]]) -> int:
        """Run `statement` for every row in one transaction; the rows it changed."""
        try:
            # The context manager commits, or rolls back on any error.
            with self._conn:
                # IMMEDIATE takes the write lock up front, so waiting for it honours the
                # busy timeout instead of failing at once on a read-to-write upgrade.
                self._conn.execute("BEGIN IMMEDIATE")
                return self._conn.executemany(statement, rows).rowcount
        except sqlite3.OperationalError as exc:
            raise SinkUnavailableError(f"SQLite {self.path}: {exc}") from exc
        except (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError) as exc:
            raise SinkRejectedError(f"SQLite {self.path} refused the batch: {exc}") from exc

    def close(self) -> None:
        self._conn.close()
