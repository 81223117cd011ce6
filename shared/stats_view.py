"""`eventgate stats`: the figures of shared/stats.py as tables for an operator's terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from shared.stats import AccountFigures, GatewayFigures


def queues_table(gateway: GatewayFigures) -> Table:
    """Per queue (each shard): jobs waiting, the oldest one's age, running, deferred or
    retrying later (rq's scheduled registry), failed."""
    table = _table(
        f"queues ({gateway.workers_alive} worker(s) alive)",
        "queue",
        ("waiting jobs", "oldest waiting", "running", "scheduled", "failed"),
    )
    for queue in gateway.queues:
        table.add_row(
            queue.queue,
            f"{queue.backlog_jobs:,}",
            _age(queue.oldest_job_age_s) if queue.backlog_jobs else "-",
            f"{queue.started_jobs:,}",
            f"{queue.scheduled_jobs:,}",
            f"{queue.failed_jobs:,}",
        )
    return table


def accounts_table(accounts: list[AccountFigures]) -> Table:
    """Per account, events: accepted = persisted + duplicate + deferred (held back by the
    processing rate, not written yet) + dead-lettered + in queue; and requests refused 429."""
    table = _table(
        "accounts (events; the last column counts requests)",
        "account",
        (
            "accepted",
            "persisted",
            "duplicate",
            "deferred",
            "dead-lettered",
            "in queue",
            "rate-limited requests",
        ),
    )
    for figures in accounts:
        table.add_row(
            figures.account,
            *(
                f"{value:,}"
                for value in (
                    figures.accepted,
                    figures.persisted,
                    figures.duplicate,
                    figures.deferred,
                    figures.dead_lettered,
                    figures.in_queue,
                    figures.rate_limited,
                )
            ),
        )
    return table


def _table(title: str, name: str, figures: tuple[str, ...]) -> Table:
    """A name column, then figures right-aligned."""
    table = Table(title=title, title_justify="left")
    table.add_column(name)
    for figure in figures:
        table.add_column(figure, justify="right")
    return table


def _age(seconds: float) -> str:
    if seconds < 60:  # noqa: PLR2004 - a minute
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
