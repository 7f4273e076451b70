"""Liveness that means progress: each worker says when it last finished an attempt and
since when work has been waiting for it.

A worker can answer Celery's ping while consuming nothing (its prefetch full of messages
it holds, a wedged pool). So every worker's waker thread writes a heartbeat hash
(``bf:worker:<node>``, expiring) every few seconds: ``due_since``, when it first saw
due work waiting (wake-ups in the queue, or deliveries it just published) with none since
gone, and ``last_finish``, when one of its attempts last finished. ``backfill health``
calls a worker stalled when work has waited longer than ``stall_after_s`` and the worker
finished nothing in that time. No I/O here; the store reads and writes the hashes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from worker.operate.clock import clock

# How often the heartbeat is written, and how long it outlives a dead worker.
BEAT_EVERY_S = 2.0
BEAT_TTL_S = 30


class Progress:
    """This process's figures for its heartbeat (plain floats: safe across threads)."""

    def __init__(self) -> None:
        self.started_at = clock.now()
        self.last_finish = self.started_at
        self.due_since: float | None = None

    def finished(self) -> None:
        """An attempt of this worker was recorded."""
        self.last_finish = clock.now()

    def saw(self, *, due: bool) -> None:
        """The waker saw work waiting (or none)."""
        if not due:
            self.due_since = None
        elif self.due_since is None:
            self.due_since = clock.now()

    def beat(self) -> dict[str, str]:
        """The heartbeat hash's fields."""
        return {
            "pid": str(os.getpid()),
            "started_at": f"{self.started_at:.3f}",
            "last_finish": f"{self.last_finish:.3f}",
            "due_since": "" if self.due_since is None else f"{self.due_since:.3f}",
            "beat_at": f"{clock.now():.3f}",
            **clock.describe(),
        }


progress = Progress()


def stalled(beat: Mapping[str, str], now: float, stall_after_s: float) -> str | None:
    """Why a worker with this heartbeat is stalled, or None when it makes progress."""
    try:
        due_since = float(beat["due_since"]) if beat.get("due_since") else None
        last_finish = float(beat["last_finish"])
    except (KeyError, ValueError):
        return "heartbeat unreadable"
    if due_since is None or now - due_since <= stall_after_s:
        return None
    if now - last_finish <= stall_after_s:
        return None
    return (
        f"work waiting for {now - due_since:.0f} s and no attempt finished "
        f"for {now - last_finish:.0f} s (threshold {stall_after_s:g} s)"
    )
