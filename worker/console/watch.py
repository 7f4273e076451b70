"""What the console reads to watch the fleet: outcomes per minute, the lanes, and the
deliveries in one state a page at a time.

Every read costs O(page): the per-minute hashes the step script keeps
(``keys.outcomes_in``), and ranks of the lanes' and ``bf:dead``'s sorted sets and of the
``bf:done`` list (ZRANGE and LRANGE by rank, never SCAN). Rows are shaped by
``queries.summaries`` (numbers masked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.console.queries import summaries
from worker.state import reads
from worker.state.reads import Client

MINUTES = 60  # the chart's span
PAGE = 50
LANES = reads.LANES
STATES = {  # a state the list filters by, and how the page names it
    "pending": "pending, due now",
    "waiting": "waiting retry (or in flight)",
    "dead": "dead",
    "delivered": "delivered (the newest 10,000)",
}
LANED = ("pending", "waiting")  # the states read lane by lane


@dataclass(frozen=True, slots=True)
class Minute:
    """The attempts recorded in one minute, by verdict (delivered, retry, dead, ...)."""

    start_ms: int
    counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class Lane:
    """One lane's depth, how much of it is due, and its earliest due delivery."""

    name: str
    depth: int
    due: int
    first_id: str  # "" when the lane is empty
    first_due_ms: float


@dataclass(frozen=True, slots=True)
class Page:
    """One page of the deliveries in a state: its rows, and how many are in the state."""

    rows: list[dict[str, Any]]
    total: int
    number: int
    more: bool


def outcomes(client: Client, now_ms: int) -> list[Minute]:
    """The last MINUTES minutes (the current one last), each with its verdicts counted."""
    current = now_ms // 60_000
    minutes = range(current - MINUTES + 1, current + 1)
    found = reads.minute_outcomes(client, minutes)
    return [
        Minute(minute * 60_000, _counts(value))
        for minute, value in zip(minutes, found, strict=True)
    ]


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):  # a key of another type (hand-made): nothing counted
        return {}
    return {str(k): int(v) for k, v in value.items() if str(v).isascii() and str(v).isdigit()}


def lanes(client: Client, now_ms: int) -> list[Lane]:
    """Both lanes: depth, due now, and the delivery due first (overdue if in the past)."""
    out = []
    for name, (depth, due, first) in zip(LANES, reads.lane_figures(client, now_ms), strict=True):
        first_id, first_ms = (str(first[0][0]), float(first[0][1])) if first else ("", 0.0)
        out.append(Lane(name, depth, due, first_id, first_ms))
    return out


def page_of(client: Client, state: str, lane: str, number: int, now_ms: int) -> Page:
    """Page ``number`` (from 1) of the deliveries in ``state`` (one of STATES; pending and
    waiting: of the lane ``lane``), in due order (dead and delivered: newest first)."""
    start = (number - 1) * PAGE
    if state in LANED:
        wanted, total = reads.lane_page(client, lane, state == "pending", start, PAGE, now_ms)
    else:
        wanted, total = reads.newest_page(client, state == "dead", start, PAGE)
    return Page(summaries(client, wanted), total, number, start + PAGE < total)
