"""When a job whose sink is unavailable runs again, and until when it may.

rq's own retries count attempts (EVENTGATE_JOB_RETRIES, about 20 minutes of backoff), which
would park a batch as failed during any longer outage. A sink being down is not the batch's
fault: such a job is retried for `EVENTGATE_SINK_RETRY_FOR_S` from its first failure, with
exponential backoff and jitter (at least the sink's Retry-After), and only then are its
events dead-lettered. Other failures (Redis lost mid-job, a bug) keep rq's counted retries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from rq import Retry, get_current_job

from workers.backoff import equal_jitter

if TYPE_CHECKING:
    from rq.job import Job

    from workers.sinks.base import SinkUnavailableError

# Kept in the job's meta (rq saves it with the job when it schedules the retry).
FAILURES = "eg_sink_failures"
FIRST_FAILURE = "eg_sink_first_failure"

# The job-level backoff: 1, 2, 4 ... 60 s (half of it random). rq's maintenance enqueues due
# retries once per heartbeat, so finer steps would not be kept anyway.
BASE_S = 1.0
CAP_S = 60.0


@dataclass(frozen=True, slots=True)
class Attempt:
    number: int  # 1 for a job's first run
    first_failure: datetime | None  # of a sink, in an earlier run


def current_attempt(job: Job | None = None) -> Attempt:
    """The running job's attempt (the first, outside rq)."""
    job = job if job is not None else get_current_job()
    if job is None:
        return Attempt(1, None)
    failures = int(job.meta.get(FAILURES, 0))
    first = job.meta.get(FIRST_FAILURE)
    return Attempt(failures + 1, datetime.fromisoformat(first) if first else None)


def retry_later(job: Job, error: SinkUnavailableError, window_s: float) -> Retry | None:
    """The rq `Retry` for the job to return, so rq runs it again after a backoff; None if
    its retry window is over (dead-letter it instead).

    Returned rather than raised: rq then logs no traceback for what is an expected outage,
    and takes the delay from it. Its `max` stays one ahead of the job's retries, so an
    unavailable sink never spends the retries other failures are counted against.
    """
    now = datetime.now(UTC)
    attempt = current_attempt(job)
    first = attempt.first_failure or now
    if (now - first).total_seconds() >= window_s:
        return None
    backoff = equal_jitter(attempt.number - 1, base_s=BASE_S, cap_s=CAP_S)
    delay = max(error.retry_after or 0.0, backoff)
    job.meta[FAILURES] = attempt.number
    job.meta[FIRST_FAILURE] = first.isoformat()
    return Retry(max=(job.number_of_retries or 0) + 1, interval=max(1, math.ceil(delay)))
