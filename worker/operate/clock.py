"""The fleet's shared clock: Redis ``TIME``, and this process's offset from it.

The provider refuses a ``Timestamp`` a few minutes off (``-16``), and the step scripts
schedule every delivery by Redis's own clock. So a worker measures how far its clock is
from Redis's (at start-up and with every heartbeat, halfway through the round trip) and,
unless told not to, signs, audits and reads due times by the corrected time. No Redis
import here: ``measure`` takes any client with a ``time()`` method.

The provider's ``Date`` header is a second witness (``witness``): when it disagrees with the
time we sign with, one error line says which clock is likely wrong (Redis's, when the
provider agrees with this host's own clock) and the heartbeat carries the difference.
"""

from __future__ import annotations

import email.utils
import threading
import time
from typing import Any, Protocol

import structlog

log = structlog.get_logger("worker.clock")

# A measurement whose round trip took longer than this says too little to be used.
MAX_ROUND_TRIP_S = 0.5
# The provider's Date header is read at most this often (it costs a parse per answer).
WITNESS_EVERY_S = 10.0


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
        self.provider_offset_s: float | None = None  # provider's Date minus what we sign with
        self._witnessed_at = -WITNESS_EVERY_S  # monotonic
        self._provider_over = False

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

    def witness(self, date: str | None, elapsed_s: float) -> float | None:
        """Read the provider's ``Date`` header (at most every WITNESS_EVERY_S) of an answer
        that took ``elapsed_s``; the provider's clock minus the time we sign with, or None.

        The header has whole seconds and was stamped while the request was in flight, so a
        difference within the limit plus that uncertainty is not reported."""
        started = time.monotonic()
        if not date or started - self._witnessed_at < WITNESS_EVERY_S:
            return None
        self._witnessed_at = started
        if not date.isascii() or len(date) > 64:
            return None
        try:
            provider = email.utils.parsedate_to_datetime(date).timestamp() + 0.5
        except (TypeError, ValueError, IndexError, OverflowError, OSError):
            return None
        offset = provider - (self.now() - elapsed_s / 2)
        self.provider_offset_s = offset
        over = abs(offset) > self.limit_s + 1.0 + elapsed_s
        if over and not self._provider_over:
            log.error(
                "worker.provider_clock_differs",
                provider_offset_s=round(offset, 1),
                limit_s=self.limit_s,
                corrected=self.correct,
                detail="the provider's Date header is this far from the time we sign with; "
                + self._likely_off(offset),
            )
        elif self._provider_over and not over:
            log.warning("worker.provider_clock_agrees", provider_offset_s=round(offset, 1))
        self._provider_over = over
        return offset

    def _likely_off(self, provider_offset_s: float) -> str:
        """Which clock is likely wrong, by the three witnesses: this host, Redis, provider."""
        near = self.limit_s + 1.0
        if self.correct and abs(provider_offset_s + self.offset_s) <= near:
            return (
                "it agrees with this host's own clock, so the shared clock (Redis TIME) is "
                "likely off: fix the Redis host's time sync"
            )
        if not self.correct and abs(provider_offset_s - self.offset_s) <= near:
            return (
                "it agrees with the shared clock (Redis TIME), so this host's clock is off: "
                "fix its time sync (or set BACKFILL_CLOCK_CORRECTION=true)"
            )
        if abs(self.offset_s) <= near:
            return (
                "this host and Redis agree, so the provider's clock is likely off (or both of "
                "ours are): check their time sync, and ask the provider"
            )
        return "fix the time sync of this host and of Redis's host"

    def describe(self) -> dict[str, str]:
        """The heartbeat's fields: the offset (s), whether it is corrected, and how far the
        provider's clock (its Date header) is from the time we sign with."""
        provider = self.provider_offset_s
        return {
            "clock_offset_s": f"{self.offset_s:.3f}" if self.measured else "",
            "clock_corrected": "1" if self.correct else "0",
            "provider_clock_offset_s": "" if provider is None else f"{provider:.1f}",
        }


clock = SharedClock()


def offset_problem(beat: dict[str, str], limit_s: float) -> tuple[str, bool] | None:
    """What a worker's heartbeat says of its clock when it is over ``limit_s`` off:
    (a sentence, whether that makes it unhealthy: only when it is not corrected).
    The provider's Date header differing by more than that is said too (not fatal: a run
    of -16 holds the fleet, and the fix is a host's time sync)."""
    try:
        offset = float(beat.get("clock_offset_s") or "")
    except ValueError:
        return None
    if abs(offset) <= limit_s:
        return provider_problem(beat, limit_s)
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


def provider_problem(beat: dict[str, str], limit_s: float) -> tuple[str, bool] | None:
    """The heartbeat's provider clock difference, when it is over the limit (not fatal)."""
    try:
        offset = float(beat.get("provider_clock_offset_s") or "")
    except ValueError:
        return None
    if abs(offset) <= limit_s + 2.0:
        return None
    side = "ahead of" if offset > 0 else "behind"
    return (
        f"the provider's clock (its Date header) is {abs(offset):.0f} s {side} the time this "
        "worker signs with: a Redis or host clock is off; fix their time sync",
        False,
    )
