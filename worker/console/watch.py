"""What the console reads to watch the fleet: outcomes per minute, the lanes, and the
deliveries in one state a page at a time.

Every read costs O(page): the per-minute hashes the step script keeps
(``keys.outcomes_in``), and ranks of the lanes, ``bf:dead`` and ``bf:done`` sorted sets
(ZRANGE by rank, never SCAN). Rows are shaped by ``queries.summaries`` (numbers masked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from worker import keys
from worker.console.queries import summaries

MINUTES = 60  # the chart's span
PAGE = 50
LANES = {"live": keys.LIVE, "bulk": keys.BULK}
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


def outcomes(client: redis.Redis, now_ms: int) -> list[Minute]:
    """The last MINUTES minutes (the current one last), each with its verdicts counted."""
    current = now_ms // 60_000
    minutes = range(current - MINUTES + 1, current + 1)
    pipe = client.pipeline(transaction=False)
    for minute in minutes:
        pipe.hgetall(keys.outcomes_in(minute))
    found = pipe.execute(raise_on_error=False)
    return [
        Minute(minute * 60_000, _counts(value))
        for minute, value in zip(minutes, found, strict=True)
    ]


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):  # a key of another type (hand-made): nothing counted
        return {}
    return {str(k): int(v) for k, v in value.items() if str(v).isascii() and str(v).isdigit()}


def lanes(client: redis.Redis, now_ms: int) -> list[Lane]:
    """Both lanes: depth, due now, and the delivery due first (overdue if in the past)."""
    pipe = client.pipeline(transaction=False)
    for key in LANES.values():
        pipe.zcard(key)
        pipe.zcount(key, "-inf", now_ms)
        pipe.zrange(key, 0, 0, withscores=True)
    found = pipe.execute()
    out = []
    for at, name in enumerate(LANES):
        depth, due, first = found[3 * at : 3 * at + 3]
        first_id, first_ms = (str(first[0][0]), float(first[0][1])) if first else ("", 0.0)
        out.append(Lane(name, int(depth), int(due), first_id, first_ms))
    return out


def page_of(client: redis.Redis, state: str, lane: str, number: int, now_ms: int) -> Page:
    """Page ``number`` (from 1) of the deliveries in ``state`` (one of STATES; pending and
    waiting: of the lane ``lane``), in due order (dead and delivered: newest first)."""
    start = (number - 1) * PAGE
    if state in LANED:
        key = LANES[lane]
        due = int(client.zcount(key, "-inf", now_ms))
        total = due if state == "pending" else int(client.zcard(key)) - due
        first = start if state == "pending" else due + start
        rows: list[Any] = (
            client.zrange(key, first, first + PAGE - 1, withscores=True) if start < total else []
        )
        wanted = [
            str(member) for member, score in rows
            if (float(score) <= now_ms) == (state == "pending")
        ]  # fmt: skip
    else:
        key = keys.DEAD if state == "dead" else keys.DONE
        pipe = client.pipeline(transaction=True)
        pipe.zcard(key)
        pipe.zrevrange(key, start, start + PAGE - 1)
        total, members = pipe.execute()
        wanted = [str(member) for member in members]
    return Page(summaries(client, wanted), int(total), number, start + PAGE < int(total))
