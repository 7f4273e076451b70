"""The two lanes under a real worker: live records overtake a bulk backlog, and a stream of
live records cannot stop bulk."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.conftest import unique, wait_for
from tests.helpers import open_store
from worker.deliver.lanes import (
    LIVE_WAIT_MS,
    MAX_BATCH,
    RELEASED,
    batch_size,
    lanes_wanted,
    stop_lane,
)
from worker.deliver.policy import RELEASE, AnswerClass, Evidence, Outcome, Verdict
from worker.deliver.provider import Answer
from worker.deliver.steps import Claim, Finish
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess
from worker.local.stub import ProviderStub
from worker.state.store import Store

Spawn = Callable[..., WorkerProcess]


def records(count: int, tag: str) -> list[BackfillRecord]:
    return [
        BackfillRecord("lanes", "8613512345678", str(1681184764000 + i), msgid=f"{tag}-{i}")
        for i in range(count)
    ]


def sent(stub: ProviderStub, tag: str) -> list[float]:
    """When the stub accepted each record whose msgid starts with ``tag``."""
    return sorted(
        float(str(r["received_at"])) for r in stub.requests() if str(r["msgid"]).startswith(tag)
    )


def bulk_and_live(
    spawn_worker: Spawn, redis: LocalRedis, concurrency: int
) -> tuple[Store, str, str]:
    """A worker on ``redis``, a Store there, and the tags of a bulk and a live batch."""
    spawn_worker(redis.url, concurrency=concurrency)
    return open_store(redis.url), unique("bulk"), unique("live")


def test_a_live_record_overtakes_a_bulk_backlog(
    stub: ProviderStub, private_redis: LocalRedis, spawn_worker: Spawn
) -> None:
    store, bulk, live = bulk_and_live(spawn_worker, private_redis, concurrency=4)
    backlog = records(4000, bulk)
    for start in range(0, len(backlog), 1000):
        store.enqueue_many(backlog[start : start + 1000])
    wait_for(lambda: len(sent(stub, bulk)) >= 200, 30, 0.05)
    enqueued_at = time.time()
    (record,) = records(1, live)
    store.enqueue(record)  # no wake-up of its own: the drains in progress must see it
    (live_sent,) = wait_for(lambda: sent(stub, live), 30, 0.02)
    # the next claim of any drain took it: only what the drains held already went ahead
    # (counted, not timed, so a busy machine cannot fail it)
    ahead = [t for t in sent(stub, bulk) if enqueued_at <= t < live_sent]
    assert len(ahead) <= 4 * MAX_BATCH
    assert store.counts()["pending"] > 1000  # ... long before the backlog drained


def test_a_stream_of_live_records_cannot_stop_bulk(
    stub: ProviderStub, private_redis: LocalRedis, spawn_worker: Spawn
) -> None:
    store, bulk, live = bulk_and_live(spawn_worker, private_redis, concurrency=2)
    store.enqueue_many(records(300, bulk))
    wait_for(lambda: sent(stub, bulk), 30, 0.05)
    started = time.time()
    stream = records(3000, live)
    for record in stream:  # faster than two threads can send: the live lane never empties
        store.enqueue(record)
    ended = time.time()
    live_times = sent(stub, live)
    bulk_during = [t for t in sent(stub, bulk) if started <= t <= ended]
    assert store.counts()["pending"] > 0  # the live lane was still full at the end
    assert live_times
    # every tenth step of a drain looks at bulk first: bulk kept a share of the sends
    assert len(bulk_during) >= 0.03 * len([t for t in live_times if t <= ended])


def _sent(latency_ms: float, evidence: Evidence = Evidence.UP) -> Finish:
    claim = Claim("claimed", "d1", "1", 1, None)
    return Finish(claim, Answer(AnswerClass.SUCCESS, 200, "0", latency_ms=latency_ms),
                  Verdict(Outcome.DELIVERED, evidence=evidence))  # fmt: skip


def test_a_batch_is_sized_to_the_live_wait_on_each_lane() -> None:
    assert batch_size([], 4, None) == 4  # the provider's speed is unknown: one per lane
    assert batch_size([], 4, 100.0) == 32  # the process's latest latency: 8 per lane
    assert batch_size([_sent(3.0)], 1, None) == MAX_BATCH  # 800 / 3 ms, capped
    assert batch_size([_sent(3.0), _sent(50.0)], 1, None) == 16  # the slowest decides
    assert batch_size([_sent(150.0)], 10, None) == 50  # far away: 5 on each of 10 lanes
    assert batch_size([_sent(150.0)], 20, None) == 60  # 3 each: lanes of equal length
    assert batch_size([_sent(5000.0)], 3, None) == 3
    assert batch_size([_sent(3.0, Evidence.DOWN)], 8, None) == 1  # the provider may be down
    assert lanes_wanted([_sent(3.0, Evidence.DOWN)]) == 1
    assert lanes_wanted([_sent(900.0)]) == MAX_BATCH  # far away is not down
    released = Finish(Claim("claimed", "d2", "1", 1, None), RELEASED, RELEASE)
    assert batch_size([released], 2, None) == 2  # nothing was sent: nothing seen
    # every lane, sent in turn at the latency that sized it, takes at most the live wait
    for latency in (0.5, 3.0, 24.0, 26.0, 99.0, 401.0):
        per_lane = batch_size([_sent(latency)], 1, None)
        assert per_lane * latency <= LIVE_WAIT_MS
        share = LIVE_WAIT_MS / per_lane
        assert not stop_lane(_sent(latency), share)
        assert stop_lane(_sent(share + 1), share)  # slower than its share: rest go back
