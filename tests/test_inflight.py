"""Requests in flight per process (``worker.deliver.inflight``): grown for a far-away provider,
shrunk for one that slows down under load, halved by failures that point at it; and real
drains against a stub whose latency rises with the requests in flight."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import API_KEY, API_SECRET, unique, wait_for
from worker.deliver.drain import Context, drain, fleet
from worker.deliver.inflight import FLOOR, TOLERANCE, Limiter, Window
from worker.deliver.policy import Evidence
from worker.deliver.provider import ProviderClient
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis
from worker.local.stub import ProviderStub
from worker.runtime import build_store
from worker.settings import load_settings
from worker.state.connection import connect


def fill(limiter: Limiter, latency_ms: float, evidence: Evidence = Evidence.UP) -> Window:
    """Hold the whole limit, as busy drains would, and finish one window at this latency."""
    windows = len(limiter.trace)
    while len(limiter.trace) == windows:
        held = 0
        while limiter.free:  # a batch takes half the limit at most: two drains
            held += limiter.take(limiter.free)
        for _ in range(max(held, 1)):
            limiter.observe(latency_ms, evidence)
        limiter.give(held)
    return limiter.trace[-1]


def test_a_far_away_provider_gets_as_many_requests_in_flight_as_the_cap() -> None:
    limiter = Limiter(cap=200)
    assert limiter.limit == FLOOR
    for _ in range(60):
        fill(limiter, 150.0)  # far away, and as quick with 200 in flight as with 8
    assert limiter.limit == 200


def test_a_provider_slowing_down_under_load_gets_fewer_requests_in_flight() -> None:
    limiter = Limiter(cap=200)
    for _ in range(60):
        fill(limiter, 150.0)
    seen = []
    for _ in range(30):  # each request in flight adds 10 ms: it is struggling
        before = limiter.limit
        window = fill(limiter, 150.0 + 10.0 * limiter.limit)
        seen.append((before, window))
    for before, window in seen:
        if window.median_ms > TOLERANCE * window.baseline_ms:
            # latency above the tolerance: fewer in flight, down to the floor
            assert window.limit < before or window.limit == before == FLOOR
    assert limiter.limit == FLOOR  # 150 + 10 x 16 ms is still past 1.5 x 150 ms
    # latency alone never takes it below FLOOR (what a process kept in flight before)


def test_failures_that_point_at_the_provider_halve_the_limit() -> None:
    limiter = Limiter(cap=64)
    for _ in range(40):
        fill(limiter, 20.0)
    assert limiter.limit == 64
    fill(limiter, 20.0, Evidence.DOWN)
    assert limiter.limit == 32
    for _ in range(10):
        fill(limiter, 5000.0, Evidence.DOWN)  # timeouts
    assert limiter.limit == 1  # never below one: the next answer is still heard


def test_fast_failures_of_records_fill_the_window_and_let_the_limit_grow() -> None:
    """A provider that drops each record's first request (its retry succeeds): most
    attempts say nothing of load (a reset connection) or are a record's own; they still
    count, so the limit grows as with answers, on the baseline the answers set."""
    limiter = Limiter(cap=200)
    fill(limiter, 50.0)  # one window of answers: the baseline
    for _ in range(30):  # 30 rounds of the whole limit in flight: about a window each
        held = 0
        while limiter.free:
            held += limiter.take(limiter.free)
        for i in range(max(held, 1)):  # one answer in ten, the rest dropped first tries
            limiter.observe(50.0, Evidence.UP if i % 10 == 0 else Evidence.NONE)
        limiter.give(held)
    assert limiter.limit == 200
    assert all(window.dropped == 0 for window in limiter.trace)


def test_take_never_grants_past_the_limit_and_waits_for_room() -> None:
    limiter = Limiter(cap=4)
    assert limiter.take(100) == 2  # half the limit per batch: two batches overlap
    assert limiter.take(100) == 2
    assert limiter.take(1) == 0  # full
    threading.Timer(0.05, limiter.give, args=(1,)).start()
    assert limiter.take(3, wait_s=10) == 1
    assert limiter.held == 4


@pytest.fixture
def slow_stub() -> Iterator[ProviderStub]:
    with ProviderStub(API_KEY, API_SECRET, latency_s=0.3) as stub:
        yield stub


def test_drains_send_less_at_once_to_a_provider_that_slows_down_under_load(
    private_redis: LocalRedis, slow_stub: ProviderStub
) -> None:
    settings = load_settings(
        redis_url=private_redis.url, base_url=slow_stub.url, api_key=API_KEY,
        api_secret=API_SECRET, keep_delivered_s=0, read_timeout_s=10,
    )  # fmt: skip
    store = build_store(settings, connect(private_redis.url))
    limiter = Limiter(cap=40)
    ctx = Context(
        settings, store, ProviderClient(slow_stub.url, API_KEY, API_SECRET), None, limiter
    )
    tag = unique("load")
    rows = [
        BackfillRecord("load", "8613512345678", "1681184764000", msgid=f"{tag}-{i}")
        for i in range(3000)
    ]
    store.enqueue_many(rows)
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            drain(ctx)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        # 300 ms away, whatever the load: the limit grows to the cap, and the drains use it
        # (the window that grew it was used to 3/4 of 36 at least: 27; then up to 40). The
        # waits are far from the few seconds this takes; under a CPU hog on each core the
        # windows' medians stayed within 310-340 ms, the shrinking tolerance being 450 ms
        wait_for(lambda: limiter.limit >= 40, 60, 0.05)
        wait_for(lambda: max(w.peak for w in limiter.trace) >= 30, 60, 0.05)
        grown = len(limiter.trace)
        slow_stub.set_latency(0.3, 0.05)  # now each request in flight adds 50 ms
        wait_for(lambda: limiter.limit <= FLOOR, 60, 0.05)
        after = list(limiter.trace)[grown:]
        # latency rose with the requests in flight, and the limit fell as it rose
        assert max(w.median_ms for w in after) > TOLERANCE * after[0].baseline_ms
        for previous, window in itertools.pairwise(after):
            if window.median_ms > TOLERANCE * window.baseline_ms and not window.dropped:
                assert window.limit < previous.limit or window.limit == FLOOR
        wait_for(lambda: max(w.peak for w in list(limiter.trace)[-2:]) <= FLOOR, 60, 0.05)
    finally:
        done.set()
        fleet.stopping.set()
        for thread in threads:
            thread.join(30)
        fleet.stopping.clear()


def test_the_cap_is_backfill_concurrency_else_the_memory_bound() -> None:
    auto = load_settings()
    assert auto.concurrency is None
    assert auto.max_in_flight == 256
    assert auto.drains == 8
    capped = load_settings(concurrency=4)
    assert (capped.max_in_flight, capped.drains) == (4, 4)  # never more at once than the cap
    assert load_settings(concurrency=" ").max_in_flight == 256  # blank: unset
