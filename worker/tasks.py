"""The delivery task: one attempt per execution -> audit -> delivered / retry / dead / paused."""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import structlog
from celery import signals

from worker import metrics
from worker.app import app, get_settings
from worker.audit import log_attempt, redactor
from worker.errors import ConfigError
from worker.heartbeat import progress
from worker.messages import DELIVER_TASK, wake_messages
from worker.policy import SLOWDOWN_CODES, AnswerClass, Outcome, decide
from worker.provider import Answer, ProviderClient, ca_bundle
from worker.record import BackfillRecord
from worker.redact import cap
from worker.scheduler import Dispatcher
from worker.settings import Settings
from worker.store import Claim, Store, connect

log = structlog.get_logger("worker.tasks")
# An attempt waits at most this long for a rate-limit slot; beyond, it is rescheduled.
MAX_RATE_WAIT_S = 5.0
# What a delivery id may look like in a message (ours are UUIDs); anything else is dropped.
DELIVERY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Runtime:
    """What a worker process builds once: settings, the Redis store, the provider client."""

    settings: Settings
    store: Store
    client: ProviderClient


@cache
def get_store() -> Store:
    """The process's Store on ``BACKFILL_REDIS_URL``."""
    settings = get_settings()
    return Store(
        connect(settings.redis_url, settings.redis_master_name),
        dedupe_ttl_s=settings.dedupe_ttl_s,
        requeue_after_s=settings.requeue_after_s,
    )


@cache
def get_runtime() -> Runtime:
    """Build the worker's runtime; needs the API credentials (ConfigError otherwise)."""
    settings = get_settings()
    api_key, api_secret = settings.credentials()
    bundle = ca_bundle()
    if bundle is not None and not os.path.exists(bundle):
        name = "REQUESTS_CA_BUNDLE" if os.environ.get("REQUESTS_CA_BUNDLE") else "CURL_CA_BUNDLE"
        raise ConfigError(f"{name}: no such file or directory: {cap(bundle, 200)}")
    redactor.add_secret(api_secret)
    redactor.add_secret(api_key)  # a credential too: never in a log line
    client = ProviderClient(
        settings.base_url,
        api_key,
        api_secret,
        connect_timeout_s=settings.connect_timeout_s,
        read_timeout_s=settings.read_timeout_s,
        code_table=settings.code_table,
        on_sign=redactor.add_sign,
    )
    return Runtime(settings, get_store(), client)


@app.task(name=DELIVER_TASK, bind=True, ignore_result=True, max_retries=None)
def deliver(self: Any, delivery_id: object) -> str:
    """Make one attempt at a delivery (Celery entry point); the argument is untrusted."""
    if not isinstance(delivery_id, str) or not DELIVERY_ID.fullmatch(delivery_id):
        log.warning("postback.bad_message", delivery_id=cap(repr(delivery_id), 100))
        return "rejected"
    return attempt_delivery(delivery_id, task_id=self.request.id)


def publish(delivery_ids: Sequence[str], store: Store | None = None) -> None:
    """Push one ``backfill.deliver`` message per delivery onto the queue: one LPUSH in all.

    The messages are built by ``worker.messages`` (why not ``apply_async``: see there).
    ``store``: the one that enqueued them (the intake's answers fast when Redis is down).
    """
    if not delivery_ids:
        return
    queue = get_settings().queue
    (store or get_store()).redis.lpush(queue, *wake_messages(delivery_ids, queue))


def attempt_delivery(delivery_id: str, task_id: str | None = None) -> str:
    """Claim (and count), send, audit and record one attempt; returns what happened."""
    rt = get_runtime()
    settings = rt.settings
    claim = rt.store.claim(
        delivery_id,
        settings.attempt_lease_s,
        max_attempts=settings.max_attempts,
        pause_s=settings.pause_s,
        rate_per_s=settings.rate_limit,
        burst=settings.rate_burst,
        max_wait_s=MAX_RATE_WAIT_S,
    )
    if claim.verdict != "claimed":
        return _not_attempted(delivery_id, claim, settings)
    attempt = claim.attempts
    if claim.record is None:  # the stored record no longer validates: never sent
        answer = Answer(AnswerClass.BAD_RECORD, error=claim.detail)
        return _record(rt, delivery_id, claim, attempt, answer, Outcome.DEAD, None, task_id)
    try:
        if claim.wait_s > 0:
            metrics.RATE_LIMIT_WAITS.inc()
            metrics.RATE_LIMIT_WAIT_SECONDS.inc(claim.wait_s)
            time.sleep(claim.wait_s)
        answer = rt.client.send(claim.record)
        outcome, retry_in_s = decide(
            answer.kind,
            attempt,
            settings.max_attempts,
            settings.backoff_base_s,
            settings.backoff_cap_s,
            answer.retry_after_s,
        )
    except Exception as exc:  # whatever fails, the attempt is audited and counted
        answer = Answer(AnswerClass.TRANSIENT, error=f"unexpected error: {type(exc).__name__}")
        outcome, retry_in_s = decide(
            answer.kind, attempt, settings.max_attempts, settings.backoff_base_s,
            settings.backoff_cap_s,
        )  # fmt: skip
    metrics.ATTEMPT_SECONDS.observe(answer.latency_ms / 1000.0)
    if outcome is Outcome.PAUSED:
        retry_in_s = settings.pause_s
    return _record(rt, delivery_id, claim, attempt, answer, outcome, retry_in_s, task_id)


def _record(
    rt: Runtime,
    delivery_id: str,
    claim: Claim,
    attempt: int,
    answer: Answer,
    outcome: Outcome,
    retry_in_s: float | None,
    task_id: str | None,
) -> str:
    """Audit the attempt, then write it and its consequence to Redis in one script."""
    settings = rt.settings
    assert claim.record is not None or outcome is Outcome.DEAD
    log_attempt(
        delivery_id=delivery_id,
        attempt=attempt,
        max_attempts=settings.max_attempts,
        record=claim.record,
        answer=answer,
        outcome=outcome,
        retry_in_s=retry_in_s,
        replay=claim.replay,
    )
    last_error = _last_error(answer)
    verdict, first_pause = rt.store.finish(
        delivery_id,
        claim,
        outcome=outcome.value,
        attempt=_attempt_doc(attempt, answer, outcome, retry_in_s, task_id),
        counted=outcome is not Outcome.PAUSED,
        retry_in_s=retry_in_s or 0.0,
        pause_s=settings.pause_s,
        last_error=last_error,
        pause_reason=last_error,
        hold_s=settings.slowdown_s if answer.api_status in SLOWDOWN_CODES else 0.0,
    )
    progress.finished()
    metrics.ATTEMPTS.labels(outcome.value).inc()
    if first_pause:
        log.error(
            "postback.paused",
            delivery_id=delivery_id,
            api_status=answer.api_status,
            api_reason=answer.api_reason,
            error=answer.error,
            pause_s=settings.pause_s,
        )
    if verdict == "dead":
        _log_dead(delivery_id, attempt, claim.record, last_error)
    return outcome.value if verdict != "stale" else "stale"


def _log_dead(
    delivery_id: str, attempts: int, record: BackfillRecord | None, last_error: str
) -> None:
    metrics.DEAD_LETTERED.inc()
    log.error(
        "postback.dead",
        delivery_id=delivery_id,
        attempts=attempts,
        app_id=record.app_id if record else None,
        last_error=last_error,
    )


def _not_attempted(delivery_id: str, claim: Claim, settings: Settings) -> str:
    if claim.verdict == "delivered" and claim.record is not None:
        # a redelivered message for a delivery that already succeeded: nothing is sent
        log_attempt(
            delivery_id=delivery_id,
            attempt=claim.attempts,
            max_attempts=settings.max_attempts,
            record=claim.record,
            answer=None,
            outcome=Outcome.DUPLICATE,
            retry_in_s=None,
            error="already delivered; not sent again",
        )
    elif claim.verdict == "poison" and claim.record is not None:
        # its attempts were all claimed and none finished: a poison record, dead now
        error = f"poison record: claimed {claim.attempts} times without a recorded outcome"
        log_attempt(
            delivery_id=delivery_id,
            attempt=claim.attempts,
            max_attempts=settings.max_attempts,
            record=claim.record,
            answer=None,
            outcome=Outcome.DEAD,
            retry_in_s=None,
            error=error,
        )
        _log_dead(delivery_id, claim.attempts, claim.record, error)
    elif claim.verdict == "corrupt":
        log.error("postback.corrupt", delivery_id=delivery_id, error=claim.detail)
        _log_dead(delivery_id, 0, None, claim.detail)
    elif claim.verdict == "orphan":
        log.warning("postback.orphan", delivery_id=delivery_id, action="removed from schedule")
    elif claim.verdict == "throttled":
        metrics.RATE_LIMIT_WAITS.inc()
    elif claim.verdict == "missing":
        log.warning("postback.unknown_delivery", delivery_id=delivery_id)
    else:
        log.debug("postback.skipped", delivery_id=delivery_id, verdict=claim.verdict)
    return claim.verdict


def _attempt_doc(
    attempt: int, answer: Answer, outcome: Outcome, retry_in_s: float | None, task_id: str | None
) -> dict[str, Any]:
    return {
        "attempt": attempt,
        "at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "http_status": answer.http_status,
        "api_status": answer.api_status,
        "api_reason": answer.api_reason,
        "error": answer.error,
        "latency_ms": answer.latency_ms,
        "outcome": outcome.value,
        "retry_in_s": None if retry_in_s is None else round(retry_in_s, 3),
        "task_id": task_id,
    }


def _last_error(answer: Answer) -> str:
    if answer.error:
        return answer.error
    if answer.api_status not in (None, "0"):
        return f"status {answer.api_status}: {answer.api_reason or ''}".strip()
    return ""


_dispatcher: list[Dispatcher] = []


@signals.worker_ready.connect
def _start_dispatcher(sender: Any = None, **_: Any) -> None:
    rt = get_runtime()
    settings = rt.settings
    dispatcher = Dispatcher(
        rt.store,
        publish,
        queue=settings.queue,
        tick_s=settings.scheduler_tick_s,
        high_water=settings.dispatch_high_water,
        probe_lease_s=settings.attempt_lease_s,
        pause_s=settings.pause_s,
        node=str(getattr(sender, "hostname", None) or f"pid{os.getpid()}"),
    )
    dispatcher.start()
    _dispatcher.append(dispatcher)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, rt.store, settings.queue)
    log.info(
        "worker.ready",
        queue=settings.queue,
        concurrency=settings.concurrency,
        max_attempts=settings.max_attempts,
        retry_window_s=round(settings.retry_window_s()),
        rate_limit=settings.rate_limit,
        attempt_deadline_s=rt.client.deadline_s,
        started_at=time.time(),
    )
    _warn_about_transport(settings)


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


@signals.worker_shutting_down.connect
def _stop_dispatcher(**_: Any) -> None:
    while _dispatcher:
        _dispatcher.pop().stop()
