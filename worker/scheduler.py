"""The dispatcher: a thread in every worker that turns due deliveries into Celery messages.

Waiting retries live in Redis (``backfill:schedule``), not in Celery countdowns, so a
provider outage with many deliveries waiting costs Redis memory only, never worker
memory, and no retry can outlive the broker's visibility timeout and run twice. The
same pass re-dispatches deliveries whose message was lost (a worker killed between
kombu's fetch and its unacked write) once they are ``requeue_after_s`` overdue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import redis
import structlog

from worker.heartbeat import BEAT_EVERY_S, BEAT_TTL_S, progress
from worker.store import Store

log = structlog.get_logger("worker.scheduler")
BATCH = 500


class Dispatcher(threading.Thread):
    """Every tick: take due deliveries from the schedule and publish one message each."""

    def __init__(
        self,
        store: Store,
        publish: Callable[[Sequence[str]], None],
        *,
        queue: str,
        tick_s: float,
        high_water: int,
        probe_lease_s: float,
        pause_s: float,
        node: str,
    ) -> None:
        super().__init__(name="backfill-dispatcher", daemon=True)
        self._store = store
        self._publish = publish
        self._queue = queue
        self._tick_s = tick_s
        self._high_water = high_water
        self._probe_lease_s = probe_lease_s
        self._pause_s = pause_s
        self._node = node
        self._next_beat = 0.0
        self._stopping = threading.Event()

    def run(self) -> None:
        log.info("dispatcher.started", queue=self._queue, tick_s=self._tick_s)
        failures = 0
        while not self._stopping.wait(min(self._tick_s * 2**failures, 5.0)):
            try:
                self.dispatch_due()
                self._beat()
                failures = 0
            except (redis.RedisError, OSError) as exc:
                failures = min(failures + 1, 6)
                log.warning("dispatcher.redis_unavailable", error=f"{type(exc).__name__}: {exc}")
        log.info("dispatcher.stopped")

    def dispatch_due(self) -> int:
        """One pass: publish every due delivery (in batches); returns how many."""
        total = 0
        while not self._stopping.is_set():
            depth, ids = self._store.promote(
                self._queue,
                limit=BATCH,
                high_water=self._high_water,
                probe_lease_s=self._probe_lease_s,
                pause_s=self._pause_s,
            )
            if ids:
                self._publish(ids)
                total += len(ids)
            if len(ids) < BATCH:
                progress.saw(due=bool(depth or total))
                break
        return total

    def _beat(self) -> None:
        now = time.monotonic()
        if now >= self._next_beat:
            self._store.beat(self._node, progress.beat(), BEAT_TTL_S)
            self._next_beat = now + BEAT_EVERY_S

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to stop and wait for it."""
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
