"""A drain: what one woken ``backfill.deliver`` task does.

It claims due deliveries from the schedule itself, a batch at a time, live lane first,
and sends a batch's requests at once (on the process's sending threads), until none is
due, a budget is spent, or the worker is stopping. How many requests one process has in
flight is sized by ``worker.deliver.inflight`` from the provider's latency. Each step is one
Redis round trip: record the outcomes of the batch just sent and claim the next
(``worker/state/lua/step.lua``). So Celery's per-message cost (fetch, unacked bookkeeping,
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

from worker.deliver import lanes as lanes_module
from worker.deliver.inflight import Limiter, limiter
from worker.deliver.lanes import LIVE_WAIT_MS, batch_size, lanes_wanted
from worker.deliver.policy import AnswerClass, Evidence, Outcome, judge
from worker.deliver.provider import Answer, ProviderClient
from worker.deliver.steps import Claim, Finish, StepResult
from worker.enqueue.record import BackfillRecord
from worker.operate import metrics
from worker.operate.audit import log_attempt
from worker.operate.heartbeat import progress
from worker.settings import DRAIN_BUDGET_S, Settings
from worker.state.store import Store

log = structlog.get_logger("worker.drain")
# A drain returns after this many attempts or seconds, so the task's message is acked
# and the thread takes its turn in Celery's queue again.
BUDGET_ATTEMPTS = 500
BUDGET_S = DRAIN_BUDGET_S
# Every tenth step of a drain looks at the bulk lane first: live cannot starve bulk.
BULK_EVERY = 10
# An attempt waits at most this long for a rate-limit slot; beyond, the drain ends.
MAX_RATE_WAIT_S = 5.0


# A provider that answered this process this recently is up: a failure that points at it
# is one record's or one connection's, not a reason to give a batch back.
HEARD_S = 1.0


class Fleet:
    """This process's drains: how many run, whether to stop, and until when to hold off."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0
        self.stopping = threading.Event()
        self.hold_until = 0.0  # monotonic: a drain met the rate limit; no wake-ups until then
        self.answered_at = 0.0  # monotonic: when the provider last answered one of ours
        self.accepted_at = 0.0  # monotonic: when it last accepted one (delivered, duplicate)

    def heard(self) -> bool:
        """Whether the provider answered one of this process's requests within HEARD_S."""
        return time.monotonic() - self.answered_at < HEARD_S

    def enter(self) -> None:
        """A drain starts."""
        with self._lock:
            self.active += 1

    def leave(self) -> None:
        """A drain ends."""
        with self._lock:
            self.active -= 1


fleet = Fleet()


@dataclass(frozen=True, slots=True)
class Context:
    """What a drain needs: settings, the store, the provider client, the Celery task id."""

    settings: Settings
    store: Store
    client: ProviderClient
    task_id: str | None
    limiter: Limiter = limiter


def drain(ctx: Context) -> int:
    """Claim and attempt due deliveries until none is due or the budget is spent."""
    fleet.enter()
    try:
        return _drain(ctx)
    finally:
        fleet.leave()


def _drain(ctx: Context) -> int:
    until = time.monotonic() + BUDGET_S
    done: list[Finish] = []
    attempts = steps = 0
    while True:
        stop = fleet.stopping.is_set() or attempts >= BUDGET_ATTEMPTS or time.monotonic() > until
        want = 0 if stop else lanes_wanted(done, fleet.heard())
        lanes = ctx.limiter.take(want) if want else 0
        if want and not lanes:
            # every request this process may have in flight is taken: record what was
            # sent, then wait for room (the drain ends when none comes in time)
            _step(ctx, done, 0, steps)
            done = []
            wait_s = max(until - time.monotonic(), 0.0)
            lanes = ctx.limiter.take(want, wait_s=wait_s, stop=fleet.stopping)
            if not lanes:
                _step(ctx, done, 0, steps)
                return attempts
        size = batch_size(done, lanes, ctx.limiter.latency_ms, fleet.heard()) if lanes else 0
        step = _step(ctx, done, size, steps)
        claimed_at = time.monotonic()
        steps += 1
        used = min(lanes, len(step.claims))
        ctx.limiter.give(lanes - used)
        if not step.claims and step.status != "again":
            return attempts
        try:
            done = send_batch(ctx, step.claims, claimed_at, used, holding=step.outage)
        finally:
            ctx.limiter.give(used)
        attempts += sum(1 for item in done if not item.verdict.released)


def _step(ctx: Context, done: list[Finish], claim: int, steps: int) -> StepResult:
    """Record ``done`` and claim up to ``claim`` deliveries (one round trip); log the rest."""
    settings = ctx.settings
    step = ctx.store.step(
        done,
        claim=claim,
        prefer_bulk=steps % BULK_EVERY == BULK_EVERY - 1,
        lease_s=settings.attempt_lease_s,
        max_attempts=settings.max_attempts,
        rate_per_s=settings.rate_limit,
        burst=settings.rate_burst,
        max_wait_s=MAX_RATE_WAIT_S,
        # a lane's i-th starts by i shares of the wait; the batch's lanes start at once
        gap_s=2 * LIVE_WAIT_MS / max(claim, 1) / 1000,
    )
    _after(step, done, settings)
    if step.status == "throttled" and step.resume_in_s:
        fleet.hold_until = time.monotonic() + step.resume_in_s
    return step


def send_batch(
    ctx: Context, claims: Sequence[Claim], claimed_at: float, lanes: int, *, holding: bool = False
) -> list[Finish]:
    """Attempt a batch's claims on ``lanes`` lanes at once (``worker.deliver.lanes``)."""

    def one(claim: Claim) -> Finish:
        item = attempt(ctx, claim, claimed_at, holding=holding)
        if claim.record is not None:
            ctx.limiter.observe(item.answer.latency_ms, load_evidence(item))
        return item

    return lanes_module.send(ctx.limiter.pool(), one, claims, lanes, fleet.stopping, fleet.heard)


def load_evidence(item: Finish) -> Evidence:
    """What an attempt tells the in-flight limiter: a timeout says the provider struggles
    under our load; a fast refusal (a reset connection, a quick 503) says nothing of load,
    and halving the requests in flight for it would only slow the records it spares."""
    evidence = item.verdict.evidence
    if evidence.down and not (item.answer.error or "").startswith(("timeout", "deadline")):
        return Evidence.NONE
    return evidence


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
        accepted_meanwhile=fleet.accepted_at > started,
    )  # fmt: skip
    if verdict.evidence is Evidence.UP:
        fleet.answered_at = time.monotonic()
    if verdict.outcome in (Outcome.DELIVERED, Outcome.DUPLICATE):
        fleet.accepted_at = time.monotonic()
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
