"""The benchmark's figures: medians with their spread, one table and one JSON document."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

# The targets, shown beside the figures: (at least, at most).
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "front_door_ratio": (0.8, None),
    "front_door_single_ratio": (0.8, None),
    "worker_ratio": (0.6, None),
    "worker_ratio_pg": (0.6, None),
    "e2e_ratio": (0.5, None),
    "scaling_ratio": (1.7, None),
    "latency_p99_ms": (None, 500.0),
}


@dataclass(slots=True)
class Figure:
    """One measured quantity over repeated runs."""

    key: str
    section: str
    label: str
    unit: str
    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else 0.0

    def target_met(self) -> bool | None:
        low, high = TARGETS.get(self.key, (None, None))
        if (low is None and high is None) or not self.runs:
            return None
        return (low is None or self.median >= low) and (high is None or self.median <= high)


@dataclass(slots=True)
class Report:
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, section: str, label: str, unit: str) -> Figure:
        return self.figures.setdefault(key, Figure(key, section, label, unit))

    def record(self, key: str, value: float) -> None:
        self.figures[key].runs.append(value)

    def to_json(self) -> dict[str, Any]:
        """Each figure's median at the top level (the keys CI checks), details below."""
        return {
            **{key: round(f.median, 4) for key, f in self.figures.items() if f.runs},
            "figures": {
                key: {
                    "label": f.label,
                    "unit": f.unit,
                    "median": round(f.median, 4),
                    "min": round(min(f.runs), 4),
                    "max": round(max(f.runs), 4),
                    "runs": [round(r, 4) for r in f.runs],
                    "target": _target_text(key),
                }
                for key, f in self.figures.items()
                if f.runs
            },
            "notes": self.notes,
            "meta": self.meta,
        }

    def table(self) -> Table:
        table = Table(title="eventgate bench", caption="; ".join(self.notes) or None)
        for column in ("figure", "median", "spread (min-max)", "unit", "target"):
            table.add_column(column, justify="right" if column == "median" else "left")
        section = ""
        for f in self.figures.values():
            if not f.runs:
                continue
            if f.section != section:
                table.add_row(f"[bold]{f.section}[/]", end_section=False)
                section = f.section
            met = f.target_met()
            mark = "" if met is None else (" [green]met[/]" if met else " [red]missed[/]")
            table.add_row(
                f"  {f.label}",
                _number(f.median),
                f"{_number(min(f.runs))} - {_number(max(f.runs))}" if len(f.runs) > 1 else "",
                f.unit,
                _target_text(f.key) + mark,
            )
        return table


def _target_text(key: str) -> str:
    low, high = TARGETS.get(key, (None, None))
    if low is not None:
        return f">= {low:g}"
    if high is not None:
        return f"<= {high:g}"
    return ""


def _number(value: float) -> str:
    if abs(value) >= 100:  # noqa: PLR2004 - no decimals for big numbers
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"  # noqa: PLR2004
