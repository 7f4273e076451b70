"""The fleet's shared clock: Redis ``TIME``, and this process's offset from it.

The provider refuses a ``Timestamp`` a few minutes off (``-16``), and the step scripts
schedule every delivery by Redis's own clock. So a worker measures how far its clock is
from Redis's (at start-up and with every heartbeat, halfway through the round trip) and,
unless told not to, signs, audits and reads due times by the corrected time. No Redis
import here: ``measure`` takes any client with a ``time()`` method.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import structlog

log = structlog.get_logger("worker.clock")

# A measurement whose round trip took longer than this says too little to be used.
MAX_ROUND_TRIP_S = 0.5


class TimeSource(Protocol):
    """What ``measure`` asks: redis-py's ``Redis.time()`` ([seconds, microseconds])."""

    def time(self) -> Any: ...


class SharedClock:
    """This process's view of the shared clock (plain floats: safe across threads)."""

    def __init__(self) -> None:
        self.offset_s = 0.0  # shared clock minus this host's clock, as last measured
        self.measured = False
        self.correct = True  # BACKFILL_CLOCK_CORRECTION: add the offset to what we read
        self.limit_s = 30.0  # BACKFILL_CLOCK_MAX_OFFSET_S: past this, one error line
        self._over = False
        self._lock = threading.Lock()

    def now(self) -> float:
        """Epoch seconds by the shared clock (this host's clock when not correcting)."""
        return time.time() + (self.offset_s if self.correct else 0.0)

    def measure(self, source: TimeSource) -> float | None:
        """Ask the shared clock once; the offset found, or None when the round trip was too
        slow (or the answer unreadable) to say anything, and the last offset is kept."""
        before = time.time()
        answer = source.time()
        after = time.time()
        try:
            seconds, micros = answer
            shared = int(seconds) + int(micros) / 1e6
        except (TypeError, ValueError):
            return None
        if after - before > MAX_ROUND_TRIP_S:
            return None
        with self._lock:
            self.offset_s = shared - (before + after) / 2
            self.measured = True
        return self.offset_s

    def check(self, source: TimeSource) -> None:
        """Measure, and log one error line when the offset passes the limit (one warning
        when it is back within it)."""
        offset = self.measure(source)
        if offset is None:
            return
        over = abs(offset) > self.limit_s
        if over and not self._over:
            log.error(
                "worker.clock_offset",
                offset_s=round(offset, 3),
                limit_s=self.limit_s,
                corrected=self.correct,
                detail="this host's clock is off the shared clock (Redis TIME); "
                + ("signing with the corrected time" if self.correct else
                   "NOT corrected: the provider will refuse its timestamps (-16)"),
            )  # fmt: skip
        elif self._over and not over:
            log.warning("worker.clock_offset_over", offset_s=round(offset, 3))
        self._over = over

    def describe(self) -> dict[str, str]:
        """The heartbeat's fields: the offset (s) and whether it is corrected."""
        return {
            "clock_offset_s": f"{self.offset_s:.3f}" if self.measured else "",
            "clock_corrected": "1" if self.correct else "0",
        }


clock = SharedClock()


def offset_problem(beat: dict[str, str], limit_s: float) -> tuple[str, bool] | None:
    """What a worker's heartbeat says of its clock when it is over ``limit_s`` off:
    (a sentence, whether that makes it unhealthy: only when it is not corrected)."""
    try:
        offset = float(beat.get("clock_offset_s") or "")
    except ValueError:
        return None
    if abs(offset) <= limit_s:
        return None
    ahead = "behind" if offset > 0 else "ahead of"
    corrected = beat.get("clock_corrected") == "1"
    sentence = f"clock {abs(offset):.1f} s {ahead} the shared clock (Redis TIME)"
    if corrected:
        return sentence + ", corrected when signing", False
    return (
        sentence + ", NOT corrected (BACKFILL_CLOCK_CORRECTION=false): the provider refuses "
        "timestamps a few minutes off (-16); fix the host's time sync",
        True,
    )
