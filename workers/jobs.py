"""The job function rq runs for every batch (`shared.envelope.JOB_FUNC`)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

from rq import Retry, get_current_job

from workers.processor import BatchProcessor, PoisonBatchError
from workers.retries import retry_later
from workers.sinks.base import SinkUnavailableError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from workers.riders import Rider

_processor: BatchProcessor | None = None


class Ride:
    """The riders going along with the job in hand, and those that could not be read."""

    __slots__ = ("riders", "unreadable")

    def __init__(self, riders: list[Rider]) -> None:
        self.riders = riders
        self.unreadable: list[Rider] = []


_ride: Ride | None = None


def install(processor: BatchProcessor | None) -> None:
    """Set the processor the jobs of this process use (the worker does, at start)."""
    global _processor  # noqa: PLW0603 - rq calls a plain function; this is its context
    _processor = processor


@contextmanager
def riding(riders: list[Rider]) -> Iterator[Ride]:
    """Let the next job of this process take `riders` along (see workers.riders)."""
    global _ride  # noqa: PLW0603 - rq runs the job in between; this is how it learns them
    _ride = Ride(riders)
    try:
        yield _ride
    finally:
        _ride = None


def process_batch(data: bytes) -> Retry | None:
    """Returns an rq Retry while a sink is unavailable.

    Raises:
        RuntimeError: no processor installed (run jobs through `eventgate worker`).
    """
    if _processor is None:
        raise RuntimeError("no batch processor installed; run workers with `eventgate worker`")
    ride = _ride or Ride([])
    try:
        unreadable = _processor.process([data, *(rider.data for rider in ride.riders)])
    except PoisonBatchError:
        job = get_current_job()
        if job is not None:
            job.retries_left = 0  # straight to the failed registry, no pointless retries
        raise
    except SinkUnavailableError as exc:
        # Run again after a backoff until the sink retry window is over, then the job's own
        # events go to the dead letters (workers/retries.py); its riders run on their own.
        ride.unreadable = list(ride.riders)
        job = get_current_job()
        if job is None:
            raise
        retry = retry_later(job, exc, _processor.retry_window_s)
        if retry is None:
            _processor.give_up(data, exc)
        return retry
    ride.unreadable = [ride.riders[index - 1] for index in unreadable]
    return None
