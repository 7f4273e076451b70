"""Blame the right thing: a provider that fails *some* requests never stalls the fleet.

A real worker, a private Redis and a stub of this module's own, scripted per case: a
provider that drops each record's first request, a flaky one (an account block at the
start, then ``-18``, HTTP 503 and success for each record in turn), a few poison records
among good ones, and random 30 % failures. Each case asserts what happens (every good
record delivered, what holds began, how many requests it took), never a rate: the rates
are in ``ops/bench_attribution.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from tests.conftest import API_KEY, API_SECRET, wait_for
from tests.helpers import events, state_counts
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess
from worker.local.stub import ProviderStub
from worker.state import keys
from worker.state.store import Store

FLEET_ENV = {  # what ``fleet`` starts its workers with
    "BACKFILL_MAX_ATTEMPTS": "6",
    "BACKFILL_BACKOFF_BASE_S": "0.2",
    "BACKFILL_BACKOFF_CAP_S": "1",
    "BACKFILL_PAUSE_S": "5",
    "BACKFILL_OUTAGE_PROBE_CAP_S": "5",
    "BACKFILL_READ_TIMEOUT_S": "0.5",
    "BACKFILL_CONNECT_TIMEOUT_S": "0.5",
}


def records(count: int, tag: str, apps: int = 1) -> list[BackfillRecord]:
    return [
        BackfillRecord(
            f"app-{tag}-{i % apps}", f"8613{i:09d}", str(1_700_000_000_000 + i), msgid=f"{tag}-{i}"
        )
        for i in range(count)
    ]


def watch_holds(store: Store, stop: threading.Event) -> list[float]:
    """Poll bf:outage in a thread; returns the list it fills with each hold's start."""
    began: list[float] = []

    def poll() -> None:
        last = None
        while not stop.is_set():
            value = store.redis.get(keys.OUTAGE)
            start = value.split("|")[0] if value else None
            if start and start != last:
                began.append(time.time())
            last = start
            time.sleep(0.01)

    threading.Thread(target=poll, daemon=True).start()
    return began


def test_a_provider_that_drops_each_first_request_never_holds_the_fleet(
    fleet: Callable[..., tuple[Store, WorkerProcess]], provider: ProviderStub
) -> None:
    store, worker = fleet()
    batch = records(1000, "first")
    provider.set_plan({str(r.msgid): ["drop"] for r in batch})
    ids = [i for i, _ in store.enqueue_many(batch, source="test")]
    wait_for(lambda: state_counts(store, ids).get("delivered") == 1000, timeout_s=120)

    assert events(worker, "postback.outage") == []
    assert store.redis.zcard(keys.DEAD) == 0
    seen = provider.seen()
    # each record's dropped first try and one more: no request burned on holds and probes
    assert len(seen) == 2000, len(seen)
    assert provider.stats()["accepted"] == 1000


def test_a_flaky_provider_delivers_everything_soon_after_a_short_account_block(
    fleet: Callable[..., tuple[Store, WorkerProcess]], provider: ProviderStub
) -> None:
    store, worker = fleet()
    batch = records(100, "flaky")
    provider.set_plan({str(r.msgid): ["status:-18", "503", "ok"] for r in batch})
    provider.set_down("status:-1")  # the account is blocked for the first 3 s
    threading.Timer(3.0, provider.set_down, args=(None,)).start()
    started = time.monotonic()
    ids = [i for i, _ in store.enqueue_many(batch, source="test")]
    wait_for(lambda: state_counts(store, ids).get("delivered") == 100, timeout_s=60)
    took = time.monotonic() - started

    assert store.redis.zcard(keys.DEAD) == 0
    # each 503 was one record's second try, answered by its third: no outage hold
    assert events(worker, "postback.outage") == []
    # the pause's probes came after 1 s, then 2 s: the block cost seconds, not a minute
    assert took < 60
    pauses = events(worker, "postback.paused")
    assert 1 <= len(pauses) <= 3, pauses


@pytest.mark.parametrize("poison", ["redirect", "slow:3", "503"])
def test_a_few_poison_records_are_dead_lettered_while_the_rest_flow(
    fleet: Callable[..., tuple[Store, WorkerProcess]], provider: ProviderStub, poison: str
) -> None:
    store, worker = fleet()
    good = records(300, f"good{poison[:4]}", apps=3)
    bad = records(3, f"bad{poison[:4]}")
    provider.set_plan({str(r.msgid): [poison] * 50 for r in bad})
    stop = threading.Event()
    holds = watch_holds(store, stop)
    bad_ids = [i for i, _ in store.enqueue_many(bad, source="test")]
    good_ids = [i for i, _ in store.enqueue_many(good, source="test")]
    try:
        wait_for(lambda: state_counts(store, good_ids).get("delivered") == 300, timeout_s=90)
        wait_for(lambda: state_counts(store, bad_ids).get("dead") == 3, timeout_s=90)
    finally:
        stop.set()

    # each poison record spent its own attempts (counted like any failure) and died alone
    for delivery_id in bad_ids:
        assert int(store.redis.hget(keys.delivery(delivery_id), "c") or 0) == 6
    assert store.redis.zcard(keys.DEAD) == 3
    assert not store.redis.exists(keys.PAUSED)
    assert not store.redis.exists(keys.OUTAGE)
    # a redirect paused the fleet at most once per poison record before it was suspected
    assert len(events(worker, "postback.paused")) <= 3
    assert len(holds) <= 1, holds


def test_random_failures_neither_hold_nor_lose_anything(
    fleet: Callable[..., tuple[Store, WorkerProcess]], private_redis: LocalRedis
) -> None:
    with ProviderStub(API_KEY, API_SECRET, fault_rate=0.3, faults=("503",), seed=7) as flaky:
        store, worker = fleet(BACKFILL_BASE_URL=flaky.url, BACKFILL_MAX_ATTEMPTS="12")
        stop = threading.Event()
        holds = watch_holds(store, stop)
        ids = [i for i, _ in store.enqueue_many(records(600, "random", apps=4), source="test")]
        try:
            wait_for(lambda: state_counts(store, ids).get("delivered") == 600, timeout_s=120)
        finally:
            stop.set()
        assert store.redis.zcard(keys.DEAD) == 0
        # 8 failures in a row, each retry failing too, with no success between: rare
        assert len(holds) <= 2, holds
        assert len(events(worker, "postback.outage")) == len(holds)
