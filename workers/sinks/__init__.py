"""Where workers store events: `open_sinks(setting)` opens every sink EVENTGATE_SINK lists,
each picked by its URL's scheme, with options in the URL's fragment (`#batch=500&...`)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, TypeVar
from urllib.parse import parse_qsl

import msgspec
import structlog

from shared.errors import ConfigError
from workers.backoff import equal_jitter
from workers.sinks.base import (
    Sink,
    SinkError,
    SinkRefusedError,
    SinkRejectedError,
    SinkUnavailableError,
    WriteResult,
)
from workers.sinks.http import HttpSink
from workers.sinks.jsonl import JsonlSink
from workers.sinks.postgres import PostgresSink
from workers.sinks.sqlite import SqliteSink

if TYPE_CHECKING:
    import threading

__all__ = [
    "HttpSink",
    "JsonlSink",
    "PostgresSink",
    "Sink",
    "SinkError",
    "SinkRefusedError",
    "SinkRejectedError",
    "SinkUnavailableError",
    "SqliteSink",
    "WriteResult",
    "open_sink",
    "open_sinks",
    "open_sinks_when_up",
]

log = structlog.get_logger("workers.sinks")

_FORMS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db,"
    " postgresql://user:password@host:5432/dbname (postgres:// too),"
    " https://host/path (http:// too) or jsonl:///path/events.jsonl;"
    " several, separated by commas"
)

# A comma starts a new sink only where a URL scheme follows, so commas inside a URL (a
# query string) stay in it.
_SEPARATOR = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


_T = TypeVar("_T", bound=msgspec.Struct)


class _HttpOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    batch: Annotated[int, msgspec.Meta(ge=1)] = 500  # events per POST
    # How long a worker waits for more jobs to fill a batch (at most 2 s: the riders wait in
    # the queue's intermediate list meanwhile, where a heartbeat must soon cover them).
    linger_ms: Annotated[int, msgspec.Meta(ge=0, le=2000)] = 0
    timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    gzip: bool = True
    attempts: int = 3  # POSTs of a batch in a row before the job is retried later
    max_wait_s: float = 10.0  # longest wait between them (a longer Retry-After: later)
    bearer: str | None = None


class _JsonlOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_bytes: int = 100 * 1024 * 1024
    keep: int = 10


class _PostgresOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    schema: str = "public"


class _NoOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


def open_sinks(setting: str) -> list[Sink]:
    """Every sink the EVENTGATE_SINK value lists, opened, in order (the first is the one
    account counters follow). Closed again if one of them fails to open.

    Raises:
        ConfigError: an entry is not a sink URL, has a bad option, or two name one sink.
        SinkUnavailableError: a sink cannot be opened or reached.
    """
    urls = [u for u in _SEPARATOR.split(setting.strip()) if u]
    sinks: list[Sink] = []
    try:
        for url in urls or [""]:
            sinks.append(open_sink(url))  # noqa: PERF401 - the opened ones are closed on failure
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    names = [s.name for s in sinks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        for sink in sinks:
            sink.close()
        raise ConfigError(f"EVENTGATE_SINK lists {', '.join(twice)} more than once")
    return sinks


def open_sinks_when_up(setting: str, stopping: threading.Event) -> list[Sink] | None:
    """`open_sinks`, tried again with backoff while a sink is unavailable (a worker started
    during a database outage waits instead of crash-looping); None if stopped meanwhile.

    Raises:
        ConfigError: as `open_sinks`: waiting cannot fix a setting.
    """
    attempt = 0
    while not stopping.is_set():
        try:
            return open_sinks(setting)
        except SinkUnavailableError as exc:
            wait = equal_jitter(attempt, base_s=1.0, cap_s=30.0)
            log.warning("sink.unavailable_at_start", error=str(exc), retry_in_s=round(wait, 1))
            attempt += 1
            stopping.wait(wait)
    return None


def open_sink(url: str) -> Sink:
    """The sink `url` names, opened.

    `sqlite:///` and `jsonl:///` are followed by the file's path, so an absolute path makes
    four slashes, as `Settings.sink_url` writes it.

    Raises:
        ConfigError: `url` is none of the forms; the message names EVENTGATE_SINK.
        SinkUnavailableError: the sink cannot be opened or reached.
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme in {"http", "https"} and separator:
        target, http = _options(url, _HttpOptions)
        return HttpSink(
            target,
            max_events=http.batch,
            linger_ms=http.linger_ms,
            timeout_s=http.timeout_s,
            connect_timeout_s=http.connect_timeout_s,
            compress=http.gzip,
            attempts=http.attempts,
            max_wait_s=http.max_wait_s,
            bearer=http.bearer,
        )
    if scheme == "jsonl" and separator and rest.startswith("/") and len(rest) > 1:
        path, jsonl = _options(rest[1:], _JsonlOptions)
        return JsonlSink(path, max_bytes=jsonl.max_bytes, keep=jsonl.keep)
    if scheme == "sqlite" and separator and rest.startswith("/") and len(rest) > 1:
        path, _ = _options(rest[1:], _NoOptions)
        return SqliteSink(path)
    if scheme in {"postgresql", "postgres"} and separator:
        dsn, postgres = _options(url, _PostgresOptions)
        return PostgresSink(dsn, schema=postgres.schema)
    # Only the scheme is echoed: the value may hold a password.
    raise ConfigError(f"EVENTGATE_SINK (scheme {scheme!r}) is not a sink URL; use {_FORMS}")


def _options(url: str, kind: type[_T]) -> tuple[str, _T]:
    """`url` without its fragment, and the fragment's `name=value&...` options.

    Raises:
        ConfigError: an unknown option or a bad value (never echoing the URL).
    """
    base, _, fragment = url.partition("#")
    raw: dict[str, Any] = dict(parse_qsl(fragment, keep_blank_values=True))
    try:
        return base, msgspec.convert(raw, kind, strict=False)
    except msgspec.ValidationError as exc:
        known = ", ".join(kind.__struct_fields__) or "none"
        raise ConfigError(f"EVENTGATE_SINK option: {exc} (options: {known})") from None
