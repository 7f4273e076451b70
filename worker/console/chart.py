"""The overview's chart: outcomes per minute as stacked bars, laid out here and drawn as
SVG by the template (no script, no build step; each bar's SVG ``title`` shows its counts
on hover).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from worker.console.watch import Minute

# What is stacked, bottom up, and its colour; "other" is a pause or an outage hold.
SERIES = (("delivered", "#2da44e"), ("retry", "#d4a72c"), ("dead", "#cf222e"),
          ("other", "#8c959f"))  # fmt: skip
OTHER = ("paused", "held")
WIDTH, HEIGHT = 1200, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 8, 10, 24


@dataclass(frozen=True, slots=True)
class Segment:
    """One outcome's part of a bar."""

    outcome: str
    color: str
    y: float
    height: float


@dataclass(frozen=True, slots=True)
class Bar:
    """One minute's bar and what hovering over it says."""

    x: float
    width: float
    segments: list[Segment]
    title: str


@dataclass(frozen=True, slots=True)
class Chart:
    """A laid-out chart: bars, horizontal grid lines with their values, time labels."""

    bars: list[Bar]
    grid: list[tuple[float, str]]
    labels: list[tuple[float, str]]
    totals: dict[str, int]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    bottom: float = HEIGHT - BOTTOM


def stacked(counts: dict[str, int]) -> dict[str, int]:
    """A minute's counts as the chart stacks them."""
    out = {name: counts.get(name, 0) for name, _ in SERIES if name != "other"}
    out["other"] = sum(counts.get(name, 0) for name in OTHER)
    return out


def nice_top(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at least ``value`` (at least 1)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def chart(minutes: Sequence[Minute]) -> Chart:
    """Stacked bars for ``minutes`` (oldest first) across the plot's width."""
    rows = [stacked(minute.counts) for minute in minutes]
    top = nice_top(max((sum(row.values()) for row in rows), default=0))
    plot_h, plot_w = HEIGHT - TOP - BOTTOM, WIDTH - LEFT - RIGHT
    slot = plot_w / max(len(rows), 1)
    bars, labels = [], []
    for at, (minute, row) in enumerate(zip(minutes, rows, strict=True)):
        x, base, segments = LEFT + at * slot, float(HEIGHT - BOTTOM), []
        for name, color in SERIES:
            height = row[name] / top * plot_h
            if height > 0:
                base -= height
                segments.append(Segment(name, color, round(base, 2), round(height, 2)))
        clock = datetime.fromtimestamp(minute.start_ms / 1000, UTC).strftime("%H:%M")
        said = ", ".join(f"{row[name]} {name}" for name, _ in SERIES)
        bars.append(Bar(round(x + 0.5, 2), round(max(slot - 1, 1), 2), segments,
                        f"{clock} UTC: {said}"))  # fmt: skip
        if minute.start_ms // 60_000 % 10 == 0:
            labels.append((round(x, 2), clock))
    grid = [(round(HEIGHT - BOTTOM - plot_h * share, 2), f"{top * share:,.10g}")
            for share in (0, 0.5, 1)]  # fmt: skip
    totals = {name: sum(row[name] for row in rows) for name, _ in SERIES}
    return Chart(bars, grid, labels, totals)
