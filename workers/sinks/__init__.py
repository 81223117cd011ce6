"""Where workers store events: `open_sink(url)` picks the sink by the URL's scheme."""

from __future__ import annotations

from shared.errors import ConfigError
from workers.sinks.base import (
    Sink,
    SinkError,
    SinkRejectedError,
    SinkUnavailableError,
    WriteResult,
)
from workers.sinks.postgres import PostgresSink
from workers.sinks.sqlite import SqliteSink

__all__ = [
    "PostgresSink",
    "Sink",
    "SinkError",
    "SinkRejectedError",
    "SinkUnavailableError",
    "SqliteSink",
    "WriteResult",
    "open_sink",
]

_FORMS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db"
    " or postgresql://user:password@host:5432/dbname (postgres:// too)"
)


def open_sink(url: str) -> Sink:
    """The sink `url` names (the EVENTGATE_SINK setting), opened.

    `sqlite:///` is followed by the file's path, so an absolute path makes four slashes,
    as `Settings.sink_url` writes it.

    Raises:
        ConfigError: `url` is neither form; the message names EVENTGATE_SINK.
        SinkUnavailableError: the database cannot be opened or reached.
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "sqlite" and separator and rest.startswith("/") and len(rest) > 1:
        return SqliteSink(rest[1:])
    if scheme in {"postgresql", "postgres"} and separator:
        return PostgresSink(url)
    # Only the scheme is echoed: the value may hold a password.
    raise ConfigError(f"EVENTGATE_SINK (scheme {scheme!r}) is not a sink URL; use {_FORMS}")
