"""A delivery as Redis keeps it, and as people read it (pure: no I/O).

Stored forms are short because there are millions of them (``keys.py`` lists the keys,
``keys.FIELD`` the hash's one-letter fields); ``status`` turns them into the readable
document that ``backfill status``, the dead-letter commands and the intake show.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from worker.enqueue.record import BackfillRecord
from worker.state import keys

STATES = {"p": "pending", "x": "dead", "d": "delivered"}
LANES = {"l": "live", "b": "bulk"}
# attempt document: stored key -> readable key
_ATTEMPT_FIELDS = {
    "n": "attempt", "at": "at", "h": "http_status", "s": "api_status", "r": "api_reason",
    "e": "error", "l": "latency_ms", "o": "outcome", "w": "retry_in_s",
}  # fmt: skip
F = keys.FIELD  # the delivery hash's field letters
_TIMES = {
    F["due"]: "due_at", F["created"]: "created_at", F["dead_at"]: "dead_at",
    F["delivered_at"]: "delivered_at", F["lease"]: "lease_until",
}  # fmt: skip


def delivery_id(record: BackfillRecord) -> str:
    """The delivery_id of a record: 16 characters of a digest of its four fields.

    The same record always gets the same id, so the delivery (or its delivered marker) is
    its own idempotency key. 80 bits: no collision in any realistic backfill.
    """
    joined = "\x1f".join((record.app_id, record.msgid or "", record.number, record.time))
    digest = hashlib.sha256(joined.encode()).digest()
    return base64.b32encode(digest[:10]).decode().lower()


def attempt_doc(
    attempt: int,
    at_ms: int,
    outcome: str,
    *,
    http_status: int | None,
    api_status: str | None,
    api_reason: str | None,
    error: str | None,
    latency_ms: float,
    retry_in_s: float | None,
) -> str:
    """One attempt as stored in the delivery's history (compact JSON, empty values left out)."""
    doc: dict[str, Any] = {"n": attempt, "at": at_ms, "o": outcome, "l": latency_ms}
    for key, value in (
        ("h", http_status), ("s", api_status), ("r", api_reason), ("e", error),
        ("w", None if retry_in_s is None else round(retry_in_s, 3)),
    ):  # fmt: skip
        if value is not None:
            doc[key] = value
    return json.dumps(doc, separators=(",", ":"))


def iso(ms: float) -> str:
    """Epoch milliseconds as ISO-8601 UTC with milliseconds."""
    text = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def expand_attempt(stored: str) -> dict[str, Any]:
    """A stored attempt document in readable form (every field present)."""
    doc = json.loads(stored)
    out = {name: doc.get(short) for short, name in _ATTEMPT_FIELDS.items()}
    if isinstance(out["at"], int | float):
        out["at"] = iso(out["at"])
    return out


def status(delivery_id: str, fields: Mapping[str, str], history: Sequence[str]) -> dict[str, Any]:
    """The readable document of a delivery kept as a hash (pending, dead, recently delivered)."""
    attempts = [expand_attempt(doc) for doc in history]
    last_error = ""
    for doc in reversed(attempts):
        if doc["outcome"] not in ("delivered", "duplicate"):
            last_error = doc["error"] or _status_text(doc)
        break
    out: dict[str, Any] = {
        "delivery_id": delivery_id,
        "state": STATES.get(fields.get(F["state"], ""), fields.get(F["state"], "")),
        "app_id": fields.get(F["app_id"], ""),
        "msgid": fields.get(F["msgid"], ""),
        "number": fields.get(F["number"], ""),
        "time": fields.get(F["time"], ""),
        "lane": LANES.get(fields.get(F["lane"], ""), ""),
        "attempts": _readable_int(fields.get(F["attempts"]) or "0"),
        "last_error": last_error,
        "replay": fields.get(F["replay"]) == "1",
        "callers": fields.get(F["callers"], ""),
    }
    for short, name in _TIMES.items():
        if fields.get(short) not in (None, "", "0"):
            out[name] = _readable_time(fields[short])
    out["attempts_made"] = attempts
    return out


def compacted_status(delivery_id: str, marker: str) -> dict[str, Any]:
    """What is kept of a delivered record for the dedupe window: when, and who may read it."""
    at, _, callers = marker.partition("|")
    return {
        "delivery_id": delivery_id,
        "state": "delivered",
        "delivered_at": iso(float(at)),
        "callers": callers,
        "attempts_made": [],
        "compacted": True,
    }


def _readable_int(stored: str) -> int | str:
    # a hand-edited (corrupt) count is shown as stored: its dead letter names the field
    digits = stored.removeprefix("-")
    return int(stored) if digits.isascii() and digits.isdigit() else stored


def _readable_time(stored: str) -> str:
    try:
        return iso(float(stored))
    except (ValueError, OverflowError, OSError):  # corrupt: shown as stored
        return stored


def _status_text(doc: Mapping[str, Any]) -> str:
    if doc.get("api_status") not in (None, "0"):
        return f"status {doc['api_status']}: {doc.get('api_reason') or ''}".strip()
    return ""
