"""The PostgreSQL sink: `events` and `profiles` tables written by one persistent connection
per worker, batches by COPY."""

from __future__ import annotations

from typing import TYPE_CHECKING, LiteralString

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from shared.errors import ConfigError
from shared.persons import merge_profiles
from workers.sinks.base import (
    COLUMNS,
    PROFILE_COLUMNS,
    SinkError,
    SinkRejectedError,
    SinkUnavailableError,
    WriteResult,
    event_row,
    profile_row,
)
from workers.sinks.pg_schema import migrate

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from psycopg.rows import TupleRow

    from shared.event import Event
    from shared.persons import Profile
    from workers.sinks.base import Row

# Applied unless the DSN sets them. Keepalives notice a peer that vanished without a word
# (host down, NAT or firewall dropping the flow) within about a minute, rather than a write
# waiting on a dead socket for the kernel's two hours.
_CONNECT_DEFAULTS = {
    "application_name": "eventgate-worker",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}

# The batch is copied into this session's temporary table, then moved into `events` by one
# statement. Typed like `events`, so COPY already refuses a value the table would (a NUL in
# JSON) and the INSERT only compares keys. ON COMMIT DELETE ROWS: empty for the next batch
# at no cost; temporary tables need no CREATE privilege on any schema.
_STAGE = sql.Identifier("eg_incoming")
_CREATE_STAGE = sql.SQL("""
CREATE TEMPORARY TABLE IF NOT EXISTS {stage} (
    account text, event_id text, name text, occurred_at timestamptz, received_at timestamptz,
    source text, identity jsonb, properties jsonb, items jsonb, value float8, currency text
) ON COMMIT DELETE ROWS""").format(stage=_STAGE)

# The array each `event_row` column travels in; text for timestamps and JSON, which the
# server casts (they arrive as ISO-8601 and JSON text).
_ARRAY_TYPES = {
    "account": "text",
    "event_id": "text",
    "name": "text",
    "occurred_at": "timestamptz",
    "received_at": "timestamptz",
    "source": "text",
    "identity": "jsonb",
    "properties": "jsonb",
    "items": "jsonb",
    "value": "float8",
    "currency": "text",
    "identifier_type": "text",
    "identifier": "text",
    "person_id": "text",
    "attributes": "jsonb",
    "first_seen": "timestamptz",
    "last_seen": "timestamptz",
}

# Attributes merge at the top level: the update's keys replace the stored ones, and a
# null in the update (an unset) removes one, as the SQLite sink's json_patch does.
_UPSERT_PROFILES = """INSERT INTO {table} AS stored ({columns}) SELECT * FROM unnest({arrays})
 ON CONFLICT (account, identifier_type, identifier) DO UPDATE SET
 attributes = (stored.attributes - ARRAY(SELECT jsonb_object_keys(excluded.attributes)))
   || jsonb_strip_nulls(excluded.attributes),
 first_seen = LEAST(stored.first_seen, excluded.first_seen),
 last_seen = GREATEST(stored.last_seen, excluded.last_seen)"""


class _LostBeforeCommitError(SinkUnavailableError):
    """The connection died before COMMIT was sent, so the server rolled the batch back."""


class PostgresSink:
    """Writes each batch with COPY into a temporary table and one INSERT ... SELECT ... ON
    CONFLICT DO NOTHING RETURNING, over one connection kept for the worker's life.

    COPY streams the rows in one go (no parameter arrays to build, no per-row statement);
    RETURNING tells new rows from duplicates in the same round trip. Rows/s against a
    plain COPY of the same rows: `python -m workers.sinks.pg_bench` (README, Sinks).
    """

    keyed = True
    keeps_profiles = True
    max_events: int | None = None

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        connect_timeout_s: int = 10,
        statement_timeout_ms: int = 30_000,
    ) -> None:
        """Connect and migrate `schema` to the latest version (the schema itself must exist).

        Raises:
            ConfigError: `dsn` is not a connection string libpq understands, or the schema
                needs a migration this role may not apply.
            SinkUnavailableError: PostgreSQL cannot be reached.
        """
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"invalid PostgreSQL DSN: {exc}") from exc
        defaults = {**_CONNECT_DEFAULTS, "connect_timeout": str(connect_timeout_s)}
        self._conninfo = make_conninfo("", **{**defaults, **params})
        self.name = _name(params, schema)
        self._statement_timeout_ms = statement_timeout_ms
        self._table = sql.Identifier(schema, "events")
        self._schema = schema
        columns = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        self._copy = sql.SQL("COPY {stage} ({columns}) FROM STDIN").format(
            stage=_STAGE, columns=columns
        )
        self._insert = sql.SQL(
            # In key order, so two workers writing overlapping batches take row locks in
            # one order and wait on each other instead of deadlocking.
            "INSERT INTO {table} ({columns}) SELECT {columns} FROM {stage}"
            " ORDER BY account, event_id"
            " ON CONFLICT (account, event_id) DO NOTHING RETURNING event_id"
        ).format(table=self._table, columns=columns, stage=_STAGE)
        self._upsert_profiles = _unnest_statement(
            _UPSERT_PROFILES, sql.Identifier(schema, "profiles"), PROFILE_COLUMNS
        )
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._closed = False
        self._migrated = False
        self._connection()

    def write_batch(self, events: Sequence[Event]) -> WriteResult:
        """Insert the events in one transaction; existing (account, event_id) are skipped.

        A connection found dead at the start of a batch is replaced and the batch tried
        once more; one lost during COMMIT is not, as the batch may have been stored.

        Raises:
            SinkUnavailableError: PostgreSQL is unreachable, restarting, too slow
                (statement timeout) or a deadlock broke the transaction.
            SinkRejectedError: PostgreSQL refuses a value (e.g. a NUL character).
            SinkError: the sink was closed.
        """
        if not events:
            return WriteResult(new=0, duplicate=0)
        rows = [event_row(e) for e in events]
        new = self._run(lambda conn: self._copy_insert(conn, rows))
        return WriteResult(new=new, duplicate=len(events) - new)

    def upsert_profiles(self, profiles: Sequence[Profile]) -> int:
        """Upsert one row per identifier in one statement (see `Sink.upsert_profiles`);
        rows in key order, so concurrent upserts take their locks in one order.

        Raises:
            SinkUnavailableError: as `write_batch`.
            SinkRejectedError: as `write_batch`.
            SinkError: the sink was closed.
        """
        if not profiles:
            return 0
        rows = [profile_row(p) for p in merge_profiles(profiles)]
        params = [list(column) for column in zip(*rows, strict=True)]
        self._run(lambda conn: conn.execute(self._upsert_profiles, params).rowcount)
        return len(rows)

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _copy_insert(self, conn: psycopg.Connection[TupleRow], rows: list[Row]) -> int:
        """COPY the rows into the stage, move the new ones into `events`; how many were new."""
        with conn.cursor() as cursor:
            with cursor.copy(self._copy) as copy:
                for row in rows:
                    copy.write_row(row)
            return len(cursor.execute(self._insert).fetchall())

    def _run(self, work: Callable[[psycopg.Connection[TupleRow]], int]) -> int:
        """`work` in one transaction, once more on a fresh connection if the connection was
        found dead before anything could be committed (typically the server closed an idle
        connection: restart, idle timeout, failover)."""
        try:
            return self._transaction(work)
        except _LostBeforeCommitError:
            return self._transaction(work)

    def _transaction(self, work: Callable[[psycopg.Connection[TupleRow]], int]) -> int:
        conn = self._connection()
        committing = False
        try:
            with conn.transaction():
                done = work(conn)
                committing = True
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if conn.broken and not committing:
                raise _LostBeforeCommitError(f"PostgreSQL connection lost: {exc}") from exc
            raise SinkUnavailableError(f"PostgreSQL: {exc}") from exc
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            raise SinkRejectedError(f"PostgreSQL refused the batch: {exc}") from exc
        return done

    def _connection(self) -> psycopg.Connection[TupleRow]:
        """The open connection, or a new one (schema migrated, stage made) if it died."""
        if self._closed:
            raise SinkError("the PostgreSQL sink is closed")
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            # autocommit: transactions are the explicit `conn.transaction()` blocks.
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.OperationalError as exc:
            raise SinkUnavailableError(f"PostgreSQL unreachable: {exc}") from exc
        try:
            # Set here rather than in the DSN's `options`, which the user may have set.
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false)",
                [f"{self._statement_timeout_ms}ms"],
            )
            if not self._migrated:
                migrate(conn, self._schema)
                self._migrated = True
            conn.execute(_CREATE_STAGE)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, psycopg.OperationalError):
                raise SinkUnavailableError(f"PostgreSQL: {exc}") from exc
            raise
        self._conn = conn
        return conn


def _name(params: Mapping[str, object], schema: str) -> str:
    """The sink's name: where it writes, without user or password."""
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    name = f"postgresql://{host}{port}/{params.get('dbname') or ''}"
    return name if schema == "public" else f"{name}#schema={schema}"


def _unnest_statement(
    template: LiteralString, table: sql.Identifier, columns: Sequence[str]
) -> sql.Composed:
    """`template` with {table}, {columns} and {arrays}: one binary array parameter per column
    (%b: no quoting or escaping of every element), cast to the column's type."""
    return sql.SQL(template).format(
        table=table,
        columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
        arrays=sql.SQL(", ").join(
            sql.SQL("%b::{}[]").format(sql.SQL(_ARRAY_TYPES[c])) for c in columns
        ),
    )
