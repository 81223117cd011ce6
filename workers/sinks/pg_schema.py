"""The PostgreSQL sink's schema: versioned migrations, each applied once and recorded in
`schema_migrations`, so every worker finds the same tables whatever version made them."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import psycopg
import structlog
from psycopg import sql

from shared.errors import ConfigError

if TYPE_CHECKING:
    from psycopg.rows import TupleRow

log = structlog.get_logger("workers.sinks.postgres")


class Migration(NamedTuple):
    version: int
    name: str
    # Formatted with {events}, {profiles}: the tables, qualified with the sink's schema.
    statements: tuple[sql.SQL, ...]


# Append only: a released migration is never edited, a change is a new version. Version 1
# uses IF NOT EXISTS so that a database made before migrations existed (the same tables,
# no schema_migrations) is adopted as it is.
MIGRATIONS = (
    Migration(
        1,
        "events and profiles tables",
        (
            sql.SQL("""
CREATE TABLE IF NOT EXISTS {events} (
    account text NOT NULL,
    event_id text NOT NULL,
    name text NOT NULL,
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now(),
    source text NOT NULL,
    identity jsonb NOT NULL,
    properties jsonb NOT NULL,
    items jsonb NOT NULL,
    value double precision,
    currency text,
    PRIMARY KEY (account, event_id)
)"""),
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS events_account_occurred_at_idx"
                " ON {events} (account, occurred_at)"
            ),
            sql.SQL("""
CREATE TABLE IF NOT EXISTS {profiles} (
    account text NOT NULL,
    identifier_type text NOT NULL,
    identifier text NOT NULL,
    person_id text NOT NULL,
    attributes jsonb NOT NULL,
    first_seen timestamptz NOT NULL,
    last_seen timestamptz NOT NULL,
    PRIMARY KEY (account, identifier_type, identifier)
)"""),
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS profiles_account_person_id_idx"
                " ON {profiles} (account, person_id)"
            ),
        ),
    ),
)

LATEST = MIGRATIONS[-1].version

_CREATE_MIGRATIONS = sql.SQL("""
CREATE TABLE IF NOT EXISTS {table} (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)""")


def migrate(conn: psycopg.Connection[TupleRow], schema: str) -> int:
    """Apply the migrations `schema` lacks; returns its version afterwards.

    An up-to-date schema is only read (no lock, no DDL), so a worker role with just
    SELECT on `schema_migrations` and INSERT, SELECT on the tables can start.

    Raises:
        ConfigError: the schema needs a migration this role may not apply.
        psycopg.OperationalError: the connection failed.
    """
    table = sql.Identifier(schema, "schema_migrations")
    try:
        current = _version(conn, schema, table)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"this PostgreSQL role may not read {schema}.schema_migrations ({exc});"
            " grant it SELECT there"
        ) from exc
    if current is not None and current >= LATEST:
        if current > LATEST:
            log.warning("sink.schema_newer", version=current, known=LATEST)
        return current
    try:
        with conn.transaction():
            # Serialises workers starting together: concurrent CREATE ... IF NOT EXISTS can
            # still fail on the catalog's unique index.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"eventgate:{schema}"])
            conn.execute(_CREATE_MIGRATIONS.format(table=table))
            found = conn.execute(sql.SQL("SELECT version FROM {}").format(table))
            applied = {row[0] for row in found}
            names = {t: sql.Identifier(schema, t) for t in ("events", "profiles")}
            for migration in MIGRATIONS:
                if migration.version in applied:
                    continue
                for statement in migration.statements:
                    conn.execute(statement.format(**names))
                conn.execute(
                    sql.SQL("INSERT INTO {} (version, name) VALUES (%s, %s)").format(table),
                    [migration.version, migration.name],
                )
                log.info("sink.migrated", schema=schema, version=migration.version)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"PostgreSQL schema {schema!r} needs migration to version {LATEST} and this role"
            f" may not apply it ({exc}); start one worker as the tables' owner first"
        ) from exc
    return LATEST


def _version(conn: psycopg.Connection[TupleRow], schema: str, table: sql.Identifier) -> int | None:
    """The schema's migration version; None if it has no schema_migrations table."""
    found = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, 'schema_migrations'))", [schema]
    ).fetchone()
    if found is None or found[0] is None:
        return None
    row = conn.execute(sql.SQL("SELECT max(version) FROM {}").format(table)).fetchone()
    return None if row is None or row[0] is None else int(row[0])
