"""``worker.deliver.waker.Waker``: how many wake-ups one tick publishes, and the heartbeat it
writes.

A real ``Store`` on a Redis of this module's own; ``publish`` records the counts instead of
writing messages (``test_messages.py`` checks those). ``worker.deliver.drain.fleet`` (this
process's drains) is set by the tests and put back after each.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from worker.deliver.drain import fleet
from worker.deliver.waker import Waker
from worker.enqueue.record import BackfillRecord
from worker.local.processes import free_port
from worker.operate.heartbeat import BEAT_TTL_S, progress
from worker.state import keys
from worker.state.connection import connect
from worker.state.store import Store

QUEUE = "backfill-waker"
CONCURRENCY = 4


@pytest.fixture
def store_options() -> dict[str, Any]:
    """``store`` keeps no delivered record and pauses 5 s."""
    return {"keep_delivered_s": 0, "pause_s": 5}


@pytest.fixture(autouse=True)
def quiet_fleet() -> Iterator[None]:
    """No drain running and no hold, as in an idle worker; the module's globals put back."""
    saved = fleet.active, fleet.hold_until, progress.due_since
    fleet.active, fleet.hold_until = 0, 0.0
    yield
    fleet.active, fleet.hold_until, progress.due_since = saved


class Published(list[int]):
    """The ``publish`` callable: the count of each call."""

    def __call__(self, count: int) -> None:
        self.append(count)


def make_waker(store: Store, published: Published, node: str = "node-1") -> Waker:
    return Waker(store, published, queue=QUEUE, tick_s=0.01, concurrency=CONCURRENCY, node=node)


def due(store: Store, count: int, *, later: int = 0) -> None:
    """``count`` deliveries due now (half live, half bulk), and ``later`` due in an hour."""
    records = [
        BackfillRecord("app-w", "8613512345678", "1681184764000", msgid=f"m-{i}")
        for i in range(count + later)
    ]
    for record in records[: count // 2]:
        store.enqueue(record)
    store.enqueue_many(records[count // 2 : count])
    if later:
        store.enqueue_many(records[count:], due_in_s=3600)


@pytest.mark.parametrize(
    ("due_now", "depth", "active", "wanted"),
    [
        (0, 0, 0, 0),  # nothing due: nothing to wake for
        (3, 0, 0, 3),  # fewer due than idle threads: one each
        (10, 0, 0, CONCURRENCY),  # more due: every idle thread
        (10, 1, 0, CONCURRENCY - 1),  # a wake-up already waits in the queue
        (10, CONCURRENCY, 0, 0),  # enough wait already
        (2, 3, 0, 0),  # more waiting than due
        (10, 0, 3, 1),  # three threads drain already
        (10, 0, CONCURRENCY, 0),  # all of them do
    ],
)
def test_a_tick_publishes_min_of_due_and_idle_less_what_waits(
    store: Store, due_now: int, depth: int, active: int, wanted: int
) -> None:
    due(store, due_now, later=5)  # deliveries due later never count
    if depth:
        store.redis.lpush(QUEUE, *["w"] * depth)
    fleet.active = active
    published = Published()
    assert make_waker(store, published).wake() == wanted
    assert published == ([wanted] if wanted else [])  # never a call for none


def test_no_wake_up_while_the_fleet_is_paused(store: Store) -> None:
    due(store, 10)
    store.redis.set(keys.PAUSED, "status -13: blocked", px=5000)
    published = Published()
    assert make_waker(store, published).wake() == 0
    store.redis.delete(keys.PAUSED)
    assert make_waker(store, published).wake() == CONCURRENCY
    assert published == [CONCURRENCY]


def test_a_pause_set_by_hand_without_a_ttl_is_given_one_and_holds(store: Store) -> None:
    due(store, 10)
    store.redis.set(keys.PAUSED, "by hand")
    published = Published()
    assert make_waker(store, published).wake() == 0
    assert 0 < store.redis.pttl(keys.PAUSED) <= 5000  # the store's pause_s
    assert published == []


def test_no_wake_up_while_a_drain_holds_for_the_rate_limit(store: Store) -> None:
    due(store, 10)
    published = Published()
    fleet.hold_until = time.monotonic() + 60
    assert make_waker(store, published).wake() == 0
    fleet.hold_until = time.monotonic() - 0.001  # the hold is over
    assert make_waker(store, published).wake() == CONCURRENCY
    assert published == [CONCURRENCY]


def test_while_probing_one_wake_up_at_most_and_none_while_a_drain_runs(store: Store) -> None:
    due(store, 10)
    store.redis.set(keys.PROBE, "1")
    published = Published()
    waker = make_waker(store, published)
    assert waker.wake() == 1
    store.redis.lpush(QUEUE, "w")
    assert waker.wake() == 0  # the probe's wake-up waits in the queue already
    store.redis.delete(QUEUE)
    fleet.active = 1
    assert waker.wake() == 0  # the probe may be under way
    assert published == [1]


def test_the_tick_notes_since_when_work_has_waited(store: Store) -> None:
    progress.due_since = None
    waker = make_waker(store, Published())
    waker.wake()
    assert progress.due_since is None  # nothing due
    due(store, 1)
    before = time.time()
    waker.wake()
    since = progress.due_since
    assert since is not None
    assert before <= since <= time.time()
    waker.wake()
    assert progress.due_since == since  # still waiting since then
    store.redis.set(keys.PAUSED, "blocked", px=5000)
    waker.wake()
    assert progress.due_since is None  # paused: not this worker's to do


def test_the_heartbeat_is_a_hash_with_a_ttl_written_every_few_seconds(store: Store) -> None:
    waker = make_waker(store, Published(), node="celery@host-1")
    waker._beat()
    beat = store.redis.hgetall(keys.worker("celery@host-1"))
    assert set(beat) == {
        "pid", "started_at", "last_finish", "due_since", "beat_at", "clock_offset_s",
        "clock_corrected", "provider_clock_offset_s",
    }  # fmt: skip
    assert 0 < store.redis.ttl(keys.worker("celery@host-1")) <= BEAT_TTL_S
    assert store.beats() == {"celery@host-1": beat}
    assert store.beats("celery@host-1") == {"celery@host-1": beat}
    assert store.beats("celery@other") == {}
    store.redis.delete(keys.worker("celery@host-1"))
    waker._beat()  # within BEAT_EVERY_S of the last: not written again
    assert store.beats() == {}


def test_the_thread_wakes_beats_and_rides_out_a_redis_that_is_down(store: Store) -> None:
    due(store, 2)
    published = Published()
    waker = make_waker(store, published)
    waker.start()
    try:
        deadline = time.monotonic() + 5
        while not (published and store.beats()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert published
        assert published[0] == 2
        assert set(store.beats()) == {"node-1"}
    finally:
        waker.stop()
    assert not waker.is_alive()

    down = Store(connect(f"redis://127.0.0.1:{free_port()}/0", retries=0), dedupe_ttl_s=3600)
    waker = make_waker(down, published)
    waker.start()
    time.sleep(0.3)  # a few failed ticks, backing off
    assert waker.is_alive()
    waker.stop()
    assert not waker.is_alive()
    down.redis.close()
