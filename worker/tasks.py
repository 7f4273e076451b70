"""The Celery side of a worker: the wake-up task and the worker's start and stop.

A ``backfill.deliver`` message is a wake-up: the task drains due deliveries from Redis
(``drain.py``). The waker thread (``waker.py``) publishes wake-ups for idle capacity.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from typing import Any
from urllib.parse import urlsplit

import structlog
from celery import signals

from worker.app import app
from worker.drain import Context, drain, fleet
from worker.messages import DELIVER_TASK
from worker.provider import ca_bundle
from worker.redact import cap
from worker.runtime import get_client, get_settings, get_store, wake
from worker.settings import Settings
from worker.waker import Waker

log = structlog.get_logger("worker.tasks")
# What an argument may look like in a wake-up from an older producer (a delivery id).
_LEGACY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@app.task(name=DELIVER_TASK, bind=True, ignore_result=True, max_retries=None)
def deliver(self: Any, *args: object, **kwargs: object) -> int:
    """Drain due deliveries (Celery entry point); how many attempts were made.

    Arguments are not used: older producers sent a delivery id, which is fine; anything
    else is logged (capped) and the wake-up still drains.
    """
    if kwargs or len(args) > 1 or (args and not _legacy_id(args[0])):
        log.warning("postback.bad_message", arguments=cap(repr((args, kwargs)), 100))
    return drain(Context(get_settings(), get_store(), get_client(), self.request.id))


def _legacy_id(value: object) -> bool:
    return isinstance(value, str) and _LEGACY_ID.fullmatch(value) is not None


_wakers: list[Waker] = []


@signals.worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    settings, client = get_settings(), get_client()
    fleet.stopping.clear()
    waker = Waker(
        get_store(),
        wake,
        queue=settings.queue,
        tick_s=settings.scheduler_tick_s,
        concurrency=getattr(getattr(sender, "pool", None), "limit", None) or settings.concurrency,
        node=str(getattr(sender, "hostname", None) or f"pid{os.getpid()}"),
    )
    waker.start()
    _wakers.append(waker)
    log.info(
        "worker.ready",
        queue=settings.queue,
        concurrency=settings.concurrency,
        max_attempts=settings.max_attempts,
        retry_window_s=round(settings.retry_window_s()),
        rate_limit=settings.rate_limit,
        attempt_deadline_s=client.deadline_s,
        started_at=time.time(),
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
