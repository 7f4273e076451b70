"""The lookup index's buckets (``worker/state/lua/index.lua``): an app's entries in small sorted
sets that Redis keeps compact, found, paged, swept and purged across bucket boundaries,
and an index kept before buckets moved into them; against a real Redis."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.helpers import open_store, step_through
from worker.deliver.policy import AnswerClass, Outcome, Verdict
from worker.deliver.provider import Answer
from worker.deliver.steps import Finish
from worker.enqueue.record import BackfillRecord
from worker.state import keys, reads
from worker.state.delivery import delivery_id as id_of
from worker.state.lookup import find
from worker.state.store import Store

TIME = "1681184764000"
BUCKET = 128  # the most one bucket holds (lua/index.lua), Redis's compact encoding's limit


@pytest.fixture
def store_options() -> dict[str, Any]:
    """``store`` compacts a delivered record at once (only its marker stays)."""
    return {"keep_delivered_s": 0}


def rec(msgid: str | None, n: int, app: str = "app-a") -> BackfillRecord:
    return BackfillRecord(app, f"8613{n:09d}", TIME, msgid=msgid)


def settle(store: Store, outcome: Outcome) -> list[str]:
    """Claim every due delivery and record ``outcome`` for it, as a worker does."""
    answer = Answer(AnswerClass.SUCCESS, http_status=200, api_status="0")
    if outcome == Outcome.DEAD:
        answer = Answer(AnswerClass.BAD_RECORD, http_status=200, api_status="-9",
                        api_reason="invalid number", error="status -9: invalid number")  # fmt: skip
    verdict = Verdict(outcome, None)
    return step_through(store, lambda c: Finish(c, answer, verdict), claim=50, max_attempts=16)


def buckets(store: Store, app: str) -> dict[str, list[str]]:
    """Each bucket of an app's index by its bound, with its entries (read raw)."""
    bounds = store.redis.zrange(keys.index_directory(app), 0, -1)
    return {b: store.redis.zrange(keys.index_bucket(app, b), 0, -1) for b in bounds}  # type: ignore[misc]


def all_entries(store: Store, app: str) -> list[str]:
    return reads.index_entries(store.redis, app, "-", "+", 10**6)


def every_page(store: Store, msgid: str | None, app: str | None, limit: int) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        rows, cursor = find(store.redis, msgid, app, limit=limit, cursor=cursor)
        ids += [row["delivery_id"] for row in rows]
        if cursor is None:
            return ids


def test_entries_go_into_small_compact_buckets_in_order(store: Store) -> None:
    shuffled = random.Random(7)
    records = [rec(f"m-{shuffled.randrange(10**6):06d}", i) for i in range(1500)]
    shuffled.shuffle(records)
    for start in range(0, 1500, 100):  # in the order a producer sends them, not by name
        store.enqueue_many(records[start : start + 100])
    found = buckets(store, "app-a")
    assert len(found) >= 1500 // BUCKET
    bounds = sorted(found)
    for bound, after in zip(bounds, [*bounds[1:], None], strict=True):
        members = found[bound]
        assert 1 <= len(members) <= BUCKET
        assert store.redis.object("encoding", keys.index_bucket("app-a", bound)) == "listpack"
        # each bucket holds the entries from its bound up to the next bucket's
        assert all(m >= bound and (after is None or m < after) for m in members)
    expected = sorted(f"{r.msgid}\0{id_of(r)}" for r in records)
    assert all_entries(store, "app-a") == expected
    assert every_page(store, None, "app-a", 37) == [e.partition("\0")[2] for e in expected]


def test_a_msgid_whose_deliveries_span_buckets_is_found_in_full(store: Store) -> None:
    many = [rec("m-many", i) for i in range(300)]  # one msgid, 300 numbers: 3 buckets or more
    others = [rec(f"m-{i:04d}", i) for i in range(400)] + [rec(f"z-{i}", i) for i in range(50)]
    store.enqueue_many(others[:200] + many + others[200:])
    assert len(buckets(store, "app-a")) >= 5
    expected = sorted(id_of(r) for r in many)
    assert every_page(store, "m-many", "app-a", 50) == expected
    assert every_page(store, "m-many", None, 1000) == expected  # without its app: the same
    store.enqueue(rec("m-many", 0, app="app-b"))
    assert len(every_page(store, "m-many", None, 7)) == 301
    assert every_page(store, "m-0399", None, 10) == [id_of(others[399])]
    assert every_page(store, "absent", None, 10) == []


def test_a_purge_empties_buckets_and_leaves_no_index_key(store: Store) -> None:
    store.enqueue_many([rec(f"m-{i:04d}" if i % 5 else None, i) for i in range(700)])
    ids = settle(store, Outcome.DEAD)
    assert len(buckets(store, "app-a")) >= 5
    store.purge(ids[::2])
    assert sorted(e.partition("\0")[2] for e in all_entries(store, "app-a")) == sorted(ids[1::2])
    store.purge(ids[1::2])
    left = list(store.redis.scan_iter(f"{keys.PREFIX}x*"))
    assert left == []


def test_the_sweep_walks_every_bucket_and_drops_the_emptied_ones(store: Store) -> None:
    store.enqueue_many([rec(f"old-{i:04d}", i) for i in range(900)])
    delivered = settle(store, Outcome.DELIVERED)
    store.redis.delete(*[keys.marker(i) for i in delivered])  # their dedupe window is over
    assert len(buckets(store, "app-a")) >= 7
    for round_ in range(40):  # 10 records a run: 20 entries checked each, 16 in turn
        store.enqueue_many([rec(f"new-{round_}-{i}", i) for i in range(10)], due_in_s=3600)
    assert {e.partition("\0")[0][:4] for e in all_entries(store, "app-a")} == {"new-"}
    assert all(members for members in buckets(store, "app-a").values())
    assert len(all_entries(store, "app-a")) == 400


def test_an_index_kept_before_buckets_is_moved_into_them(store: Store) -> None:
    kept = [rec(f"m-{i:03d}", i) for i in range(300)]
    store.enqueue_many(kept, due_in_s=3600)
    # what an earlier version wrote: one sorted set, with an entry whose delivery is gone
    legacy = {f"{r.msgid}\0{id_of(r)}": 0 for r in kept} | {"m-gone\0aaaaaaaaaaaaaaaa": 0}
    store.redis.delete(*[keys.index_bucket("app-a", b) for b in buckets(store, "app-a")])
    store.redis.delete(keys.index_directory("app-a"))
    store.redis.zadd(keys.legacy_index("app-a"), legacy)
    for i in range(40):  # the other apps' enqueues sweep this one in turn, 16 entries each
        store.enqueue(rec(f"b-{i}", i, app="app-b"), due_in_s=3600)
        store.enqueue(rec(f"c-{i}", i, app="app-c"), due_in_s=3600)
    assert not store.redis.exists(keys.legacy_index("app-a"))
    in_order = sorted(kept, key=lambda r: f"{r.msgid}\0{id_of(r)}")
    assert every_page(store, None, "app-a", 100) == [id_of(r) for r in in_order]
    assert every_page(store, "m-gone", None, 10) == []


def test_a_bucket_of_the_wrong_type_never_stops_an_enqueue(store: Store) -> None:
    store.enqueue_many([rec(f"m-{i:03d}", i) for i in range(10)])
    store.redis.delete(keys.index_bucket("app-a", ""))
    store.redis.set(keys.index_bucket("app-a", ""), "not a sorted set")
    delivery_id, created = store.enqueue(rec("m-new", 99))
    assert created
    assert store.status(delivery_id)
    assert every_page(store, "m-new", "app-a", 10) == []  # not indexed: left alone
    store.redis.delete(keys.index_bucket("app-a", ""))
    store.enqueue(rec("m-newer", 98))
    assert every_page(store, "m-newer", "app-a", 10) == [id_of(rec("m-newer", 98))]


def test_the_newest_delivered_are_a_list_and_an_older_sorted_set_is_replaced(
    store: Store,
) -> None:
    store.redis.zadd(keys.DONE, {"older-layout": 1})  # what an earlier version kept
    assert reads.newest_page(store.redis, False, 0, 10) == ([], 0)  # read as nothing yet
    records = [rec(f"m-{i}", i) for i in range(30)]
    store.enqueue_many(records)
    delivered = settle(store, Outcome.DELIVERED)
    assert store.redis.type(keys.DONE) == "list"
    page, total = reads.newest_page(store.redis, False, 0, 10)
    assert total == 30
    assert page == delivered[::-1][:10]  # newest first


def test_a_purge_takes_its_entry_out_of_an_index_kept_before_buckets(store: Store) -> None:
    records = [rec(f"m-{i}", i) for i in range(3)]
    store.enqueue_many(records)
    ids = settle(store, Outcome.DEAD)
    for bound in buckets(store, "app-a"):
        store.redis.delete(keys.index_bucket("app-a", bound))
    store.redis.delete(keys.index_directory("app-a"))
    store.redis.zadd(keys.legacy_index("app-a"), {f"{r.msgid}\0{id_of(r)}": 0 for r in records})
    assert store.purge(ids[:1]) == 1
    left = store.redis.zrange(keys.legacy_index("app-a"), 0, -1)
    assert sorted(e.partition("\0")[2] for e in left) == sorted(ids[1:])  # type: ignore[union-attr]
    assert store.purge(ids[1:]) == 2
    assert list(store.redis.scan_iter(f"{keys.PREFIX}x*")) == []


def test_a_legacy_index_key_of_the_wrong_type_never_stops_an_enqueue(store: Store) -> None:
    store.redis.set(keys.legacy_index("app-a"), "not a sorted set")
    for i in range(20):  # each run sweeps app-a, its own and in turn
        _, created = store.enqueue(rec(f"m-{i:02d}", i))
        assert created
    assert len(every_page(store, None, "app-a", 100)) == 20
    assert store.redis.get(keys.legacy_index("app-a")) == "not a sorted set"  # left alone


def test_buckets_work_on_a_redis_with_a_smaller_compact_limit(
    private_redis_factory: Any,
) -> None:
    """A Redis configured with fewer entries per compact set than a bucket holds: the
    buckets are ordinary sorted sets then (more memory), and everything still works."""
    small = private_redis_factory(extra_args=("--zset-max-listpack-entries", "16"))
    own = open_store(small.url, keep_delivered_s=0)
    records = [rec(f"m-{i:04d}", i) for i in range(600)]
    own.enqueue_many(records)
    assert own.redis.object("encoding", keys.index_bucket("app-a", "")) == "skiplist"
    expected = sorted(f"{r.msgid}\0{id_of(r)}" for r in records)
    assert reads.index_entries(own.redis, "app-a", "-", "+", 10**6) == expected
    ids = settle(own, Outcome.DEAD)
    own.purge(ids)
    assert list(own.redis.scan_iter(f"{keys.PREFIX}x*")) == []
    own.redis.close()
