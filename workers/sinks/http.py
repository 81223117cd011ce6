"""The HTTP forward sink: batches POSTed as gzipped JSON to a target URL, each with an
Idempotency-Key made from its events, retried with backoff; at-least-once to the target."""

from __future__ import annotations

import gzip
import time
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit, urlunsplit

import msgspec
import urllib3

from shared.errors import ConfigError
from workers.backoff import full_jitter, retry_after_s
from workers.sinks.base import (
    EventRecord,
    SinkRefusedError,
    SinkRejectedError,
    SinkUnavailableError,
    WriteResult,
    batch_key,
    event_record,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from shared.event import Event
    from shared.persons import Profile

# Statuses worth trying again: the target is busy, throttling, or broken for now.
_TRANSIENT = frozenset({408, 409, 429})
# Statuses that refuse the data itself: bisecting the batch finds the events at fault.
_DATA_REFUSED = frozenset({400, 413, 422})
_BODY_SHOWN = 300  # characters of an error answer kept in the message (and dead letters)


class ForwardBody(msgspec.Struct, frozen=True):
    """What the target receives: the batch's key (also the Idempotency-Key header) and its
    events, each with its `event_id` and `account`."""

    batch_id: str
    events: list[EventRecord]


_ENCODER = msgspec.json.Encoder()


class HttpSink:
    """One target URL over a kept-alive connection pool (urllib3: the worker is synchronous,
    and rq runs jobs in a plain thread)."""

    keyed = False  # nothing on the target dedupes for us: Redis markers guard the sends
    keeps_profiles = False

    def __init__(  # noqa: PLR0913 - a forward target's knobs, all keyword-only
        self,
        url: str,
        *,
        max_events: int = 500,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        compress: bool = True,
        attempts: int = 3,
        max_wait_s: float = 10.0,
        linger_ms: int = 0,
        bearer: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Raises:
        ConfigError: not an http(s) URL with a host.
        """
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ConfigError(f"forward sink: {parts.scheme!r} URL without a host")
        port = f":{parts.port}" if parts.port else ""
        target = urlunsplit((parts.scheme, f"{parts.hostname}{port}", parts.path, parts.query, ""))
        self.name = urlunsplit((parts.scheme, f"{parts.hostname}{port}", parts.path, "", ""))
        self.url = target
        self.max_events: int | None = max_events
        self.linger_s = linger_ms / 1000
        self._compress = compress
        self._attempts = attempts
        self._max_wait_s = max_wait_s
        self._sleep = sleep
        headers = {"Content-Type": "application/json", "User-Agent": "eventgate"}
        if compress:
            headers["Content-Encoding"] = "gzip"
        if parts.username is not None:
            auth = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            headers["Authorization"] = urllib3.make_headers(basic_auth=auth)["authorization"]
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        self._headers = headers
        self._pool = urllib3.PoolManager(
            num_pools=1,
            maxsize=1,
            retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=timeout_s),
        )

    def write_batch(self, events: Sequence[Event]) -> WriteResult:
        """POST the events as one batch; a repeat of the same events carries the same
        Idempotency-Key. Network errors, 408, 409, 429 and 5xx are tried again here, up to
        `attempts` times with full-jitter backoff (or the Retry-After asked, if at most
        `max_wait_s`).

        Raises:
            SinkUnavailableError: still failing (`retry_after` set from the target's).
            SinkRejectedError: 400, 413 or 422: the target refuses these events.
            SinkRefusedError: another 4xx or a redirect: it refuses any batch (credentials,
                URL); fix the setting, then replay the dead letters.
        """
        if not events:
            return WriteResult(new=0, duplicate=0)
        key = batch_key(events)
        body = _ENCODER.encode(ForwardBody(key, [event_record(e) for e in events]))
        if self._compress:
            body = gzip.compress(body, compresslevel=6, mtime=0)  # the same bytes every time
        headers = {**self._headers, "Idempotency-Key": key}
        for attempt in range(self._attempts):
            error = self._post(body, headers)
            if error is None:
                return WriteResult(new=len(events), duplicate=0)
            wait = max(
                full_jitter(attempt, base_s=0.5, cap_s=self._max_wait_s), error.retry_after or 0
            )
            if attempt + 1 == self._attempts or wait > self._max_wait_s:
                raise error
            self._sleep(wait)
        raise AssertionError("unreachable: the last attempt raises")  # pragma: no cover

    def _post(self, body: bytes, headers: dict[str, str]) -> SinkUnavailableError | None:
        """One POST: None if the target took it, the error to retry on, or raises.

        Raises:
            SinkRejectedError, SinkRefusedError: as `write_batch`.
        """
        try:
            response = self._pool.request(
                "POST", self.url, body=body, headers=headers, redirect=False, retries=False
            )
        except urllib3.exceptions.HTTPError as exc:
            # Connection refused or reset, DNS, TLS, timeouts (a target that hangs).
            return SinkUnavailableError(f"{self.name}: {type(exc).__name__}: {exc}")
        status = response.status
        if 200 <= status < 300:  # noqa: PLR2004 - the success class
            return None
        answer = response.data[:_BODY_SHOWN].decode("utf-8", "replace")
        message = f"{self.name} answered {status}: {answer}"
        if status in _TRANSIENT or status >= 500:  # noqa: PLR2004 - server errors
            wait = retry_after_s(response.headers.get("Retry-After"))
            return SinkUnavailableError(message, retry_after=wait)
        if status in _DATA_REFUSED:
            raise SinkRejectedError(message)
        raise SinkRefusedError(message)

    def upsert_profiles(self, profiles: Sequence[Profile]) -> int:  # noqa: ARG002 - events only
        return 0

    def close(self) -> None:
        self._pool.clear()
