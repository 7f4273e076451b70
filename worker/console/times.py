"""Times for people: "3 min ago" with the exact UTC time on hover, and a record's ``time``
(epoch milliseconds, as the producer sent it) as a date.

Template filters (``app._templates`` registers them); each returns escaped markup, and a
value it cannot read is shown as it is.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from markupsafe import Markup, escape

_UNITS = ((86400, "d"), (3600, "h"), (60, "min"), (1, "s"))


def relative(seconds: float) -> str:
    """A signed duration from now in words: "3 min ago", "in 2 h", "just now"."""
    whole = abs(int(seconds))
    if whole < 2:
        return "just now"
    size, unit = next((size, unit) for size, unit in _UNITS if whole >= size)
    amount = f"{whole // size} {unit}"
    return f"{amount} ago" if seconds < 0 else f"in {amount}"


def when(text: object, now: float | None = None) -> Markup:
    """An ISO-8601 UTC time (as the console's documents carry) shown relative to now,
    the exact time on hover."""
    shown = "" if text is None else str(text)
    try:
        at = datetime.fromisoformat(shown.replace("Z", "+00:00"))
    except ValueError:
        return escape(shown)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    ago = relative(at.timestamp() - (time.time() if now is None else now))
    return Markup('<time datetime="{0}" title="{0}">{1}</time>').format(shown, ago)


def when_ms(ms: object, now: float | None = None) -> Markup:
    """Epoch milliseconds shown as ``when`` shows an ISO time."""
    try:
        at = datetime.fromtimestamp(float(str(ms)) / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return escape("" if ms is None else str(ms))
    return when(at.isoformat(timespec="milliseconds").replace("+00:00", "Z"), now)


def record_date(ms: object) -> Markup:
    """A record's ``time`` (epoch ms) as a UTC date and time, the stored value on hover."""
    stored = "" if ms is None else str(ms)
    if not (stored.isascii() and stored.isdigit()):
        return escape(stored)
    try:
        at = datetime.fromtimestamp(int(stored) / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return escape(stored)
    date = at.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{0}" title="{1} (epoch ms)">{2}</time>').format(
        at.isoformat(), stored, date
    )
