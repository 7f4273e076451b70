"""What the console's pages read from Redis, shaped for showing (numbers masked).

Everything is bounded: a page reads a fixed number of keys whatever the size of the
backlog or of the keyspace (no SCAN, no KEYS), and says when a figure is an estimate.
The Store's own reads (``gauges``, ``status``, ``dead_page``, ``pause_state``,
``beats``) are used where they exist; the reads only the console needs live here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.operate.audit import redactor
from worker.operate.redact import mask_number, redact
from worker.state import delivery, keys, lookup, reads
from worker.state.reads import Client, read_briefs
from worker.state.store import Store

# Kept for callers of ``recent`` (no longer used: the overview never scans), and the
# pending deliveries whose creation time the overview reads looking for the oldest.
MARKER_SCAN_BUDGET = 0
PENDING_READ_BUDGET = 20_000
SAMPLE_PER_LANE = 1_000
# Dead letters the dead-letter page groups (the newest), and the rows it shows per group.
DEAD_WINDOW = 1_000
ROWS_PER_GROUP = 50
TEXT_SHOWN = 300
_DIGIT_RUN = re.compile(r"(?<![0-9])[0-9]{6,20}(?![0-9])")  # the shape of a number


@dataclass(frozen=True, slots=True)
class Recent:
    """Deliveries in the last minute and hour, and in the dedupe window, from counters."""

    minute: int
    hour: int
    window: int
    exact: bool  # False: ``window`` is an estimate (summed by the hour)
    scanned: int  # keys scanned: 0 (nothing is)


@dataclass(frozen=True, slots=True)
class Oldest:
    """The oldest pending delivery's age (s) and whether every pending one was read."""

    age_s: float | None
    delivery_id: str
    exact: bool
    read: int


@dataclass(slots=True)
class DeadGroup:
    """Dead letters with the same last error, newest first."""

    error: str
    key: str
    newest: str = ""
    count: int = 0  # in the window grouped
    rows: list[dict[str, Any]] = field(default_factory=list)  # the first ROWS_PER_GROUP


def error_key(error: str) -> str:
    """A short, form-safe name for a group of dead letters with the same last error."""
    return hashlib.sha256(error.encode()).hexdigest()[:16]


def shown_text(text: Any, number: str = "") -> str:
    """Stored text made safe to show: this process's secrets, control characters,
    Sign-shaped values, the record's number and any other run of 6 to 20 digits (last 4
    shown: a pause reason is no one record's), and length (the template escapes the rest).
    The worker redacted it before storing it: this is a second line."""
    if text is None or text == "":
        return ""
    text = redact(redactor.scrub(str(text)), number=number or None, limit=TEXT_SHOWN)
    return _DIGIT_RUN.sub(lambda run: mask_number(run.group()), text)


def shown(doc: dict[str, Any]) -> dict[str, Any]:
    """A delivery's readable document with its number masked and every text redacted."""
    number = str(doc.get("number", ""))
    out = dict(doc)
    out["number"] = mask_number(number)
    out["last_error"] = shown_text(doc.get("last_error"), number)
    out["attempts_made"] = [
        {
            **attempt,
            "api_reason": shown_text(attempt.get("api_reason"), number),
            "error": shown_text(attempt.get("error"), number),
        }
        for attempt in doc.get("attempts_made", [])
    ]
    return out


def summaries(client: Client, delivery_ids: Sequence[str]) -> list[dict[str, Any]]:
    """One shown row per delivery still known (its last attempt only), in one round trip."""
    rows = []
    for delivery_id, (fields, last, marker) in zip(
        delivery_ids, read_briefs(client, delivery_ids)[1], strict=True
    ):
        if isinstance(fields, Exception):  # a key of the wrong type: the claim buries it
            rows.append({"delivery_id": delivery_id, "state": "unreadable", "number": ""})
            continue
        history = [last] if isinstance(last, str) else []
        if fields:
            rows.append(shown(_status(delivery_id, fields, history)))
        elif isinstance(marker, str):
            rows.append(shown(_compacted(delivery_id, marker)))
    return rows


def _status(delivery_id: str, fields: dict[str, str], history: list[str]) -> dict[str, Any]:
    try:
        return delivery.status(delivery_id, fields, history)
    except (ValueError, TypeError):  # a hand-edited attempt document
        return delivery.status(delivery_id, fields, [])


def _compacted(delivery_id: str, marker: str) -> dict[str, Any]:
    try:
        return delivery.compacted_status(delivery_id, marker)
    except (ValueError, OverflowError, OSError):
        return {"delivery_id": delivery_id, "state": "delivered", "compacted": True}


def record(store: Store, delivery_id: str) -> dict[str, Any] | None:
    """The shown document of one delivery with every attempt it kept, or None."""
    try:
        found = store.status(delivery_id)
    except (ValueError, TypeError):  # a hand-edited attempt document
        rows = summaries(store.redis, [delivery_id])
        return rows[0] if rows else None
    return None if found is None else shown(found)


def recent(client: Client, now_ms: int, budget: int = 0, window_s: int = 7 * 86_400) -> Recent:
    """Deliveries in the last minute and hour, from the 10 s counters the step script
    keeps (``keys.delivered_in``: exact to within one 10 s span), and those kept for the
    dedupe window (``window_s``), from its hourly counters (``keys.delivered_in_hour``).

    Never a SCAN: the window's figure is the sum of the hours it spans, an estimate (the
    oldest hour is partly out of the window, and deliveries recorded before the counters
    existed are not in them). ``budget`` is no longer used.
    """
    span = now_ms // keys.COUNTED_EVERY_MS
    spans = 3_600_000 // keys.COUNTED_EVERY_MS
    hour = now_ms // keys.COUNTED_HOUR_MS
    hours = -(-window_s * 1000 // keys.COUNTED_HOUR_MS)  # the hours the window touches
    raw = reads.delivered_counts(
        client, [span - i for i in range(spans)], [hour - i for i in range(hours + 1)]
    )
    counts = [_count(v) for v in raw]
    minute, last_hour = sum(counts[: 60_000 // keys.COUNTED_EVERY_MS]), sum(counts[:spans])
    return Recent(minute, last_hour, sum(counts[spans:]), False, 0)


def _count(value: Any) -> int:
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else 0


def oldest_pending(client: Client, now_ms: int) -> Oldest:
    """The oldest pending delivery by creation time: all of them when there are at most
    PENDING_READ_BUDGET, else the SAMPLE_PER_LANE earliest due in each lane."""
    sizes = reads.lane_sizes(client)
    exact = sum(sizes) <= PENDING_READ_BUDGET
    stop = -1 if exact else SAMPLE_PER_LANE - 1
    ids = reads.lane_heads(client, stop)
    oldest: tuple[int, str] | None = None
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        for delivery_id, created in zip(chunk, reads.created_times(client, chunk), strict=True):
            if not (isinstance(created, str) and created.isascii() and created.isdigit()):
                continue
            if oldest is None or int(created) < oldest[0]:
                oldest = (int(created), delivery_id)
    if oldest is None:
        return Oldest(None, "", exact, len(ids))
    return Oldest(max(now_ms - oldest[0], 0) / 1000, oldest[1], exact, len(ids))


def outage_since(store: Store) -> str:
    """When the fleet's outage hold began (ISO time), 'yes' when that is unreadable, or ''
    when it holds for none."""
    state = store.outage_state()
    if state is None:
        return ""
    try:
        return delivery.iso(round(state[0] * 1000)) if state[0] > 0 else "yes"
    except (ValueError, OverflowError, OSError):  # a hand-edited start far off the calendar
        return "yes"


def dead_groups(store: Store, window: int = DEAD_WINDOW) -> list[DeadGroup]:
    """The newest ``window`` dead letters grouped by last error; groups newest first, each
    with its count in the window and its first ROWS_PER_GROUP rows."""
    ids = [delivery_id for delivery_id, _ in store.dead_page(limit=window)]
    groups: dict[str, DeadGroup] = {}
    for row in summaries(store.redis, ids):
        error = row.get("last_error") or "(no error recorded)"
        group = groups.setdefault(error, DeadGroup(error, error_key(error)))
        group.newest = group.newest or str(row.get("dead_at", ""))
        group.count += 1
        if len(group.rows) < ROWS_PER_GROUP:
            group.rows.append(row)
    return list(groups.values())


def dead_errors(client: Client, delivery_ids: Sequence[str]) -> list[str]:
    """The shown last error of each dead letter (as ``dead_groups`` groups them)."""
    rows = {row["delivery_id"]: row for row in summaries(client, delivery_ids)}
    return [(rows.get(i, {}).get("last_error") or "(no error recorded)") for i in delivery_ids]


def find_ids(
    store: Store, by: str, text: str, cursor: str | None, limit: int
) -> tuple[list[str], str | None]:
    """A page of the delivery ids whose ``by`` (id, msgid, app_id) is ``text``, and the
    cursor of the next page (None: no more)."""
    if by == "id":
        return ([text] if store.status(text) is not None else []), None
    msgid, app_id = (text, None) if by == "msgid" else (None, text)
    rows, more = lookup.find(store.redis, msgid, app_id, limit=limit, cursor=cursor)
    return [str(row["delivery_id"]) for row in rows], more
