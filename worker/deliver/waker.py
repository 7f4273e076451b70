"""The waker: a thread in every worker that publishes wake-ups for idle capacity.

Waiting retries and new records live in Redis (the lanes ``bf:q:live`` and
``bf:q:bulk``), not in Celery messages. Every tick the waker reads how many deliveries
are due and how many wake-ups already wait in the queue, and publishes enough wake-ups
to occupy this worker's idle threads; each woken task drains the lanes (``drain.py``).
A lost or duplicated wake-up changes nothing: the next tick makes up for it, and a
drain that finds nothing due returns at once. The same thread writes the heartbeat.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis
import structlog

from worker.deliver.drain import fleet
from worker.operate.clock import clock
from worker.operate.heartbeat import BEAT_EVERY_S, BEAT_TTL_S, progress
from worker.state import capacity
from worker.state.store import Store

log = structlog.get_logger("worker.waker")


class Waker(threading.Thread):
    """Every tick: wake-ups for due deliveries, up to this worker's idle threads."""

    def __init__(
        self,
        store: Store,
        publish: Callable[[int], None],
        *,
        queue: str,
        tick_s: float,
        concurrency: int,
        node: str,
        relieve: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(name="backfill-waker", daemon=True)
        self._store = store
        self._publish = publish
        self._queue = queue
        self._tick_s = tick_s
        self._concurrency = concurrency
        self._node = node
        # a full Redis refuses wake-ups (and kombu's bookkeeping): the waker drains itself
        self._relieve = relieve
        self._full = False
        self._next_beat = 0.0
        self._stopping = threading.Event()

    def run(self) -> None:
        log.info("waker.started", queue=self._queue, tick_s=self._tick_s)
        failures = 0
        while not self._stopping.wait(min(self._tick_s * 2**failures, 5.0)):
            try:
                self.wake()
                self._beat()
                failures = 0
            except (redis.RedisError, OSError) as exc:
                failures = min(failures + 1, 6)
                log.warning("waker.redis_unavailable", error=f"{type(exc).__name__}: {exc}")
        log.info("waker.stopped")

    def wake(self) -> int:
        """One tick: publish the wake-ups this worker's idle threads can take; how many."""
        depth, due, sending, probing = self._store.wake_figures(self._queue)
        progress.saw(due=sending and (due > 0 or depth > 0))
        if not sending or due == 0 or time.monotonic() < fleet.hold_until:
            return 0
        idle = self._concurrency - fleet.active
        if probing:  # after a pause one delivery probes the account, alone
            idle = min(idle, 1 if fleet.active == 0 else 0)
        wanted = min(due, idle) - depth
        if wanted > 0:
            try:
                self._publish(wanted)
            except redis.exceptions.OutOfMemoryError:
                if self._relieve is None:
                    raise
                if not self._full:
                    log.error("redis.full", detail=capacity.full_error(self._store.redis).args[0],
                              action="the waker delivers itself until Redis has room")  # fmt: skip
                self._full = True
                return self._relieve()
        if self._full:
            log.warning("redis.full_over", detail="wake-ups are published again")
            self._full = False
        return max(wanted, 0)

    def _beat(self) -> None:
        now = time.monotonic()
        if now >= self._next_beat:
            clock.check(self._store.redis)
            self._store.beat(self._node, progress.beat(), BEAT_TTL_S)
            self._next_beat = now + BEAT_EVERY_S

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to stop and wait for it."""
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
