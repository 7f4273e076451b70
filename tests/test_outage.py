"""Provider outages: the fleet holds instead of burning attempts, and ramps up after.

A real worker, a private Redis and a stub of this module's own that is taken down
(every request answered 503, or its connection cut) for longer than the whole retry
window of the worker's settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from tests.conftest import wait_for
from tests.helpers import events, state_counts
from worker.deliver.policy import Evidence, outage_evidence, retry_window
from worker.enqueue.record import BackfillRecord
from worker.local.processes import WorkerProcess
from worker.local.stub import ProviderStub
from worker.state import keys
from worker.state.store import Store

# A short retry window: 3 attempts, 0.2 s then 0.4 s at most between them (0.6 s in all).
FLEET_ENV = {  # what ``fleet`` starts its workers with
    "BACKFILL_MAX_ATTEMPTS": "3",
    "BACKFILL_BACKOFF_BASE_S": "0.2",
    "BACKFILL_BACKOFF_CAP_S": "1",
    "BACKFILL_OUTAGE_PROBE_CAP_S": "2",
}


def records(count: int, tag: str) -> list[BackfillRecord]:
    return [
        BackfillRecord(f"app-{tag}", f"8613{i:09d}", str(1_700_000_000_000 + i), msgid=f"{tag}-{i}")
        for i in range(count)
    ]


def test_what_points_at_the_provider() -> None:
    assert outage_evidence(None, None, "connection error: ConnectionError") is Evidence.DOWN
    assert outage_evidence(None, None, "timeout: ReadTimeout") is Evidence.DOWN
    assert outage_evidence(None, None, "tls error: certificate has expired") is Evidence.DOWN
    assert outage_evidence(None, None, "deadline exceeded: no answer in 6 s") is Evidence.DOWN
    assert outage_evidence(503, None, "HTTP 503") is Evidence.DOWN
    assert outage_evidence(429, None, "HTTP 429") is Evidence.DOWN
    # the provider answered: whatever the code, it is up
    assert outage_evidence(200, "-18", None) is Evidence.UP
    assert outage_evidence(200, "0", None) is Evidence.UP
    assert outage_evidence(400, None, "HTTP 400") is Evidence.UP
    # neither: a redirect pauses on its own; our own bug or a garbled body proves nothing
    assert outage_evidence(302, None, "HTTP 302 redirect") is Evidence.NONE
    assert outage_evidence(200, None, "body is not JSON: 'x'") is Evidence.NONE
    assert outage_evidence(None, None, "unexpected error: KeyError") is Evidence.NONE


@pytest.mark.parametrize("down", ["503", "drop"])
def test_an_outage_longer_than_the_retry_window_dead_letters_nothing(
    fleet: Callable[..., tuple[Store, WorkerProcess]], provider: ProviderStub, down: str
) -> None:
    store, worker = fleet()
    window = retry_window(3, 0.2, 1)
    outage_s = max(10 * window, 6.0)
    provider.set_down(down)
    went_down = time.time()
    ids = [i for i, _ in store.enqueue_many(records(300, f"out{down}"), source="test")]
    wait_for(lambda: store.redis.exists(keys.OUTAGE), timeout_s=20)
    assert state_counts(store, ids).get("dead", 0) == 0
    time.sleep(max(went_down + outage_s - time.time(), 0))
    provider.set_down(None)
    came_back = time.time()
    wait_for(lambda: state_counts(store, ids).get("delivered") == 300, timeout_s=120)

    assert state_counts(store, ids) == {"delivered": 300}
    assert store.redis.zcard(keys.DEAD) == 0
    # the step script counted each delivery once, in its 10 s span (the console's figures)
    counters = store.redis.mget(list(store.redis.scan_iter(keys.delivered_in("*"))))
    assert sum(int(c) for c in counters) == 300
    seen = provider.seen()
    during = [s for s in seen if float(s["at"]) < came_back]
    assert len(during) < 300, f"{len(during)} requests during the outage, for 300 records"
    # a smooth recovery: the ramp starts at 5 sends a second, doubling every 2 s
    first = [s for s in seen if came_back <= float(s["at"]) < came_back + 1.0]
    assert len(first) <= 15, f"{len(first)} sends in the first second after recovery"
    (outage,) = wait_for(lambda: events(worker, "postback.outage"))
    assert outage["level"] == "error"
    assert outage["failures"] >= 8
    assert outage["deliveries"] >= 3
    assert ("503" if down == "503" else "connection") in outage["last_error"]
    (over,) = wait_for(lambda: events(worker, "postback.outage_over"))
    assert over["duration_s"] >= outage_s - 1
    assert not store.redis.exists(keys.OUTAGE)
    assert not store.redis.exists(keys.PAUSED)
    # the probes' failures are audited as paused (not counted); nothing said dead
    lines = events(worker, "postback.attempt")
    assert {line["outcome"] for line in lines} <= {"retry", "paused", "delivered"}


def test_per_record_failures_mixed_with_successes_do_not_hold(
    fleet: Callable[..., tuple[Store, WorkerProcess]], provider: ProviderStub
) -> None:
    store, worker = fleet(BACKFILL_MAX_ATTEMPTS="8")
    batch = records(120, "mixed")
    # every other record fails twice with a transient provider code, or with a 503 once
    provider.set_plan({
        str(r.msgid): (["status:-18", "status:-12"] if i % 4 == 0 else ["503"])
        for i, r in enumerate(batch) if i % 2 == 0
    })  # fmt: skip
    ids = [i for i, _ in store.enqueue_many(batch, source="test")]
    held = False
    deadline = time.monotonic() + 60
    while state_counts(store, ids).get("delivered") != 120 and time.monotonic() < deadline:
        held = held or bool(store.redis.exists(keys.OUTAGE))
        time.sleep(0.02)
    assert state_counts(store, ids) == {"delivered": 120}
    assert not held
    assert events(worker, "postback.outage") == []


def test_a_hold_survives_a_worker_restart_and_probes_one_at_a_time(
    fleet: Callable[..., tuple[Store, WorkerProcess]], provider: ProviderStub
) -> None:
    store, worker = fleet()
    provider.set_down("503")
    ids = [i for i, _ in store.enqueue_many(records(40, "restart"), source="test")]
    wait_for(lambda: store.redis.exists(keys.OUTAGE), timeout_s=20)
    worker.kill()
    worker.start()
    worker.wait_ready()
    # a probe the killed worker had claimed holds the next one off until its lease ends
    # (12 s here): then the restarted worker probes
    before = len(provider.seen())
    wait_for(lambda: len(provider.seen()) > before, timeout_s=30)
    first = len(provider.seen())
    time.sleep(5)
    probes = provider.seen()[first - 1 :]
    # the probe waits 1, 2, 2 s (cap 2 s): a handful of single requests, never a burst
    assert 1 <= len(probes) <= 6, probes
    assert store.redis.exists(keys.OUTAGE)
    # `health` says the fleet holds and why, and stays healthy (a hold is no worker's fault)
    health = subprocess.run(
        [sys.executable, "-m", "worker", "health", "--timeout", "5"],
        env={**os.environ, **worker.env}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert health.returncode == 0, health.stdout + health.stderr
    assert "HOLDING for a provider outage" in health.stdout
    assert "HTTP 503" in health.stdout
    provider.set_down(None)
    wait_for(lambda: state_counts(store, ids).get("delivered") == 40, timeout_s=60)
    assert store.redis.zcard(keys.DEAD) == 0
