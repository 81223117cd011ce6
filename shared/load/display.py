"""The load run on screen: a live line of counters while it runs, a table at the end."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Self

from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

if TYPE_CHECKING:
    from rich.console import Console

    from shared.load.stats import Stats

_LIVE_COLUMNS = ("sent", "2xx", "4xx", "429", "503", "5xx", "error", "req/s", "p50 ms", "p99 ms")


def live_table(stats: Stats) -> Table:
    figures = stats.summary()
    table = Table(*_LIVE_COLUMNS, box=None, pad_edge=False)
    table.add_row(
        *(str(figures[c]) for c in ("sent", "2xx", "4xx", "429", "503", "5xx", "error")),
        f"{figures['requests_per_s']:,.0f}",
        f"{figures['latency_p50_ms']:.1f}",
        f"{figures['latency_p99_ms']:.1f}",
    )
    return table


class LiveView:
    """Redraws the counters a few times a second; `update` may come from any thread."""

    def __init__(self, console: Console, limit_s: float, requests: int | None) -> None:
        self._limit_s = limit_s
        self._requests = requests
        self._lock = threading.Lock()
        self._live = Live(console=console, refresh_per_second=4, transient=True)

    def update(self, stats: Stats) -> None:
        done = stats.elapsed_s / self._limit_s
        if self._requests:
            done = max(done, stats.sent / self._requests)
        bar = ProgressBar(total=1.0, completed=min(done, 1.0), width=40)
        with self._lock:
            self._live.update(Group(bar, live_table(stats)))

    def __enter__(self) -> Self:
        self._live.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._live.stop()


def summary_table(stats: Stats) -> Table:
    table = Table("figure", "value", title="eventgate load")
    for name, value in stats.summary().items():
        shown = _number(value)
        table.add_row(name.replace("_", " "), shown)
    return table


def _number(value: float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.3f}".rstrip("0").rstrip(".")
