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


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every knob, with a default that runs on one machine. Env `EVENTGATE_<FIELD>` sets it."""

    # `REDIS_URL` (no prefix, the common convention); unset: an embedded server in data_dir.
    redis_url: str | None = None
    data_dir: Path = Path(".eventgate")
    # `sqlite:///path/events.db` or `postgresql://...`; empty: `events.db` in data_dir.
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
    max_future_s: Positive = 86_400
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # The rq queue the front door fills and the workers drain.
    queue: str = "eventgate"
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
    # Attempts of a failing batch (sink down, crash) before it is parked as failed.
    job_retries: Positive = 25
    # Embedded Redis durability: `always` loses no acknowledged event on a crash.
    redis_appendfsync: Literal["always", "everysec"] = "always"
    # Seconds a request waits on Redis before answering 503.
    redis_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0

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
