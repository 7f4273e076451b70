"""A batch sent on lanes at once: how many deliveries a step claims, and how they go out.

A drain's step claims a batch; the limiter (``worker.deliver.inflight``) grants it some lanes
(requests in flight). Each lane sends its share of the batch one after the other, and
the lanes run at once: the first on the drain's own thread, the others on the process's
sending threads. So a far-away provider gets many requests in flight, and a batch still
holds as many deliveries as its lanes send in ``LIVE_WAIT_MS``: a live record waits
behind at most that (besides one slow attempt), and one Redis round trip records and
claims a batch of up to ``MAX_BATCH`` whatever the latency.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from worker.deliver.policy import RELEASE, AnswerClass, Evidence
from worker.deliver.provider import Answer
from worker.deliver.steps import Claim, Finish

# What a live record may wait behind in a lane (besides one slow attempt): an attempt
# slower than its share gives the rest of its lane back.
LIVE_WAIT_MS = 800.0
# Deliveries claimed in one step at most (step.lua takes up to 64). Bigger batches cost
# Redis less per delivery (the step's fixed cost is shared).
MAX_BATCH = 64
# The answer of a delivery released unsent (nothing was sent, nothing is logged).
RELEASED = Answer(AnswerClass.TRANSIENT, error="released unsent: the worker is stopping")

Attempt = Callable[[Claim], Finish]
# Whether the provider answered any of this process's requests just now: a failure that
# points at the provider is then no reason to give a batch back (it is the record's, or a
# connection's, and the next request will most likely be answered).
Heard = Callable[[], bool]


def _never() -> bool:
    return False


def send(
    pool: Executor,
    attempt: Attempt,
    claims: Sequence[Claim],
    lanes: int,
    stopping: threading.Event,
    heard: Heard = _never,
) -> list[Finish]:
    """Send ``claims`` on ``lanes`` lanes at once; every claim's Finish (sent or released)."""
    split = [claims[i::lanes] for i in range(max(min(lanes, len(claims)), 1))]
    futures = [
        pool.submit(contextvars.copy_context().run, send_lane, attempt, lane, stopping, heard)
        for lane in split[1:]
    ]
    done = send_lane(attempt, split[0], stopping, heard)
    for future in futures:
        done += future.result()
    return done


def send_lane(
    attempt: Attempt, claims: Sequence[Claim], stopping: threading.Event, heard: Heard = _never
) -> list[Finish]:
    """One lane's claims in turn, until the worker stops or an attempt is slow or down."""
    done: list[Finish] = []
    slow = False
    share_ms = LIVE_WAIT_MS / max(len(claims), 1)
    for claim in claims:
        if stopping.is_set() or slow:
            # claimed in this batch, never sent: given back, due at once and uncounted
            # (the worker is stopping, or the provider got slow and other threads
            # should take these rather than wait behind this one)
            done.append(Finish(claim, RELEASED, RELEASE))
            continue
        item = attempt(claim)
        done.append(item)
        slow = stop_lane(item, share_ms, done, heard())
    return done


def stop_lane(
    item: Finish, share_ms: float, lane: Sequence[Finish] = (), heard: bool = False
) -> bool:
    """Whether the rest of a lane goes back after this attempt: it took more than its
    share of LIVE_WAIT_MS, or it points at a provider outage and nothing of this lane
    (nor of this process just now: ``heard``) proved the provider up (the rest would most
    likely fail the same way)."""
    if item.answer.latency_ms > share_ms:
        return True
    return item.verdict.evidence.down and not heard and not answered(lane)


def answered(done: Sequence[Finish]) -> bool:
    """Whether the provider answered any of these attempts (it is up)."""
    return any(item.verdict.evidence is Evidence.UP for item in done)


def _down(sent: Sequence[Finish]) -> bool:
    """A failure pointed at the provider and nothing proved it up: it may be down."""
    return any(item.verdict.evidence.down for item in sent) and not answered(sent)


def lanes_wanted(done: Sequence[Finish], heard: bool = False) -> int:
    """How many lanes to ask the limiter for: one after a failure that points at the
    provider (unless it was heard from just now), else as many as a batch may hold (the
    limiter grants what it has room for)."""
    if not heard and _down(_sent(done)):
        return 1
    return MAX_BATCH


def batch_size(
    done: Sequence[Finish], lanes: int, latency_ms: float | None, heard: bool = False
) -> int:
    """How many deliveries to claim for ``lanes`` lanes: as many as each lane sends in
    LIVE_WAIT_MS at the slowest latency of the batch just sent (else the process's
    latest), the same number on each, at most MAX_BATCH in all (unless that is fewer
    than one per lane). One after a failure that points at the provider."""
    sent = _sent(done)
    if not heard and _down(sent):
        return 1
    slowest = max((item.answer.latency_ms for item in sent), default=latency_ms)
    if slowest is None:
        return lanes  # the provider's speed is unknown: one each
    # lanes of equal length: a lane done early would hold its request in flight idle
    per_lane = min(int(LIVE_WAIT_MS // max(slowest, 1.0)), MAX_BATCH // max(lanes, 1))
    return max(1, lanes * max(per_lane, 1))


def _sent(done: Sequence[Finish]) -> list[Finish]:
    return [item for item in done if not item.verdict.released]
