"""``worker.state.store.Store``, one public method at a time, against a Redis of this
module's own.

No worker runs here: each test moves deliveries on itself through the real Lua scripts
(``step`` with ``worker.deliver.steps.Finish`` and a ``worker.deliver.policy.Verdict``, as
a drain does).
Bad script arguments and corrupt state are ``test_corrupt_state.py``'s; the lookup index
is ``test_lookup.py``'s; lane fairness under a real worker is ``test_drain.py``'s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import islice
from typing import Any

import pytest

from worker.deliver.policy import RELEASE, AnswerClass, Outcome, RetryRules, Verdict, judge
from worker.deliver.provider import Answer
from worker.deliver.steps import BULK, LIVE, Claim, Finish, StepResult
from worker.enqueue.record import BackfillRecord
from worker.state import delivery, keys
from worker.state.store import Store

NUMBER, TIME = "8613512345678", "1681184764000"
OK = Answer(AnswerClass.SUCCESS, http_status=200, api_status="0", api_reason="success")
BUSY = Answer(AnswerClass.TRANSIENT, http_status=200, api_status="-12", api_reason="busy")
BAD = Answer(AnswerClass.BAD_RECORD, http_status=200, api_status="-9", api_reason="bad number")
BLOCKED = Answer(AnswerClass.BLOCKED, http_status=200, api_status="-13", api_reason="blocked")
HOUR_MS = 3_600_000


@pytest.fixture
def store_options() -> dict[str, Any]:
    """``store`` keeps deliveries 10 min once delivered."""
    return {"keep_delivered_s": 600}


def rec(msgid: str | None, app: str = "app-s") -> BackfillRecord:
    return BackfillRecord(app, NUMBER, TIME, msgid=msgid)


def now_ms(store: Store) -> int:
    """Redis's clock, which the scripts read."""
    seconds, micros = store.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def step(
    store: Store,
    done: Finish | Sequence[Finish] | None = None,
    claim: int = 1,
    *,
    prefer_bulk: bool = False,
    lease_s: float = 60.0,
    gap_s: float = 0.25,
) -> StepResult:
    """One step as a drain takes it (live lane first unless ``prefer_bulk``)."""
    return store.step(
        done, claim=claim, prefer_bulk=prefer_bulk, lease_s=lease_s, max_attempts=16, gap_s=gap_s
    )


def claim_one(store: Store, *, prefer_bulk: bool = False, lease_s: float = 60.0) -> Claim:
    (claim,) = step(store, prefer_bulk=prefer_bulk, lease_s=lease_s).claims
    return claim


def status_of(store: Store, delivery_id: str) -> dict[str, Any]:
    doc = store.status(delivery_id)
    assert doc is not None
    return doc


def score(store: Store, lane: str, delivery_id: str) -> float:
    value = store.redis.zscore(lane, delivery_id)
    assert value is not None
    return float(value)


def finish(claim: Claim, verdict: Verdict, answer: Answer = OK) -> Finish:
    return Finish(claim, answer, verdict)


def bury(store: Store, records: Sequence[BackfillRecord]) -> list[str]:
    """Dead-letter ``records`` as a drain would: enqueue, claim, record a bad-record answer."""
    ids = [i for i, _ in store.enqueue_many(records, lane=LIVE)]
    claims = step(store, claim=len(records)).claims
    assert sorted(c.delivery_id for c in claims) == sorted(ids)
    result = step(store, [finish(c, Verdict(Outcome.DEAD), BAD) for c in claims], claim=0)
    assert [verdict for verdict, _ in result.recorded] == ["dead"] * len(records)
    return ids


# -- enqueue, enqueue_many


def test_enqueue_stores_a_pending_live_delivery_due_now(store: Store) -> None:
    record = rec("m-1")
    before = now_ms(store)
    delivery_id, created = store.enqueue(record)
    assert (delivery_id, created) == (delivery.delivery_id(record), True)
    assert before <= score(store, keys.LIVE, delivery_id) <= now_ms(store)
    assert store.redis.zcard(keys.BULK) == 0
    doc = status_of(store, delivery_id)
    assert {k: doc[k] for k in ("state", "lane", "attempts", "app_id", "msgid", "callers")} == {
        "state": "pending", "lane": "live", "attempts": 0, "app_id": "app-s", "msgid": "m-1",
        "callers": "",
    }  # fmt: skip
    assert (doc["number"], doc["time"], doc["attempts_made"]) == (NUMBER, TIME, [])


def test_the_same_record_gets_the_same_id_and_is_stored_once(store: Store) -> None:
    record = rec("m-1")
    delivery_id, _ = store.enqueue(record)
    created_at = store.redis.hget(keys.delivery(delivery_id), "w")
    assert store.enqueue(record) == (delivery_id, False)
    assert store.enqueue_many([record]) == [(delivery_id, False)]  # not moved to bulk either
    assert store.redis.zrange(keys.LIVE, 0, -1) == [delivery_id]
    assert store.redis.zcard(keys.BULK) == 0
    assert store.redis.hget(keys.delivery(delivery_id), "w") == created_at
    # one field apart (no msgid, another app) is another record
    others = {store.enqueue(rec(None))[0], store.enqueue(rec("m-1", app="app-t"))[0]}
    assert len(others) == 2
    assert delivery_id not in others


def test_a_batch_goes_to_the_bulk_lane_in_order_and_a_repeat_within_it_once(store: Store) -> None:
    a, b = rec("m-a"), rec("m-b")
    result = store.enqueue_many([a, b, a])
    assert result == [
        (delivery.delivery_id(a), True),
        (delivery.delivery_id(b), True),
        (delivery.delivery_id(a), False),
    ]
    assert (store.redis.zcard(keys.BULK), store.redis.zcard(keys.LIVE)) == (2, 0)
    assert status_of(store, result[1][0])["lane"] == "bulk"
    assert store.enqueue_many([]) == []


def test_a_batch_may_go_to_the_live_lane(store: Store) -> None:
    store.enqueue_many([rec("m-a"), rec("m-b")], lane=LIVE)
    assert (store.redis.zcard(keys.LIVE), store.redis.zcard(keys.BULK)) == (2, 0)


def test_each_caller_joins_a_delivery_once_new_or_not(store: Store) -> None:
    record = rec("m-1")
    delivery_id, _ = store.enqueue(record, caller="alice")
    for caller in ("bob", "alice", None):
        assert store.enqueue(record, caller=caller) == (delivery_id, False)
    assert store.enqueue_many([record], caller="carol") == [(delivery_id, False)]
    assert status_of(store, delivery_id)["callers"] == "alice,bob,carol"


def test_due_in_s_schedules_a_delivery_later_and_no_claim_takes_it_before(store: Store) -> None:
    before = now_ms(store)
    delivery_id, _ = store.enqueue(rec("m-later"), due_in_s=3600)
    ((batch_id, _),) = store.enqueue_many([rec("m-later-bulk")], due_in_s=3600)
    for lane, member in ((keys.LIVE, delivery_id), (keys.BULK, batch_id)):
        assert before + HOUR_MS <= score(store, lane, member) <= now_ms(store) + HOUR_MS
    result = step(store, claim=8)
    assert (result.claims, result.status, result.claim.verdict) == ([], "idle", "idle")
    assert store.counts() == {"pending": 2, "dead": 0}


def test_a_new_delivery_pushes_one_wake_up_per_call_and_a_repeat_none(store: Store) -> None:
    record = rec("m-1")
    store.enqueue(record, wake_queue="wq", wake="WAKE")
    store.enqueue(record, wake_queue="wq", wake="WAKE")  # nothing new: no wake-up
    store.enqueue_many([record, rec("m-2"), rec("m-3")], wake_queue="wq", wake="WAKE")
    assert store.redis.lrange("wq", 0, -1) == ["WAKE", "WAKE"]


# -- step: claims


def test_a_claim_takes_the_live_lane_first_or_bulk_first_when_asked(store: Store) -> None:
    live, _ = store.enqueue(rec("m-live"))
    ((bulk, _),) = store.enqueue_many([rec("m-bulk")])
    first = claim_one(store, prefer_bulk=True)
    assert (first.delivery_id, first.lane) == (bulk, BULK)
    # given back unsent (due at once, uncounted), then live first again
    result = step(store, finish(first, RELEASE))
    assert result.recorded == [("released", False)]
    assert [(c.delivery_id, c.lane) for c in result.claims] == [(live, LIVE)]
    again = step(store, finish(result.claims[0], RELEASE), claim=2)
    assert [c.delivery_id for c in again.claims] == [live, bulk]
    assert [c.attempts for c in again.claims] == [1, 1]  # the releases gave their counts back


def test_a_batch_claims_up_to_its_size_each_leased_one_gap_later(store: Store) -> None:
    store.enqueue_many([rec(f"m-{i}") for i in range(3)], lane=LIVE)
    before = now_ms(store)
    result = step(store, claim=2, lease_s=30, gap_s=0.25)
    assert (len(result.claims), result.status) == (2, "full")
    leases = [score(store, keys.LIVE, c.delivery_id) for c in result.claims]
    assert leases[1] - leases[0] == 250
    assert before + 30_000 <= leases[0] <= now_ms(store) + 30_000
    for claim, lease in zip(result.claims, leases, strict=True):
        assert store.redis.hget(keys.delivery(claim.delivery_id), "l") == str(int(lease))
    rest = step(store, claim=5)
    assert (len(rest.claims), rest.status) == (1, "full")
    assert {c.delivery_id for c in rest.claims}.isdisjoint(c.delivery_id for c in result.claims)
    assert (step(store, claim=5).status, step(store, claim=0).status) == ("idle", "none")


def test_each_claim_counts_an_attempt_and_a_superseded_claim_records_nothing(
    store: Store,
) -> None:
    record = rec("m-1")
    delivery_id, _ = store.enqueue(record)
    first = claim_one(store, lease_s=0.001)
    assert (first.delivery_id, first.token, first.attempts, first.record) == (
        delivery_id, "1", 1, record,
    )  # fmt: skip
    assert (first.replay, first.lane, first.detail) == (False, LIVE, "")
    time.sleep(0.02)  # its lease has run out: claimed again, counted again
    second = claim_one(store)
    assert (second.token, second.attempts) == ("2", 2)
    stale = step(store, finish(first, Verdict(Outcome.RETRY, 0.0), BUSY), claim=0)
    assert stale.recorded == [("stale", False)]
    assert store.redis.hget(keys.delivery(delivery_id), "k") == "2"  # still the second's
    retry = step(store, finish(second, Verdict(Outcome.RETRY, 3600.0), BUSY), claim=0)
    assert retry.recorded == [("retry", False)]
    doc = status_of(store, delivery_id)
    assert doc["attempts"] == 2
    assert [a["attempt"] for a in doc["attempts_made"]] == [1, 2]  # the stale one kept too


# -- step: recording


def test_a_delivered_attempt_leaves_the_lanes_and_the_hash_stays_a_while(store: Store) -> None:
    record = rec("m-1")
    delivery_id, _ = store.enqueue(record)
    result = step(store, finish(claim_one(store), Verdict(Outcome.DELIVERED)), claim=0)
    assert result.recorded == [("delivered", False)]
    assert (store.redis.zcard(keys.LIVE), store.redis.zcard(keys.BULK)) == (0, 0)
    doc = status_of(store, delivery_id)
    assert (doc["state"], doc["attempts"], "delivered_at" in doc) == ("delivered", 1, True)
    assert [a["outcome"] for a in doc["attempts_made"]] == ["delivered"]
    assert 0 < store.redis.ttl(keys.delivery(delivery_id)) <= 600
    assert 600 < store.redis.ttl(keys.marker(delivery_id)) <= 3600
    assert store.states([delivery_id]) == ["delivered"]
    assert store.enqueue(record) == (delivery_id, False)  # within the dedupe window
    assert store.counts() == {"pending": 0, "dead": 0}


@pytest.mark.parametrize("store_options", [{"keep_delivered_s": 0}])
def test_with_keep_delivered_s_0_only_the_marker_is_left(store: Store) -> None:
    record = rec("m-1")
    delivery_id, _ = store.enqueue(record, caller="alice")
    step(store, finish(claim_one(store), Verdict(Outcome.DUPLICATE)), claim=0)
    assert store.redis.exists(keys.delivery(delivery_id), keys.attempts(delivery_id)) == 0
    assert str(store.redis.get(keys.marker(delivery_id))).endswith("|alice")
    assert store.enqueue(record, caller="bob") == (delivery_id, False)
    doc = status_of(store, delivery_id)
    assert doc.pop("delivered_at").endswith("Z")
    assert doc == {
        "delivery_id": delivery_id, "state": "delivered", "callers": "alice,bob",
        "attempts_made": [], "compacted": True,
    }  # fmt: skip
    assert store.states([delivery_id]) == ["delivered"]
    store.redis.close()


def test_a_retry_is_due_after_its_wait_with_the_error_kept(store: Store) -> None:
    delivery_id, _ = store.enqueue(rec("m-1"))
    before = now_ms(store)
    result = step(store, finish(claim_one(store), Verdict(Outcome.RETRY, 3600.0), BUSY))
    assert (result.recorded, result.claims, result.status) == ([("retry", False)], [], "idle")
    assert before + HOUR_MS <= score(store, keys.LIVE, delivery_id) <= now_ms(store) + HOUR_MS
    doc = status_of(store, delivery_id)
    assert (doc["state"], doc["attempts"], doc["last_error"]) == ("pending", 1, "status -12: busy")
    (attempt,) = doc["attempts_made"]
    assert (attempt["outcome"], attempt["retry_in_s"], attempt["api_status"]) == (
        "retry", 3600.0, "-12",
    )  # fmt: skip


def test_a_dead_attempt_moves_the_delivery_to_the_dead_letters(store: Store) -> None:
    record = rec("m-1")
    (delivery_id,) = bury(store, [record])
    assert (store.redis.zcard(keys.LIVE), store.redis.zcard(keys.BULK)) == (0, 0)
    assert score(store, keys.DEAD, delivery_id) == score(store, keys.dead_app("app-s"), delivery_id)
    doc = status_of(store, delivery_id)
    assert (doc["state"], doc["last_error"], "dead_at" in doc) == (
        "dead", "status -9: bad number", True,
    )  # fmt: skip
    assert store.counts() == {"pending": 0, "dead": 1}
    # the same record enqueued again is brought back: same id, a fresh budget
    assert store.enqueue(record) == (delivery_id, True)
    assert status_of(store, delivery_id)["state"] == "pending"
    assert store.counts() == {"pending": 1, "dead": 0}
    assert claim_one(store).attempts == 1


@pytest.mark.parametrize("store_options", [{"keep_delivered_s": 600, "pause_s": 0.3}])
def test_a_paused_attempt_pauses_the_fleet_then_one_delivery_probes(store: Store) -> None:
    store.enqueue_many([rec("m-a"), rec("m-b")], lane=LIVE)
    claims = step(store, claim=2).claims
    verdict = judge(BLOCKED, 1, RetryRules(pause_s=0.3))
    assert (verdict.outcome, verdict.counted) == (Outcome.PAUSED, False)
    paused = step(store, [finish(c, verdict, BLOCKED) for c in claims], claim=1)
    assert paused.recorded == [("paused", True), ("paused", False)]  # one began the pause
    assert paused.first_pause
    assert paused.status == "paused"
    assert 0 < paused.resume_in_s <= 0.3
    pause = store.pause_state()
    assert pause is not None
    assert pause[0] == "status -13: blocked"
    assert 0 < pause[1] <= 0.3
    assert store.redis.exists(keys.PROBE) == 1
    assert [store.redis.hget(keys.delivery(c.delivery_id), "c") for c in claims] == ["0", "0"]
    time.sleep(0.35)
    assert store.pause_state() is None
    probe = step(store, claim=8)
    assert (len(probe.claims), step(store, claim=8).status) == (1, "probing")
    over = step(store, finish(probe.claims[0], Verdict(Outcome.DELIVERED)), claim=8)
    assert store.redis.exists(keys.PROBE, keys.PROBE_LOCK) == 0
    assert len(over.claims) == 1  # the other one, claimed as usual again
    store.redis.close()


# -- reading


def test_states_and_status_read_every_state_and_nothing_for_the_unknown(store: Store) -> None:
    (dead,) = bury(store, [rec("m-dead")])
    done, _ = store.enqueue(rec("m-done"))
    step(store, finish(claim_one(store), Verdict(Outcome.DELIVERED)), claim=0)
    pending, _ = store.enqueue(rec("m-pending"))
    assert store.states([pending, dead, done, "unknown"]) == ["pending", "dead", "delivered", None]
    assert store.states([]) == []
    assert store.status("unknown") is None
    store.redis.set(keys.delivery("wrongtype"), "x")
    assert store.status("wrongtype") is None  # no exception: the claim buries such a key


def test_gauges_read_the_fleet_as_of_the_time_given(store: Store) -> None:
    bury(store, [rec("m-dead")])
    live, _ = store.enqueue(rec("m-live"))
    ((bulk, _),) = store.enqueue_many([rec("m-bulk")], due_in_s=60)
    store.redis.lpush("wq", "w1", "w2")
    # when each is due (ms, Redis's clock): how overdue each is follows from the time given
    live_due, bulk_due = store.redis.zscore(keys.LIVE, live), store.redis.zscore(keys.BULK, bulk)
    assert bulk_due - live_due >= 60_000

    def overdue(due_ms: float, at: float) -> float:
        return max(int(at * 1000) - due_ms, 0) / 1000

    at = time.time()
    figures = store.gauges("wq", at)
    assert figures == {
        "queue_depth": 2, "pending": 2, "waiting_retries": 1, "dead_letters": 1, "paused": 0,
        "outage": 0, "overdue_live_s": overdue(live_due, at), "overdue_bulk_s": 0.0,
    }  # fmt: skip
    later = store.gauges("wq", at + 120)  # as if read two minutes later: the bulk one is due
    assert later["waiting_retries"] == 0
    assert later["overdue_live_s"] == overdue(live_due, at + 120) > 119
    assert later["overdue_bulk_s"] == overdue(bulk_due, at + 120) > 0


def test_pause_and_outage_state_read_the_fleet_flags(store: Store) -> None:
    assert (store.pause_state(), store.outage_state()) == (None, None)
    store.redis.set(keys.PAUSED, "by hand", px=5000)
    pause = store.pause_state()
    assert pause is not None
    assert pause[0] == "by hand"
    assert 4 < pause[1] <= 5
    store.redis.set(keys.OUTAGE, "1681184764000|2000")
    assert store.outage_state() == (1681184764.0, 2.0)
    store.redis.set(keys.OUTAGE, "garbage")
    assert store.outage_state() == (0.0, 0.0)  # unreadable, but the fleet holds
    store.redis.set(keys.OUTAGE, "9" * 400 + "|1000")  # digits past any float
    assert store.outage_state() == (0.0, 0.0)


# -- dead letters


def age_letters(store: Store, ids: Sequence[str], died_ms: Sequence[int], app: str) -> None:
    """Give dead letters known times of death, in both indexes (as if they died then)."""
    for delivery_id, at in zip(ids, died_ms, strict=True):
        for index in (keys.DEAD, keys.dead_app(app)):
            assert store.redis.zadd(index, {delivery_id: at}, xx=True, ch=True) == 1


def test_dead_page_is_newest_first_a_page_at_a_time_by_app_and_time(store: Store) -> None:
    a1, a2 = bury(store, [rec("m-1"), rec("m-2")])
    (b1,) = bury(store, [rec("m-3", app="app-b")])
    age_letters(store, [a1, a2], [1_000_000, 2_000_000], "app-s")
    age_letters(store, [b1], [3_000_000], "app-b")
    assert store.dead_page() == [(b1, 3000.0), (a2, 2000.0), (a1, 1000.0)]
    assert store.dead_page(limit=2) == [(b1, 3000.0), (a2, 2000.0)]
    assert store.dead_page(before=2000.0) == [(a1, 1000.0)]  # strictly older
    assert store.dead_page(since=2000.0) == [(b1, 3000.0), (a2, 2000.0)]
    assert store.dead_page(app_id="app-s") == [(a2, 2000.0), (a1, 1000.0)]
    assert store.dead_page(app_id="app-none") == []


def test_dead_batches_give_each_letter_once_oldest_first_even_when_times_tie(
    store: Store,
) -> None:
    tied = bury(store, [rec(f"m-tie-{i}") for i in range(5)])
    later = bury(store, [rec(f"m-late-{i}") for i in range(2)])
    age_letters(store, tied, [1_000_000] * 5, "app-s")
    age_letters(store, later, [2_000_000, 3_000_000], "app-s")
    batches = list(islice(store.dead_batches(batch=2), 10))  # a loop fails, not hangs
    assert [len(b) for b in batches] == [2, 2, 2, 1]
    flat = [i for b in batches for i in b]
    assert sorted(flat[:5]) == sorted(tied)
    assert flat[5:] == later
    by_app = islice(store.dead_batches(app_id="app-s", batch=3), 10)
    assert [i for b in by_app for i in b] == flat
    # replaying each batch as it comes is safe: every letter once, then none left
    replayed = [i for b in islice(store.dead_batches(batch=2), 10) for i in store.replay(b)]
    assert sorted(replayed) == sorted(flat)
    assert list(store.dead_batches()) == []


def test_replay_brings_dead_letters_back_in_the_bulk_lane_with_a_fresh_budget(
    store: Store,
) -> None:
    (dead,) = bury(store, [rec("m-dead")])
    pending, _ = store.enqueue(rec("m-pending"), due_in_s=3600)
    assert store.replay([dead, pending, "unknown"]) == [dead]  # only the dead come back
    assert store.replay([]) == []
    assert store.redis.zscore(keys.BULK, dead) is not None
    assert store.redis.zcard(keys.DEAD) == store.redis.zcard(keys.dead_app("app-s")) == 0
    doc = status_of(store, dead)
    assert (doc["state"], doc["lane"], doc["attempts"], doc["replay"]) == (
        "pending", "bulk", 0, True,
    )  # fmt: skip
    claim = claim_one(store)
    assert (claim.delivery_id, claim.replay, claim.lane, claim.attempts) == (dead, True, BULK, 1)


def test_purge_deletes_dead_letters_for_good_and_leaves_the_rest(store: Store) -> None:
    record = rec("m-dead")
    (dead,) = bury(store, [record])
    pending, _ = store.enqueue(rec("m-pending"))
    store.redis.zadd(keys.DEAD, {"ghost": 1})  # a letter whose delivery is gone
    assert store.purge([dead, pending, "ghost", "unknown"]) == 1
    assert store.purge([]) == 0
    assert store.redis.exists(keys.delivery(dead), keys.attempts(dead)) == 0
    assert store.redis.zcard(keys.DEAD) == store.redis.zcard(keys.dead_app("app-s")) == 0
    assert store.states([dead, pending]) == [None, "pending"]
    assert store.enqueue(record) == (dead, True)  # gone for good: a new delivery
    assert status_of(store, dead)["attempts_made"] == []
