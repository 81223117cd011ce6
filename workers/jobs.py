"""The job function rq runs for every batch (`shared.envelope.JOB_FUNC`)."""

from __future__ import annotations

from rq import get_current_job

from workers.processor import BatchProcessor, PoisonBatchError

_processor: BatchProcessor | None = None


def install(processor: BatchProcessor | None) -> None:
    """Set the processor the jobs of this process use (the worker does, at start)."""
    global _processor  # noqa: PLW0603 - rq calls a plain function; this is its context
    _processor = processor


def process_batch(data: bytes) -> None:
    """Raises:
    RuntimeError: no processor installed (run jobs through `eventgate worker`).
    """
    if _processor is None:
        raise RuntimeError("no batch processor installed; run workers with `eventgate worker`")
    try:
        _processor.process(data)
    except PoisonBatchError:
        job = get_current_job()
        if job is not None:
            job.retries_left = 0  # straight to the failed registry, no pointless retries
        raise
