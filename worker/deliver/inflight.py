"""Requests in flight per worker process: as many as the provider's latency needs.

A drain sends its batch's requests at once (``drain.py``), so what one process has in
flight is the sum of its drains' batches. ``Limiter`` holds that sum under a limit that
a gradient controller moves (after Netflix's concurrency-limits "gradient"):

- every window of attempts (at least ``WINDOW_MIN`` of them, and at least the limit, so
  about one round trip at full use) it compares the window's median latency with the
  lowest latency seen in the last ``BASELINE_S`` (the provider's latency when nothing
  queues: how far away it is);
- while the median stays within ``TOLERANCE`` times that minimum, and the window used
  most of the limit, the limit grows by its square root (by half, until the latency
  first rises: a slow start): a far-away provider gets as
  many requests in flight as its round trip needs (Little's law: rate x latency), until
  this process's core is the bottleneck (then its own queueing raises the latency);
- when the median rises above that, the limit shrinks in proportion (at most by half a
  window), down to ``FLOOR``: a provider slowing down under load is not driven harder;
- a window with a failure that points at the provider (timeout, connection error, HTTP
  5xx/429) halves the limit.

The limit stays within 1 and the cap (``BACKFILL_CONCURRENCY``, or ``DEFAULT_CAP``): the
memory bound, one sending thread and one pooled connection per request in flight.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from worker.deliver.policy import Evidence
from worker.settings import DEFAULT_MAX_IN_FLIGHT

# The limit a process starts with, and below which latency alone never takes it (what
# one process kept in flight before it was sized: 16 threads); failures that point at the
# provider can take it down to 1.
FLOOR = 16
WINDOW_MIN = 8  # attempts in a window, at least
TOLERANCE = 1.5  # the median latency may be this many times the minimum before it shrinks
BASELINE_S = 60.0  # the minimum latency is that of the last minute (or two)
TRACE = 256  # windows kept in Limiter.trace
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Window:
    """One window of attempts as the controller saw it, and the limit it set."""

    median_ms: float
    baseline_ms: float
    peak: int  # most requests held in flight during the window
    dropped: int  # failures that point at the provider
    limit: float  # the limit after this window


class Limiter:
    """This process's requests in flight, under a limit sized by the provider's latency."""

    def __init__(self, cap: int = DEFAULT_MAX_IN_FLIGHT, *, clock: Clock = time.monotonic) -> None:
        self._cond = threading.Condition()
        self._clock = clock
        self.trace: deque[Window] = deque(maxlen=TRACE)
        self._pool: ThreadPoolExecutor | None = None
        self.configure(cap)

    def configure(self, cap: int) -> None:
        """Start afresh with this cap (the worker's BACKFILL_CONCURRENCY)."""
        with self._cond:
            self.cap = max(1, cap)
            self.limit = float(min(FLOOR, self.cap))
            self.latency_ms: float | None = None  # the last window's median
            self._slow_start = True  # grows by half until the latency first rises
            self.held = 0
            self._samples: list[float] = []
            self._dropped = 0
            self._peak = 0
            self._mins = [math.inf, math.inf]  # the previous period's minimum, this one's
            self._period_ends = self._clock() + BASELINE_S
            self.trace.clear()
            if self._pool is not None and self._pool._max_workers != self.cap:
                self._pool.shutdown(wait=False)
                self._pool = None
            self._cond.notify_all()

    @property
    def free(self) -> int:
        """Requests that may start now."""
        return max(int(self.limit) - self.held, 0)

    def take(self, want: int, *, wait_s: float = 0.0, stop: threading.Event | None = None) -> int:
        """Hold up to ``want`` requests in flight (but half the limit at most, so two batches
        overlap); how many were granted. Waits up to ``wait_s`` for one to be free."""
        deadline = self._clock() + wait_s
        with self._cond:
            while self.free < 1:
                left = deadline - self._clock()
                if left <= 0 or (stop is not None and stop.is_set()):
                    return 0
                self._cond.wait(min(left, 0.1))
            granted = min(want, self.free, max(1, math.ceil(self.limit / 2)))
            self.held += granted
            self._peak = max(self._peak, self.held)
            return granted

    def give(self, count: int) -> None:
        """Requests held and done (or never sent)."""
        if count > 0:
            with self._cond:
                self.held = max(self.held - count, 0)
                self._cond.notify_all()

    def observe(self, latency_ms: float, evidence: Evidence) -> None:
        """One attempt's latency and what it says about the provider."""
        with self._cond:
            # every attempt fills the window (else a provider that fails most first tries
            # fast would leave the limit where it started); only answers set the baseline
            self._samples.append(latency_ms)
            if evidence.down:
                self._dropped += 1
            elif evidence is Evidence.UP:
                self._baseline(latency_ms)
            if len(self._samples) >= max(WINDOW_MIN, int(self.limit)):
                self._update()
                self._cond.notify_all()

    def _baseline(self, latency_ms: float) -> None:
        now = self._clock()
        if now >= self._period_ends:
            self._mins = [self._mins[1], math.inf]
            self._period_ends = now + BASELINE_S
        self._mins[1] = min(self._mins[1], latency_ms)

    def _update(self) -> None:
        median = statistics.median(self._samples)
        baseline = min(self._mins)
        limit = self.limit
        if self._dropped * 2 > len(self._samples):
            # most of the window failed in a way that points at the provider: back off (a
            # few failures among answers are records' or chance's, not a struggling provider)
            limit /= 2
            self._slow_start = False
        elif math.isfinite(baseline):
            gradient = max(0.5, min(1.0, TOLERANCE * baseline / max(median, 0.001)))
            limit = max(limit * gradient, min(FLOOR, limit))
            if gradient < 1.0:
                self._slow_start = False
            elif self._peak >= 0.75 * self.limit:  # used, and no queue seen: room for more
                limit += limit / 2 if self._slow_start else math.sqrt(limit)
        self.limit = max(1.0, min(float(self.cap), limit))
        self.latency_ms = median
        self.trace.append(Window(median, baseline, self._peak, self._dropped, self.limit))
        self._samples, self._dropped, self._peak = [], 0, self.held

    def pool(self) -> ThreadPoolExecutor:
        """The threads that send a batch's requests (one per request in flight at most)."""
        with self._cond:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.cap, thread_name_prefix="backfill-send")
            return self._pool


limiter = Limiter()
