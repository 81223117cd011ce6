"""Structured logging for every eventgate process: one format, secrets and personal data masked."""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import logging as stdlib_logging
import os
import re
import sys
import uuid
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any, Final, TextIO, cast

import msgspec
import structlog
from structlog.contextvars import merge_contextvars

if TYPE_CHECKING:
    from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

    from shared.settings import Settings

__all__ = ["configure_logging", "get_logger", "mask_identity", "redact", "redact_text"]

_LEVELS: Final = {
    "debug": stdlib_logging.DEBUG,
    "info": stdlib_logging.INFO,
    "warning": stdlib_logging.WARNING,
    "error": stdlib_logging.ERROR,
}
# Our root handler carries this name so a second configure_logging replaces it, not doubles it.
_HANDLER_NAME: Final = "eventgate"
_MASK: Final = "***"

# --- redaction ---------------------------------------------------------------------------------

# Field names whose whole value is a secret, compared lowercased with '-' as '_'.
_SECRET_NAMES: Final = frozenset(
    {
        "key",
        "api_key",
        "apikey",
        "x_api_key",
        "authorization",
        "proxy_authorization",
        "cookie",
        "set_cookie",
        "token",
        "password",
        "passwd",
        "secret",
        "private_key",
        "secret_key",
    }
)
_SECRET_SUFFIXES: Final = ("_token", "_secret", "_password", "_api_key")

# Each kind of sensitive text has its own regex behind a substring test that is far cheaper
# than the scan: most log strings contain none of '@', 'eg_', '=', digits.
_AUTH: Final = re.compile(
    r"(?P<scheme>\b(?:Bearer|Basic|Digest)\s+)(?P<cred>[A-Za-z0-9._~+/=-]{8,})"
)
# password=..., "api_key": "...", db_password: ... (query strings, libpq DSNs, dict reprs).
_PAIR_WORDS: Final = ("passw", "secret", "token", "api_key", "apikey", "private")
_PAIR: Final = re.compile(
    r"(?P<head>(?i:passw(?:or)?d|secret(?:_?access)?(?:_?key)?|private_?key|token|api_?key)"
    r"['\"]?\s*[=:]\s*['\"]?)"
    r"(?P<value>[^\s&;,'\"]+)"
)
# The key id is not secret and helps debugging; the rest of the key is.
_EG_KEY: Final = re.compile(r"eg_(?P<kind>sk|pk)_(?P<kid>[0-9a-f]{12})\.[A-Za-z0-9_-]{20,}")
# scheme://user:password@host: keep all but the password (greedy: the last '@' before a '/').
_URL_PASSWORD: Final = re.compile(r"(?P<head>://[^\s:/@]*:)[^\s/]*(?=@)")
# Not the user of scheme://user@host: a login name, not an email, and it names the server.
_EMAIL: Final = re.compile(
    r"(?<![\w.%+-])(?<!://)[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
# A phone needs 8+ digits and separators in a row; the full regex runs only when one is there.
_PHONE_HINT: Final = re.compile(r"[+(\d][\d ()-]{7,}")
# E.164, or 9-15 digits grouped by spaces/dashes (digits counted in _replace_phone); not a part
# of an id or UUID, a date followed by a time, an IP or version number.
_PHONE: Final = re.compile(
    r"(?<![\w+-])(?<!\d\.)"
    r"(?:\+\d{8,15}(?!\d)|(?:\+\d{1,3}[ -]?)?(?:\(\d{1,4}\)[ -]?)?\d{2,4}(?:[ -]\d{2,4}){1,5})"
    r"(?![\w:-]|\.\d)"
)
# "a@b.co" is the shortest text any of these can match; anything shorter is not scanned.
_MIN_SENSITIVE_LEN: Final = 6
_PHONE_DIGITS: Final = range(9, 16)
# Beyond this depth a value is logged as its redacted repr: bounded work, no recursion error.
_MAX_DEPTH: Final = 8
# Values that cannot hold a secret or personal data and that the JSON encoder handles natively.
_PLAIN_TYPES: Final[frozenset[type]] = frozenset(
    {int, float, bool, type(None), dt.datetime, dt.date, dt.time, dt.timedelta, uuid.UUID}
    | {decimal.Decimal}
)
# ProcessorFormatter's bookkeeping keys: the LogRecord is not ours to rewrite.
_META_KEYS: Final = frozenset({"_record", "_from_structlog"})


def _hash8(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _phone_form(text: str) -> str:
    # "+44 20 7946 0958" and "+442079460958" are one person: hash the digits only.
    digits = "".join(c for c in text if c.isdigit())
    return "+" + digits if text.lstrip().startswith("+") else digits


def _mask_token(token: str) -> str:
    match = _EG_KEY.search(token)
    return f"eg_{match['kind']}_{match['kid']}.{_MASK}" if match else _MASK


def _replace_eg_key(match: re.Match[str]) -> str:
    return f"eg_{match['kind']}_{match['kid']}.{_MASK}"


def _replace_auth(match: re.Match[str]) -> str:
    return match["scheme"] + _mask_token(match["cred"])


def _replace_pair(match: re.Match[str]) -> str:
    return match["head"] + _mask_token(match["value"])


def _replace_url_password(match: re.Match[str]) -> str:
    return match["head"] + _MASK


def _replace_email(match: re.Match[str]) -> str:
    return f"email:{_hash8(match[0].lower())}"


def _replace_phone(match: re.Match[str]) -> str:
    phone = match[0]
    if sum(c.isdigit() for c in phone) in _PHONE_DIGITS:
        return f"phone:{_hash8(_phone_form(phone))}"
    return phone  # too few or too many digits: a date, a count, a card-like number


# Short strings repeat (event names, accounts, hosts): remember their redacted form. Bounded
# and cleared when full, so unique values cost one wasted slot, never unbounded memory.
_TEXT_CACHE: dict[str, str] = {}
_TEXT_CACHE_MAX_LEN: Final = 64
_TEXT_CACHE_SIZE: Final = 4096


def _redact_text(text: str) -> str:
    if len(text) < _MIN_SENSITIVE_LEN:
        return text
    # Ids, hex digests, UUIDs: letters, digits and dashes can only hide a phone number if they
    # are nothing but digits and dashes (the phone regex refuses a neighbouring letter or dash).
    bare = text.replace("-", "")
    if bare.isalnum() and not bare.isdigit():
        return text
    if len(text) > _TEXT_CACHE_MAX_LEN:
        return _scan_text(text)
    redacted = _TEXT_CACHE.get(text)
    if redacted is None:
        redacted = _scan_text(text)
        if len(_TEXT_CACHE) >= _TEXT_CACHE_SIZE:
            _TEXT_CACHE.clear()
        _TEXT_CACHE[text] = redacted
    return redacted


def _scan_text(text: str) -> str:
    # Order matters: Authorization values and key=value pairs first, so an eventgate key in
    # them keeps its id; bare keys after.
    if "Bearer " in text or "Basic " in text or "Digest " in text:
        text = _AUTH.sub(_replace_auth, text)
    if "=" in text or ":" in text:
        lowered = text.lower()
        if any(word in lowered for word in _PAIR_WORDS):
            text = _PAIR.sub(_replace_pair, text)
    if "eg_" in text:
        text = _EG_KEY.sub(_replace_eg_key, text)
    if "@" in text:
        text = _URL_PASSWORD.sub(_replace_url_password, text)
        text = _EMAIL.sub(_replace_email, text)
    if _PHONE_HINT.search(text):
        text = _PHONE.sub(_replace_phone, text)
    return text


_KEY_IS_SECRET: dict[str, bool] = {}
_KEY_CACHE_SIZE: Final = 4096


def _is_secret_key(key: str) -> bool:
    # Field names repeat on every line: classify each once (bounded, names come from code).
    secret = _KEY_IS_SECRET.get(key)
    if secret is None:
        name = key.lower().replace("-", "_")
        secret = name in _SECRET_NAMES or name.endswith(_SECRET_SUFFIXES)
        if len(_KEY_IS_SECRET) < _KEY_CACHE_SIZE:
            _KEY_IS_SECRET[key] = secret
    return secret


def _mask_secret(value: object) -> object:
    # "unset" (None, "", False) is useful to see and leaks nothing.
    if isinstance(value, str):
        return _mask_token(value) if value else value
    return value if value is None or isinstance(value, bool) else _MASK


def _structlog_fallback(obj: object) -> object:
    # What structlog's JSONRenderer does for unknown objects, done before redaction so
    # a repr cannot carry an email past it.
    hook = getattr(obj, "__structlog__", None)
    return hook() if callable(hook) else repr(obj)


def _redact_field(key: object, value: object, depth: int) -> object:
    if isinstance(key, str) and _is_secret_key(key):
        return _mask_secret(value)
    return _redact_value(value, depth)


def _redact_value(value: object, depth: int) -> object:
    cls = type(value)
    if cls is str:
        return _redact_text(cast("str", value))
    if cls in _PLAIN_TYPES:
        return value
    if depth >= _MAX_DEPTH:
        return _redact_text(repr(value))
    # New containers, never in place: the caller still owns what it passed to the logger.
    if isinstance(value, Mapping):
        return {
            (_redact_text(k) if isinstance(k, str) else k): _redact_field(k, v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, depth + 1) for v in value]
    return _redact_object(value, depth)


def _redact_object(value: object, depth: int) -> object:
    if isinstance(value, str):  # str subclasses, StrEnum
        return _redact_text(str(value))
    if isinstance(value, bytes | bytearray | memoryview):
        return _redact_text(bytes(value).decode(errors="replace"))
    if isinstance(value, int | float):  # IntEnum and friends
        return value
    # Structs, dataclasses, exceptions, anything else: the encoder would expand or repr them
    # after redaction, so expand them here and redact what comes out.
    builtins = msgspec.to_builtins(
        value,
        builtin_types=tuple(_PLAIN_TYPES - {int, float, bool, type(None)}),
        enc_hook=_structlog_fallback,
    )
    return _redact_value(builtins, depth + 1)


def redact(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secrets, hash emails/phones, strip URL passwords, at any depth.

    A backstop, not a licence: code should not log tokens, bodies or `redis_url` at all.
    """
    # The loop is the per-line cost: plain strings and numbers take the shortest path.
    for key, value in event_dict.items():
        secret = _KEY_IS_SECRET.get(key)
        if secret is None:
            secret = _is_secret_key(key)
        if secret:
            event_dict[key] = _mask_secret(value)
        elif type(value) is str:
            event_dict[key] = _redact_text(value)
        elif type(value) not in _PLAIN_TYPES and key not in _META_KEYS:
            event_dict[key] = _redact_value(value, 0)
    return event_dict


def redact_text(text: str) -> str:
    """`text` as a log line would show it: keys masked, emails and phone numbers hashed. For
    whatever else leaves the process with text a client sent (error answers echo it)."""
    return _redact_text(text)


def mask_identity(identity: Mapping[str, str]) -> dict[str, str]:
    """Identity fields safe to log: each value becomes `<field>:<hash8>`, stable per value.

    `email` is lowercased and `phone` reduced to its digits first, so the hash equals the one
    the redactor writes for the same address or number found in free text.
    """
    masked: dict[str, str] = {}
    for field, value in identity.items():
        name = field.lower()
        if name == "email":
            normal = value.strip().lower()
        elif name == "phone":
            normal = _phone_form(value)
        else:
            normal = value
        masked[field] = f"{field}:{_hash8(normal)}"
    return masked


# --- configuration -----------------------------------------------------------------------------


def _printable(text: str) -> str:
    return text.encode(errors="backslashreplace").decode()


def _dumps(obj: object, default: Callable[[Any], Any]) -> str:
    try:
        return msgspec.json.encode(obj, enc_hook=default).decode()
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        # A value the encoder refuses (non-str dict key, huge int, lone surrogate) must not
        # lose the line, nor raise into the code that logs. Values are already redacted.
        fallback = {
            _printable(str(k)): v
            if type(v) in (bool, float, type(None))
            else _printable(v if type(v) is str else repr(v))
            for k, v in cast("Mapping[object, object]", obj).items()
        }
        return msgspec.json.encode(fallback).decode()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _renderer(settings: Settings, stream: IO[str]) -> Processor:
    tty = _isatty(stream)
    if settings.log_format == "json" or (settings.log_format == "auto" and not tty):
        return structlog.processors.JSONRenderer(serializer=_dumps)
    # Tracebacks reach the console already formatted (and redacted) by format_exc_info: the
    # default rich traceback would print frame locals, which is where secrets live.
    return structlog.dev.ConsoleRenderer(
        colors=tty and "NO_COLOR" not in os.environ,
        exception_formatter=structlog.dev.plain_traceback,
    )


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's line writer plus the name given to `get_logger`."""

    def __init__(self, file: TextIO | None = None, name: str | None = None) -> None:
        super().__init__(file)
        self.name = name


def _add_logger_name(logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", None)
    if name is not None:
        event_dict.setdefault("logger", name)
    return event_dict


def configure_logging(settings: Settings, *, stream: IO[str] | None = None) -> None:
    """Configure structlog and stdlib logging for this process; call once at start-up.

    Lines go to `stream` (default: stderr, so a CLI's stdout stays machine-readable). Calling
    again replaces the previous configuration, but loggers already used keep theirs
    (structlog caches a logger on first use, for speed).
    """
    out = sys.stderr if stream is None else stream
    level = _LEVELS[settings.log_level]
    renderer = _renderer(settings, out)
    file = cast("TextIO", out)

    def logger_factory(*args: object) -> _NamedWriteLogger:
        # structlog passes get_logger's positional arguments: our `name`.
        return _NamedWriteLogger(file, str(args[0]) if args else None)

    # Redaction runs after tracebacks are formatted (exception text carries data too) and
    # before the timestamp (an ISO time is not a phone number; no need to scan it).
    structlog.configure(
        processors=[
            merge_contextvars,
            structlog.processors.add_log_level,
            _add_logger_name,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )

    # Records of aiohttp, rq, redis... through the same chain into the same stream.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.format_exc_info,
            redact,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    # A plain StreamHandler: whole lines in one write, like structlog's writer, and the stdlib's
    # own handling of a failing record (report it, do not raise into the caller).
    handler = stdlib_logging.StreamHandler(file)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = stdlib_logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # rq logs two INFO lines per job: noise at thousands of jobs/s; debug shows them again.
    rq_level = stdlib_logging.NOTSET if level <= stdlib_logging.DEBUG else stdlib_logging.WARNING
    stdlib_logging.getLogger("rq.worker").setLevel(rq_level)


def get_logger(name: str | None = None, **initial_values: object) -> FilteringBoundLogger:
    """A structlog logger; `name` (usually `__name__`) is logged as `logger`, like stdlib's.

    Safe at import time: the logger picks up the configuration on first use.
    """
    args = () if name is None else (name,)
    logger: FilteringBoundLogger = structlog.get_logger(*args, **initial_values)
    return logger
