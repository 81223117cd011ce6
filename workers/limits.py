"""Processing rate limits: write what fits an account's events/s now, defer the rest.

A batch over an account's rate is split. Every fresh event takes a token (GCRA in
shared/lua/process_limit.lua, on Redis's clock, shared by all workers): those that fit are
written now; the others are paid for in advance and go back to their queue as rq jobs in
its ScheduledJobRegistry, in chunks of one burst, each due when its tokens have come (the
worker's maintenance enqueues due jobs). When a chunk runs it is written at once: it was
paid for, so it is never deferred again (no spinning) and never dropped.

Counted in the account's counters: `deferred` is the events held back and not yet written
(up when deferred, down when written), so accepted = persisted + duplicate + deferred +
dead_lettered + in_queue still adds up.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Self

import msgspec
import redis
import structlog
from rq import get_current_job

from shared import jobs, keys
from shared.accounts import Account
from shared.envelope import Batch, encode_batch
from shared.event import new_event_id
from shared.formats.deferred import deferred_part
from shared.limits import Limit, process_limit
from shared.scripts import lua

if TYPE_CHECKING:
    from types import TracebackType

    from shared.event import Event
    from shared.jobs import JobFields
    from shared.settings import Settings

log = structlog.get_logger("workers.limits")

_US = 1_000_000
_SCHEDULED = "rq:scheduled:{}"  # rq 3's ScheduledJobRegistry of a queue


class AccountSettings:
    """Accounts as last read, trusted for `ttl_s` (the front door's key cache time): a
    changed processing rate reaches every worker within that."""

    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Account | None]] = {}

    def get(self, names: list[str]) -> dict[str, Account | None]:
        """Raises:
        redis.exceptions.RedisError: Redis unreachable (rq retries the job).
        """
        now = time.monotonic()
        stale = [n for n in names if (e := self._entries.get(n)) is None or e[0] <= now]
        if stale:
            raws = self._client.hmget(keys.ACCOUNTS, stale)
            for name, raw in zip(stale, raws, strict=True):
                account = None if raw is None else msgspec.json.decode(raw, type=Account)
                self._entries[name] = (now + self._ttl_s, account)
        return {name: self._entries[name][1] for name in names}


class Deferral:
    """A batch's hold-back: the deferred jobs and counts to write with the batch's counters,
    and the tokens to give back if the batch fails before they are written."""

    def __init__(self, limits: ProcessLimits | None) -> None:
        self._limits = limits
        self.charged: list[tuple[str, Limit, int]] = []  # account, its limit, events charged
        # Each deferred job: its queue, rq job template, due time (unix s) and batch.
        self.jobs: list[tuple[str, JobFields, int, Batch]] = []
        self.deferred: dict[str, int] = {}  # account -> change of its deferred count

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """On failure (sink down ...), give the tokens back: the retry takes them again,
        and an outage must not leave an account's rate spent on attempts."""
        if exc_type is not None and self.charged and self._limits is not None:
            self._limits.refund(self.charged)

    @property
    def held(self) -> int:
        """Events this batch deferred."""
        return sum(change for change in self.deferred.values() if change > 0)

    def queue(self, pipe: redis.client.Pipeline) -> None:
        """Add the deferred jobs and the deferred counts to the batch's pipeline."""
        for queue, template, due, batch in self.jobs:
            job_id = new_event_id()
            fields = jobs.job_fields(template, encode_batch(batch), batch.parts[0].count)
            fields["status"] = "scheduled"
            pipe.hset(jobs.job_key(job_id), mapping=fields)  # type: ignore[arg-type]
            pipe.zadd(_SCHEDULED.format(queue), {job_id: due})
            pipe.sadd(jobs.QUEUES_KEY, jobs.queue_key(queue))
        for account, change in self.deferred.items():
            if change:
                pipe.hincrby(keys.counters(account), "deferred", change)


class ProcessLimits:
    """Each worker's processing limits: one script call per batch with a limited account."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._settings = settings
        self._accounts = AccountSettings(client, settings.key_cache_s)
        self._script = client.register_script(lua("process_limit"))
        self._templates: dict[str, JobFields] = {}

    def charge(self, by_account: dict[str, list[Event]], deferral: Deferral) -> None:
        """Trim each limited account's events in `by_account` to what fits now; defer the
        rest in `deferral`.

        Raises:
            redis.exceptions.RedisError: Redis unreachable (rq retries the job).
        """
        accounts = self._accounts.get(list(by_account))
        limited = [
            (name, limit, events)
            for name, events in by_account.items()
            if (account := accounts[name]) and (limit := process_limit(account, self._settings))
        ]
        if limited:
            args = [a for _, limit, events in limited for a in (*limit.args(), len(events))]
            replies = self._script(keys=[keys.process_bucket(n) for n, _, _ in limited], args=args)
            queue = _current_queue(self._settings.queue)
            template = self.template(queue)
            for (name, limit, events), (fit, _now, tat) in zip(limited, replies, strict=True):
                deferral.charged.append((name, limit, len(events)))
                if fit < len(events):
                    deferral.jobs.extend(
                        (queue, template, due, batch)
                        for due, batch in _chunks(name, limit, events, fit, tat)
                    )
                    deferral.deferred[name] = len(events) - fit
                    by_account[name] = events[:fit]

    def refund(self, charged: list[tuple[str, Limit, int]]) -> None:
        """Give back the tokens of a batch that failed; best effort (a lost refund only
        slows the account down for a while)."""
        args = [a for _, limit, n in charged for a in (*limit.args(), -n)]
        try:
            self._script(keys=[keys.process_bucket(n) for n, _, _ in charged], args=args)
        except redis.exceptions.RedisError as exc:
            log.warning("limits.refund_failed", error=str(exc))

    def template(self, queue: str) -> JobFields:
        if queue not in self._templates:
            self._templates[queue] = jobs.job_template(self._settings, queue)
        return self._templates[queue]


def hold_back(
    limits: ProcessLimits | None,
    by_account: dict[str, list[Event]],
    prepaid: dict[str, list[Event]],
) -> Deferral:
    """Trim `by_account` (fresh events) in place to what is written now, and add the
    `prepaid` ones (deferred parts, paid for when they were held back); the rest of the
    fresh events is deferred. Without `limits`, everything is written now.

    Raises:
        redis.exceptions.RedisError: Redis unreachable (rq retries the job).
    """
    deferral = Deferral(limits)
    if limits is not None:
        limits.charge(by_account, deferral)
    for name, events in prepaid.items():
        by_account[name] = [*events, *by_account.get(name, [])]
        deferral.deferred[name] = deferral.deferred.get(name, 0) - len(events)
    for name in [n for n, events in by_account.items() if not events]:
        del by_account[name]
    return deferral


def _chunks(
    account: str, limit: Limit, events: list[Event], fit: int, start_us: int
) -> list[tuple[int, Batch]]:
    """The events past `fit`, one burst per job, each due when its last event's token comes:
    event i (1-based) of the batch's charge is due at start + i x interval - tolerance."""
    interval, tolerance = limit.args()
    size = max(1, limit.burst)
    chunks = []
    for first in range(fit, len(events), size):
        last = min(first + size, len(events))
        due_us = start_us + last * interval - tolerance
        part = deferred_part(account, events[first:last])
        chunks.append((math.ceil(due_us / _US), Batch(parts=[part])))
    return chunks


def _current_queue(default: str) -> str:
    """The queue of the job being run: a deferred job goes back where its events came from."""
    job = get_current_job()
    return str(job.origin) if job is not None and job.origin else default
