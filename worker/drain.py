"""A drain: what one woken ``backfill.deliver`` task does.

It claims due deliveries from the schedule itself and attempts them one after the other,
live lane first, until none is due, a budget is spent, or the worker is stopping. Each
step is one Redis round trip: record the outcome of the attempt just made and claim the
next (``worker/lua/step.lua``). So Celery's per-message cost (fetch, unacked bookkeeping,
ack, tracer) is paid once per wake-up, not once per delivery.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from worker import metrics
from worker.audit import log_attempt
from worker.heartbeat import progress
from worker.policy import RELEASE, AnswerClass, Evidence, Outcome, judge
from worker.provider import Answer, ProviderClient
from worker.record import BackfillRecord
from worker.settings import DRAIN_BUDGET_S, Settings
from worker.steps import Claim, Finish, StepResult
from worker.store import Store

log = structlog.get_logger("worker.drain")
# A drain returns after this many attempts or seconds, so the task's message is acked
# and the thread takes its turn in Celery's queue again.
BUDGET_ATTEMPTS = 500
BUDGET_S = DRAIN_BUDGET_S
# Every tenth step of a drain looks at the bulk lane first: live cannot starve bulk.
BULK_EVERY = 10
# Deliveries claimed in one step (one Redis round trip): as many as, at the latency just
# seen, take at most LIVE_WAIT_MS, up to MAX_BATCH. That is all a live record can wait
# behind (besides one slow attempt): an attempt slower than its share of LIVE_WAIT_MS
# gives the rest of its batch back. Bigger batches cost Redis less per delivery (the
# step's fixed cost is shared).
LIVE_WAIT_MS = 800.0
MAX_BATCH = 32
# An attempt waits at most this long for a rate-limit slot; beyond, the drain ends.
MAX_RATE_WAIT_S = 5.0


class Fleet:
    """This process's drains: how many run, whether to stop, and until when to hold off."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0
        self.stopping = threading.Event()
        self.hold_until = 0.0  # monotonic: a drain met the rate limit; no wake-ups until then
        self.answered_at = 0.0  # monotonic: when the provider last answered one of ours

    def enter(self) -> None:
        """A drain starts."""
        with self._lock:
            self.active += 1

    def leave(self) -> None:
        """A drain ends."""
        with self._lock:
            self.active -= 1


fleet = Fleet()
# The answer of a delivery released unsent (nothing was sent, nothing is logged).
RELEASED = Answer(AnswerClass.TRANSIENT, error="released unsent: the worker is stopping")


@dataclass(frozen=True, slots=True)
class Context:
    """What a drain needs: settings, the store, the provider client, the Celery task id."""

    settings: Settings
    store: Store
    client: ProviderClient
    task_id: str | None


def drain(ctx: Context) -> int:
    """Claim and attempt due deliveries until none is due or the budget is spent."""
    fleet.enter()
    try:
        return _drain(ctx)
    finally:
        fleet.leave()


def _drain(ctx: Context) -> int:
    settings = ctx.settings
    until = time.monotonic() + BUDGET_S
    done: list[Finish] = []
    attempts = steps = 0
    while True:
        stop = fleet.stopping.is_set() or attempts >= BUDGET_ATTEMPTS or time.monotonic() > until
        size = _batch_size(done)
        step = ctx.store.step(
            done,
            claim=0 if stop else size,
            prefer_bulk=steps % BULK_EVERY == BULK_EVERY - 1,
            lease_s=settings.attempt_lease_s,
            max_attempts=settings.max_attempts,
            rate_per_s=settings.rate_limit,
            burst=settings.rate_burst,
            max_wait_s=MAX_RATE_WAIT_S,
            gap_s=2 * LIVE_WAIT_MS / size / 1000,  # the i-th starts by i shares of the wait
        )
        claimed_at = time.monotonic()
        steps += 1
        _after(step, done, settings)
        if step.status == "throttled" and step.resume_in_s:
            fleet.hold_until = time.monotonic() + step.resume_in_s
        claims = step.claims
        if not claims and step.status != "again":
            return attempts
        done = []
        slow = False
        share_ms = LIVE_WAIT_MS / len(claims)
        for claim in claims:
            if fleet.stopping.is_set() or slow:
                # claimed in this batch, never sent: given back, due at once and uncounted
                # (the worker is stopping, or the provider got slow and other threads
                # should take these rather than wait behind this one)
                done.append(Finish(claim, RELEASED, RELEASE))
                continue
            item = attempt(ctx, claim, claimed_at, holding=step.outage)
            done.append(item)
            attempts += 1
            slow = _stop_batch(item, share_ms, done)


def _stop_batch(item: Finish, share_ms: float, batch: Sequence[Finish]) -> bool:
    """Whether the rest of a batch goes back after this attempt: it took more than its
    share of LIVE_WAIT_MS, or it points at a provider outage and nothing of this batch
    proved the provider up (the rest would most likely fail the same way)."""
    if item.answer.latency_ms > share_ms:
        return True
    return item.verdict.evidence.down and not _answered(batch)


def _answered(batch: Sequence[Finish]) -> bool:
    return any(item.verdict.evidence is Evidence.UP for item in batch)


def _batch_size(done: Sequence[Finish]) -> int:
    """How many deliveries to claim next: as many as take LIVE_WAIT_MS at the slowest
    latency of the batch just sent (at most MAX_BATCH), so a live record never waits
    behind more than that or one slow attempt. One after a failure that points at the
    provider, and for a drain's first claim (it has not seen how quick the provider is)."""
    sent = [item for item in done if not item.verdict.released]
    if not sent:
        return 1
    if any(item.verdict.evidence.down for item in sent) and not _answered(sent):
        return 1
    slowest = max(item.answer.latency_ms for item in sent)
    return int(max(1, min(MAX_BATCH, LIVE_WAIT_MS // max(slowest, 1.0))))


def attempt(ctx: Context, claim: Claim, claimed_at: float, *, holding: bool = False) -> Finish:
    """Send one claimed delivery (counted at its claim), audit it; what to record.

    A rate-limit slot was reserved ``claim.wait_s`` after the claim (``claimed_at``): the
    send waits for what is left of that, not the whole of it again. While the fleet holds
    for a provider outage (``holding``: this is the probe), a failure that points at the
    provider is the outage's: outcome ``paused``, not counted.
    """
    settings = ctx.settings
    started = time.monotonic()
    if claim.record is None:  # the stored record no longer validates: never sent
        answer = Answer(AnswerClass.BAD_RECORD, error=claim.detail)
    else:
        try:
            if claim.wait_s > 0:
                left = claimed_at + claim.wait_s - time.monotonic()
                metrics.RATE_LIMIT_WAITS.inc()
                metrics.RATE_LIMIT_WAIT_SECONDS.inc(max(left, 0.0))
                if left > 0:
                    time.sleep(left)
            answer = ctx.client.send(claim.record)
        except Exception as exc:  # whatever fails, the attempt is audited and counted
            answer = Answer(AnswerClass.TRANSIENT, error=f"unexpected error: {type(exc).__name__}")
        metrics.ATTEMPT_SECONDS.observe(answer.latency_ms / 1000.0)
    verdict = judge(
        answer, claim.attempts, settings.retry_rules, holding=holding, suspect=claim.suspect,
        answered_meanwhile=fleet.answered_at > started,
    )  # fmt: skip
    if verdict.evidence is Evidence.UP:
        fleet.answered_at = time.monotonic()
    log_attempt(
        delivery_id=claim.delivery_id,
        attempt=claim.attempts,
        max_attempts=settings.max_attempts,
        record=claim.record,
        answer=answer,
        outcome=verdict.outcome,
        retry_in_s=verdict.retry_in_s,
        replay=claim.replay,
    )
    return Finish(claim, answer, verdict)


def _after(step: StepResult, done: Sequence[Finish], settings: Settings) -> None:
    """Log what the step did beyond the claims: the outcomes' consequences and the events."""
    for item, (verdict, first_pause) in zip(done, step.recorded, strict=False):
        if item.verdict.released:
            continue
        progress.finished()
        metrics.ATTEMPTS.labels(item.outcome).inc()
        if first_pause:
            log.error(
                "postback.paused",
                delivery_id=item.claim.delivery_id,
                api_status=item.answer.api_status,
                api_reason=item.answer.api_reason,
                error=item.answer.error,
                pause_s=settings.pause_s,
            )
        if verdict == "dead":
            dead(item.claim.delivery_id, item.claim.attempts, item.claim.record, item.last_error)
        elif verdict == "held" and item.outcome == Outcome.DEAD:
            # its audit line said dead, but the same step found the provider down
            log.warning(
                "postback.held",
                delivery_id=item.claim.delivery_id,
                attempt=item.claim.attempts,
                error=item.last_error,
                detail="not dead-lettered: the fleet holds for a provider outage",
            )
    for event in step.events:
        _event(event, settings)


def _event(event: dict[str, Any], settings: Settings) -> None:
    kind, delivery_id, detail = event["kind"], event["delivery_id"], event["detail"]
    if kind in ("outage", "outage_over"):
        _outage_event(kind, detail)
        return
    record: BackfillRecord | None = event["record"]
    if kind == "orphan":
        log.warning("postback.orphan", delivery_id=delivery_id, action=detail)
        return
    if kind == "poison":
        log_attempt(
            delivery_id=delivery_id,
            attempt=event["attempts"],
            max_attempts=settings.max_attempts,
            record=record,
            answer=None,
            outcome=Outcome.DEAD,
            retry_in_s=None,
            error=detail,
        )
    else:
        log.error("postback.corrupt", delivery_id=delivery_id, error=detail)
    dead(delivery_id, event["attempts"], record, detail)


def _outage_event(kind: str, detail: str) -> None:
    """``postback.outage`` (the fleet holds, with the evidence) or ``postback.outage_over``."""
    try:
        facts = json.loads(detail)
    except ValueError:
        facts = {}
    if not isinstance(facts, dict):
        facts = {}
    if kind == "outage":
        metrics.OUTAGE_HOLDS.inc()
        given_back = facts.get("given_back")
        given_back = given_back if isinstance(given_back, list) else []
        log.error(
            "postback.outage",
            failures=facts.get("failures"),
            deliveries=facts.get("deliveries"),
            window_s=_seconds(facts.get("window_ms")),
            last_error=facts.get("last_error"),
            probe_in_s=_seconds(facts.get("probe_ms")),
            given_back=len(given_back),
            given_back_ids=given_back[:20],
        )
    else:
        log.warning("postback.outage_over", duration_s=_seconds(facts.get("duration_ms")))


def _seconds(ms: Any) -> float | None:
    return round(ms / 1000, 3) if isinstance(ms, int | float) else None


def dead(delivery_id: str, attempts: int, record: BackfillRecord | None, last_error: str) -> None:
    """The ``postback.dead`` line (once per dead letter) and its counter."""
    metrics.DEAD_LETTERED.inc()
    log.error(
        "postback.dead",
        delivery_id=delivery_id,
        attempts=attempts,
        app_id=record.app_id if record else None,
        last_error=last_error,
    )
