"""Settings: one frozen object read from the environment once per process (12-factor)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from shared.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

PREFIX = "EVENTGATE_"
MiB = 1024 * 1024

Positive = Annotated[int, msgspec.Meta(ge=1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
YEAR_S = 31_557_600  # a Julian year
# Time windows stay within a century: a wider one would overflow datetime at its edges.
CENTURY_S = 100 * YEAR_S


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every knob, with a default that runs on one machine. Env `EVENTGATE_<FIELD>` sets it."""

    # `REDIS_URL` (no prefix, the common convention); unset: an embedded server in data_dir.
    redis_url: str | None = None
    data_dir: Path = Path(".eventgate")
    # `sqlite:///path/events.db`, `postgresql://...`, `https://...` (forward) or
    # `jsonl:///path/events.jsonl`; several, comma-separated; empty: `events.db` in data_dir.
    sink: str = ""
    host: str = "127.0.0.1"
    port: Port = 8080
    # Worker processes `eventgate up` starts.
    workers: Positive = 1
    # Native API body and batch limits.
    max_body_bytes: Positive = 5 * MiB
    max_events: Positive = 1000
    # A decompressed gzip body may not exceed this, nor be more than max_gzip_ratio times its
    # compressed size: a 10 MB bomb is refused after reading at most this much.
    max_decompressed_bytes: Positive = 20 * MiB
    max_gzip_ratio: Positive = 200
    # Timestamps further ahead than this are refused (clock bugs, unit mistakes).
    max_future_s: Annotated[int, msgspec.Meta(ge=1, le=CENTURY_S)] = 86_400
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # The rq queue the front door fills and the workers drain.
    queue: str = "eventgate"
    # Accounts hash onto this many queues that workers take from in turn, so one account's
    # backlog does not hold up the others. Shard 0 is `queue` itself; the others `queue.N`.
    shards: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    # Group commit packs waiting requests into rq jobs of about this many events.
    job_max_events: Positive = 1000
    # How long a front door trusts a cached key lookup: a revoked key fails within this.
    key_cache_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0
    # Worker crash detection: a job whose worker sent no heartbeat for this long runs again.
    job_heartbeat_s: Annotated[int, msgspec.Meta(ge=2, le=600)] = 5
    job_timeout_s: Positive = 600
    # Waiting jobs a worker takes along with each job, written in the same sink call: small
    # jobs (one request each under light traffic) cost rq's per-job overhead only once.
    worker_max_riders: Annotated[int, msgspec.Meta(ge=0, le=100)] = 9
    # Attempts of a failing batch (a crash, Redis lost mid-job) before it is parked as failed.
    job_retries: Positive = 25
    # How long a batch is retried while a sink is unavailable, from its first failure, before
    # its events go to the dead letters (`eventgate dlq`).
    sink_retry_for_s: Positive = 86_400
    # Longest wait between a worker's attempts at an unavailable sink (exponential backoff
    # up to this): while it waits, the other jobs stay queued rather than fail one by one.
    sink_backoff_max_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 30.0
    # How long a forward or file sink remembers an event it delivered (Redis, ~100 bytes each),
    # so that a re-run batch does not send it again.
    sink_marker_ttl_s: Positive = 86_400
    # Embedded Redis durability: `always` loses no acknowledged event on a crash.
    redis_appendfsync: Literal["always", "everysec"] = "always"
    # Seconds a request waits on Redis before answering 503.
    redis_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    # Request rate limits (see shared/limits.py). Off: no bucket is checked at all. Rate is
    # requests/s per account on an API without a vendor default (native, catalog, import),
    # for accounts without their own; 0: none. Burst 0: one second's worth.
    request_limits: bool = True
    request_rate: NonNegative = 0.0
    request_burst: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Events/s the workers write per account without its own `process_rate`; 0: no limit.
    process_rate: NonNegative = 0.0
    # Backpressure (ingest/backpressure.py): 503 from `high` until below `low` again. Jobs
    # waiting in the queues (0: unchecked), and Redis memory as a share of
    # memory_limit_bytes (0: Redis's maxmemory; neither set: unchecked).
    backlog_high_jobs: Annotated[int, msgspec.Meta(ge=0)] = 50_000
    backlog_low_jobs: Annotated[int, msgspec.Meta(ge=0)] = 40_000
    memory_limit_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    memory_high: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.9
    memory_low: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    backpressure_check_s: Annotated[float, msgspec.Meta(ge=0.05, le=10)] = 0.25
    backpressure_retry_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 2
    # Hostile input (README "Limits and security"). A body is refused whole when a value in
    # it sits inside more than max_depth arrays or objects, or a string in it (a key too) is
    # longer than max_string_bytes as sent. An event's properties hold at most max_properties
    # members (so do items, a profile's, a person's attributes); an event at most max_items items.
    max_depth: Annotated[int, msgspec.Meta(ge=2, le=500)] = 32
    max_string_bytes: Positive = 64 * 1024
    max_properties: Positive = 1000
    max_items: Positive = 1000
    # Timestamps further back than this are refused (0 read as 1970, a seconds/ms mix-up).
    max_past_s: Annotated[int, msgspec.Meta(ge=1, le=CENTURY_S)] = 10 * YEAR_S
    # Hostile clients. A body must arrive within body_timeout_s of its headers (408), and a
    # request's headers within keepalive_timeout_s of the connection opening or its previous
    # answer (aiohttp closes it); an idle keep-alive connection is closed after that too.
    body_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    keepalive_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 75.0
    # The request line and each header at most max_header_bytes, at most max_headers of them.
    max_header_bytes: Annotated[int, msgspec.Meta(ge=256, le=1 << 20)] = 8190
    max_headers: Annotated[int, msgspec.Meta(ge=8, le=1000)] = 100
    # Open connections from one client address (0: no cap); past it, 429 and closed. Behind a
    # proxy every connection comes from its address: raise it or set 0 there.
    max_connections_per_ip: Annotated[int, msgspec.Meta(ge=0)] = 256

    @property
    def sink_url(self) -> str:
        return self.sink or f"sqlite:///{(self.data_dir / 'events.db').resolve()}"


_ENV_FIELDS = frozenset(Settings.__struct_fields__) - {"redis_url"}
_LOCATION = re.compile(r"at `\$\.(\w+)`")


def _decode_path(kind: type, value: object) -> Path:
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise NotImplementedError


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from `env` (default: the process environment).

    Raises:
        ConfigError: a misspelt EVENTGATE_* variable or a bad value, naming the variable.
    """
    env = os.environ if env is None else env
    raw: dict[str, str] = {
        k.removeprefix(PREFIX).lower(): v for k, v in env.items() if k.startswith(PREFIX)
    }
    # REDIS_URL is the one setting without the prefix (the convention hosts already set).
    unknown = sorted(f"{PREFIX}{k.upper()}" for k in raw if k not in _ENV_FIELDS)
    if unknown:
        known = ", ".join(f"{PREFIX}{f.upper()}" for f in sorted(_ENV_FIELDS))
        raise ConfigError(f"unknown setting {', '.join(unknown)}; known: REDIS_URL, {known}")
    if env.get("REDIS_URL"):
        raw["redis_url"] = env["REDIS_URL"]
    try:
        return msgspec.convert(raw, Settings, strict=False, dec_hook=_decode_path)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _LOCATION.search(message)
        field = match.group(1) if match else ""
        name = "REDIS_URL" if field == "redis_url" else f"{PREFIX}{field.upper()}"
        reason = _LOCATION.sub("", message).strip(" -")
        raise ConfigError(f"{name}={raw.get(field, '')!r} is invalid: {reason}") from None


def settings_or_exit(env: Mapping[str, str] | None = None) -> Settings:
    """`load_settings` for entry points: a bad setting stops start-up with its message."""
    try:
        return load_settings(env)
    except ConfigError as exc:
        raise SystemExit(f"eventgate: {exc}") from None
