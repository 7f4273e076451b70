"""The worker process's life: Celery's signals, handled in one place.

Start (``worker_init``: the metrics server; ``worker_ready``: the waker thread and the
``worker.ready`` line, with start-up warnings), logging (``setup_logging``: structlog
renders everything, Celery's own notices too), each task's log context, and stop
(``worker_shutting_down``: drains finish the attempt in hand, the waker stops). ``app.py``
imports this module, so ``backfill worker`` and ``celery -A worker worker`` both run it.
"""

from __future__ import annotations

import ipaddress
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import structlog
from celery import signals
from celery.apps import worker as celery_worker_module

from worker.deliver.drain import Context, drain, fleet
from worker.deliver.inflight import limiter
from worker.deliver.provider import ca_bundle
from worker.deliver.waker import Waker
from worker.operate import metrics
from worker.operate.audit import configure_logging
from worker.operate.clock import clock
from worker.operate.errors import ConfigError
from worker.operate.heartbeat import BEAT_TTL_S, progress
from worker.runtime import checked_store, get_client, get_settings, get_store, wake
from worker.settings import Settings
from worker.state import capacity
from worker.state.store import Store

log = structlog.get_logger("worker.lifecycle")


# the worker this process runs, once Celery has built it (for its exit status)
_workers: list[Any] = []


def worker_exit_status() -> int:
    """The status Celery's own ``celery worker`` command exits with for this process's worker.

    ``app.worker_main`` drops it, so an "Unrecoverable error" would otherwise exit 0.
    """
    if not _workers:
        return 1  # Celery returned before it built a worker: not a clean stop
    code = _workers[-1].exitcode
    if code is None or isinstance(code, int):
        return code or 0
    return 1  # SystemExit with a message


@signals.worker_init.connect
def _worker_init(sender: Any = None, **_: Any) -> None:
    _workers.append(sender)
    settings = get_settings()
    try:
        checked_store()  # an evicting Redis loses records: refused, the fix named
    except ConfigError as exc:
        configure_logging(settings.log_format, settings.log_level)
        log.critical("worker.config_error", error=str(exc))
        raise SystemExit(2) from None
    _relieve(settings, _node(sender))
    if settings.metrics_port is None:
        return
    # `backfill worker` has bound the port already (a no-op then); under
    # `celery -A worker worker` this is the first chance, before the worker consumes.
    try:
        metrics.serve(settings.metrics_port, get_store(), settings.queue, settings.metrics_host)
    except ConfigError as exc:
        # Celery sets logging up after worker_init: make this line JSON too
        configure_logging(settings.log_format, settings.log_level)
        log.critical("worker.config_error", error=str(exc))
        raise SystemExit(2) from None


# Started against a full Redis, a worker delivers without Celery until this share of
# maxmemory is free: Celery's broker bookkeeping then has room, and does not stop it again.
RELIEVED = 0.1


def _node(sender: Any) -> str:
    """The node name of the worker Celery built (its heartbeat's name)."""
    return str(getattr(sender, "hostname", None) or f"pid{os.getpid()}")


def _relieve(settings: Settings, node: str) -> None:
    """A full Redis refuses kombu's start-up bookkeeping (Celery would stop), not the step
    script, and delivering frees memory: drain here, without Celery, until it has room.
    The heartbeat goes on meanwhile (its script runs on a full Redis): ``backfill health``,
    whose ping a full Redis refuses, judges the worker by it."""
    store = get_store()
    if not _full(store):
        return
    configure_logging(settings.log_format, settings.log_level)
    # these deliveries sign too: by the shared clock, as the worker's once Celery runs
    clock.correct, clock.limit_s = settings.clock_correction, settings.clock_max_offset_s
    clock.check(store.redis)
    ctx = Context(settings, store, get_client(), None)
    said = 0.0
    with ThreadPoolExecutor(settings.drains, thread_name_prefix="relief") as pool:
        while _full(store, RELIEVED):
            store.beat(node, progress.beat(), BEAT_TTL_S)
            if time.monotonic() - said > 30:
                memory = capacity.read(store.redis)
                log.error("redis.full", detail=memory.full_message(),
                          action="delivering without Celery until Redis has room")  # fmt: skip
                said = time.monotonic()
            sent = sum(pool.map(lambda _: drain(ctx), range(settings.drains)))
            if sent == 0:
                time.sleep(1.0)  # nothing due now: what fills Redis is not ours to free
    log.warning("redis.full_over", detail="Redis has room again: starting the worker")


def _full(store: Store, room: float = 0.0) -> bool:
    """Whether Redis refuses writes or has less than ``room`` (a share of maxmemory) free."""
    if capacity.refuses_writes(store.redis):
        return True
    memory = capacity.read(store.redis)
    return memory.full or (room > 0 and memory.used_ratio > 1 - room)


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    # While this handler is connected Celery leaves logging alone; ours renders it all.
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    # Celery prints shutdown notices straight to stdout; make them JSON lines as well.
    celery_worker_module.safe_say = _say


def _say(message: str, _file: Any = None) -> None:
    structlog.get_logger("celery.apps.worker").warning(message.strip())


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", None))


@signals.task_postrun.connect
def _unbind_task(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()


_wakers: list[Waker] = []


@signals.worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    settings, client = get_settings(), get_client()
    clock.correct, clock.limit_s = settings.clock_correction, settings.clock_max_offset_s
    clock.check(get_store().redis)
    fleet.stopping.clear()
    limiter.configure(settings.max_in_flight)
    waker = Waker(
        get_store(),
        wake,
        queue=settings.queue,
        tick_s=settings.scheduler_tick_s,
        concurrency=getattr(getattr(sender, "pool", None), "limit", None) or settings.drains,
        node=_node(sender),
        relieve=lambda: drain(Context(settings, get_store(), client, None)),
    )
    waker.start()
    _wakers.append(waker)
    log.info(
        "worker.ready",
        queue=settings.queue,
        drains=settings.drains,
        max_in_flight=settings.max_in_flight,
        max_attempts=settings.max_attempts,
        retry_window_s=round(settings.retry_window_s()),
        rate_limit=settings.rate_limit,
        attempt_deadline_s=client.deadline_s,
        started_at=time.time(),
        clock_offset_s=round(clock.offset_s, 3),
        clock_corrected=clock.correct,
    )
    _warn_about_transport(settings)


@signals.worker_shutting_down.connect
def _stop(**_: Any) -> None:
    fleet.stopping.set()  # drains finish the attempt in hand and claim no more
    while _wakers:
        _wakers.pop().stop()


def _warn_about_transport(settings: Settings) -> None:
    """One start-up warning each for cleartext credentials and an unused SSL_CERT_FILE."""
    host = urlsplit(settings.base_url).hostname or ""
    if settings.base_url.startswith("http://") and not _loopback(host):
        log.warning(
            "provider.cleartext",
            base_url=settings.base_url,
            detail="Api-Key and Sign cross the network in clear; the Sign is an MD5 of key, "
            "secret and timestamp, open to offline guessing: use https://",
        )
    if os.environ.get("SSL_CERT_FILE") and ca_bundle() is None:
        log.warning(
            "provider.ca_bundle",
            detail="SSL_CERT_FILE is not read by requests; set REQUESTS_CA_BUNDLE to use it",
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
