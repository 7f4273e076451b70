"""Prometheus metrics of a worker, served on ``BACKFILL_METRICS_PORT`` (off when unset).

The server binds before Celery starts (``backfill worker``, or ``worker_init`` under
``celery -A worker worker``): a port that is taken is a ConfigError, exit 2, rather than
a worker nobody can observe. Later calls of ``serve`` are no-ops.

Counters and the latency histogram are this worker's own; the fleet-wide gauges (queue
depth, pending, waiting retries, dead letters, paused, overdue) are read from Redis at scrape
time, so every worker reports the same fleet figures.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import structlog
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.deliver.inflight import limiter
from worker.operate.clock import clock
from worker.operate.errors import ConfigError
from worker.state import capacity
from worker.state.store import Store

log = structlog.get_logger("worker.metrics")

ATTEMPTS = Counter("backfill_attempts", "Attempts by outcome.", ["outcome"])
ATTEMPT_SECONDS = Histogram(
    "backfill_attempt_duration_seconds",
    "Time of one provider call, connect to answer.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20),
)
DEAD_LETTERED = Counter("backfill_dead_lettered", "Deliveries moved to the dead-letter store.")
RATE_LIMIT_WAITS = Counter(
    "backfill_rate_limit_waits", "Attempts that waited for the fleet-wide rate limit."
)
RATE_LIMIT_WAIT_SECONDS = Counter(
    "backfill_rate_limit_wait_seconds", "Seconds attempts spent waiting for the rate limit."
)
GUARDED_MESSAGES = Counter(
    "backfill_guarded_messages",
    "Broker messages the guard dropped as malformed or ran at once with their ETA cleared.",
    ["action"],
)
OUTAGE_HOLDS = Counter("backfill_outage_holds", "Outage holds this worker entered.")
IN_FLIGHT = Gauge("backfill_in_flight", "Requests this worker holds in flight to the provider.")
IN_FLIGHT.set_function(lambda: limiter.held)
IN_FLIGHT_LIMIT = Gauge(
    "backfill_in_flight_limit",
    "Requests this worker may have in flight: sized from the provider's latency, up to the cap.",
)
IN_FLIGHT_LIMIT.set_function(lambda: limiter.limit)
# (host, port) once this process serves /metrics
_serving: list[tuple[str, int]] = []


class FleetCollector(Collector):
    """Fleet-wide gauges read from Redis on each scrape (one pipelined round trip)."""

    def __init__(self, store: Store, queue: str) -> None:
        self._store = store
        self._queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            figures = self._store.gauges(self._queue, clock.now())
        except Exception as exc:
            log.warning("metrics.redis_unavailable", error=type(exc).__name__)
            return
        for name, help_text in (
            ("queue_depth", "Messages waiting in the Celery queue."),
            ("pending", "Deliveries not yet delivered or dead."),
            ("waiting_retries", "Pending deliveries scheduled for later (retries, dispatched)."),
            ("dead_letters", "Deliveries in the dead-letter store."),
            ("paused", "1 while the fleet is paused after an account-blocked answer."),
            ("outage", "1 while the fleet holds for a provider outage, else 0."),
        ):
            yield GaugeMetricFamily(f"backfill_{name}", help_text, value=figures[name])
        overdue = GaugeMetricFamily(
            "backfill_overdue_seconds",
            "How long the lane's most overdue pending delivery has been due (0: none is).",
            labels=["lane"],
        )
        for lane in ("live", "bulk"):
            overdue.add_metric([lane], figures[f"overdue_{lane}_s"])
        yield overdue
        try:
            memory = capacity.read(self._store.redis)
        except Exception as exc:
            log.warning("metrics.redis_unavailable", error=type(exc).__name__)
            return
        yield GaugeMetricFamily(
            "backfill_redis_full",
            "1 while Redis refuses new records for lack of memory (noeviction at maxmemory).",
            value=1.0 if memory.full else 0.0,
        )
        yield GaugeMetricFamily(
            "backfill_redis_memory_used_ratio",
            "Redis used_memory / maxmemory (0 when Redis has no maxmemory).",
            value=memory.used_ratio,
        )


def serve(port: int, store: Store, queue: str, host: str = "0.0.0.0") -> None:
    """Serve /metrics on ``host:port`` in a daemon thread, once per process.

    Raises ConfigError naming ``BACKFILL_METRICS_PORT`` (or ``BACKFILL_METRICS_HOST``)
    when the address cannot be bound; a second call is a no-op.
    """
    if _serving:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"BACKFILL_METRICS_PORT: port {port} on {host} is in use "
                "(another worker on this host needs its own port)"
            ) from None
        raise ConfigError(
            f"BACKFILL_METRICS_HOST, BACKFILL_METRICS_PORT: cannot listen on {host}:{port}: "
            f"{exc.strerror or exc}"
        ) from None
    REGISTRY.register(FleetCollector(store, queue))
    _serving.append((host, port))
    log.info("metrics.serving", host=host, port=port)
