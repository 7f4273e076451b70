"""The project's own Redis state, damaged by hand or by a bug: orphans, corrupt deliveries,
a pause without a TTL, and Lua scripts fed bad arguments. Nothing loops, nothing is half
written, nothing bad is sent."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import read_log, unique, wait_for
from tests.helpers import open_store
from worker.deliver.policy import AnswerClass, Evidence, OutageRules, Outcome, Verdict
from worker.deliver.provider import Answer
from worker.deliver.steps import BULK, Claim, Finish
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis
from worker.local.stub import ProviderStub
from worker.runtime import get_store
from worker.state import keys, scripts
from worker.state.store import HISTORY, Store

pytestmark = pytest.mark.usefixtures("worker")
NUMBER = "8613512345678"


def parked(msgid: str | None = None) -> str:
    """A live delivery stored but left alone by the workers for ten minutes."""
    record = BackfillRecord("app-c", NUMBER, "1681184764000", msgid=msgid or unique())
    delivery_id, created = get_store().enqueue(record, due_in_s=600)
    assert created
    return delivery_id


def due_now(r: redis.Redis, delivery_id: str, *, hash_too: bool = True) -> None:
    """Make a parked delivery due: its lane score and its hash's due time (a claim trusts
    the hash and puts a lane score that runs ahead of it back)."""
    now_ms = int(time.time() * 1000)
    if hash_too:
        r.hset(keys.delivery(delivery_id), "u", now_ms)
    r.zadd(keys.LIVE, {delivery_id: now_ms})


def corrupted(r: redis.Redis, field: str, value: str, *, hash_too: bool = True) -> tuple[str, str]:
    """A parked delivery with ``field`` set to ``value``, made due, and dead-lettered by
    the workers: its msgid and delivery id."""
    msgid = unique()
    delivery_id = parked(msgid)
    r.hset(keys.delivery(delivery_id), field, value)
    due_now(r, delivery_id, hash_too=hash_too)
    wait_for(lambda: r.zscore(keys.DEAD, delivery_id) is not None, 10)
    return msgid, delivery_id


def lines(worker_log: Path, event: str, delivery_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in read_log(worker_log)
        if e.get("event") == event and e.get("delivery_id") == delivery_id
    ]


def last_doc(r: redis.Redis, delivery_id: str) -> dict[str, Any]:
    """The delivery's last stored attempt document (where a dead letter keeps its reason)."""
    (raw,) = r.lrange(keys.attempts(delivery_id), -1, -1)
    doc: dict[str, Any] = json.loads(raw)
    return doc


def in_lanes(r: redis.Redis, delivery_id: str) -> bool:
    return (
        r.zscore(keys.LIVE, delivery_id) is not None or r.zscore(keys.BULK, delivery_id) is not None
    )


def test_an_orphan_is_dropped_from_the_schedule_with_one_line(
    r: redis.Redis, worker_log: Path
) -> None:
    orphan = "orphan-" + unique()
    due_now(r, orphan, hash_too=False)
    wait_for(lambda: r.zscore(keys.LIVE, orphan) is None, 10)
    time.sleep(1.0)  # many waker ticks and drains: nothing comes back
    assert not in_lanes(r, orphan)
    assert r.zscore(keys.DEAD, orphan) is None  # nothing to dead-letter: it never existed
    assert len(lines(worker_log, "postback.orphan", orphan)) == 1


@pytest.mark.parametrize(
    ("field", "value", "name"),
    [
        ("u", "soon", "due"),
        ("u", "inf", "due"),
        ("c", "x", "attempts"),
        ("c", "1.5", "attempts"),
        ("k", "nan", "claims"),
        ("s", "weird", "state"),
        ("l", "later", "lease"),
    ],
)
def test_a_corrupt_delivery_is_dead_lettered_once_with_the_field(
    stub: ProviderStub, r: redis.Redis, worker_log: Path, field: str, value: str, name: str
) -> None:
    msgid, delivery_id = corrupted(r, field, value, hash_too=field != "u")
    stored = r.hgetall(keys.delivery(delivery_id))
    assert stored["s"] == "x"
    if field not in ("s", "l"):  # a dead letter has its own state and no lease
        assert stored[field] == value  # left as found, for whoever repairs it
    assert stored["n"] == NUMBER  # the payload is kept
    assert stored["m"] == msgid
    doc = last_doc(r, delivery_id)
    assert (doc["o"], doc["e"]) == ("dead", f"corrupt state: {name}")
    assert r.zscore(keys.dead_app("app-c"), delivery_id) is not None
    assert not in_lanes(r, delivery_id)
    readable = get_store().status(delivery_id)  # what `backfill status` and `dead show` print
    assert readable is not None
    assert (readable["state"], readable["last_error"]) == ("dead", f"corrupt state: {name}")
    assert readable["number"] == NUMBER
    time.sleep(0.5)
    (corrupt,) = lines(worker_log, "postback.corrupt", delivery_id)
    assert corrupt["error"] == f"corrupt state: {name}"
    (dead,) = lines(worker_log, "postback.dead", delivery_id)
    assert dead["last_error"] == f"corrupt state: {name}"
    assert not [s for s in stub.seen() if s["msgid"] == msgid]


def test_a_delivery_key_of_the_wrong_type_is_kept_aside_and_dead_lettered(
    r: redis.Redis, worker_log: Path
) -> None:
    delivery_id = "wrongtype-" + unique()
    r.set(keys.delivery(delivery_id), "something a repair script wrote")
    due_now(r, delivery_id, hash_too=False)
    wait_for(lambda: r.zscore(keys.DEAD, delivery_id) is not None, 10)
    assert r.get(keys.delivery(delivery_id) + ":corrupt") == "something a repair script wrote"
    assert not in_lanes(r, delivery_id)
    doc = last_doc(r, delivery_id)
    assert doc["e"].startswith("corrupt state: type (string")
    time.sleep(0.5)
    (corrupt,) = lines(worker_log, "postback.corrupt", delivery_id)
    assert corrupt["error"] == doc["e"]
    assert len(lines(worker_log, "postback.dead", delivery_id)) == 1


@pytest.mark.parametrize(("field", "name", "value"), [("n", "number", "12ab"),
                                                      ("t", "time", "0000000000000")])  # fmt: skip
def test_a_stored_record_that_no_longer_validates_is_dead_lettered_not_sent(
    stub: ProviderStub, r: redis.Redis, audit: Any, field: str, name: str, value: str
) -> None:
    msgid, delivery_id = corrupted(r, field, value)
    status = get_store().status(delivery_id)
    assert status is not None
    assert status["state"] == "dead"
    assert status["last_error"] == f"corrupt state: {name}"
    assert status[name] == value  # the payload is kept as found
    (line,) = wait_for(lambda: audit(delivery_id), 10)
    assert line["outcome"] == "dead"
    time.sleep(0.5)
    assert len(audit(delivery_id)) == 1  # dead-lettered once, never retried
    assert not [s for s in stub.seen() if s["msgid"] == msgid]


def test_a_pause_without_a_ttl_is_given_one_and_holds_every_claim(
    stub: ProviderStub, r: redis.Redis
) -> None:
    r.set(keys.PAUSED, "set by hand, no TTL")
    try:
        wait_for(lambda: r.pttl(keys.PAUSED) > 0, 5)  # repaired with BACKFILL_PAUSE_S
        msgid = unique()
        store = get_store()
        delivery_id = store.enqueue(BackfillRecord("app-c", NUMBER, "1681184764000", msgid=msgid))[
            0
        ]
        step = store.step(None, claim=True, prefer_bulk=False, lease_s=5, max_attempts=4)
        assert step.claim.verdict == "paused"
        assert 0 < step.claim.resume_in_s <= 1.5
        assert msgid not in [s["msgid"] for s in stub.seen()]  # held while the pause lasts
        wait_for(lambda: store.states([delivery_id]) == ["delivered"], 20)
        assert [s["msgid"] for s in stub.seen()].count(msgid) == 1
    finally:
        r.delete(keys.PAUSED, keys.PROBE, keys.PROBE_LOCK)


# Every Lua script checks its arguments before its first write ----------------------------


@pytest.fixture(scope="module")
def quiet(module_redis: LocalRedis) -> Iterator[Store]:
    """A Redis of its own with no worker: nothing but the script under test writes."""
    store = open_store(module_redis.url, dedupe_ttl_s=3601, keep_delivered_s=61, pause_s=1.5)
    yield store
    store.redis.close()


def dump(client: redis.Redis) -> dict[str, Any]:
    return {k: (client.dump(k), client.pttl(k) < 0) for k in sorted(client.scan_iter(count=1000))}


P = keys.PREFIX
GOOD_ENQUEUE = ["b", "", 0, "", "", "1", "ID", "app-c", "MSG", NUMBER, "1681184764000", P]
GOOD_IDS = ["ID", P]
# enqueue, replay, purge: by position; a step: by what the argument is (its layout is the
# store's business, so the good arguments are the ones Store.step sends, see step_args)
BAD: dict[str, dict[Any, list[Any]]] = {
    "enqueue": {0: ["x", ""], 1: ["a,b", "a|b"], 2: [-1, "x", "inf", "nan", "1e300"],
                3: ["backfill"], 5: ["", "2", "yes"], 6: ["", "a b", "a:b"], 7: [""],
                9: [""], 10: ["", "x", "1.5", "-1"]},
    "step": {"n": ["", "x", -1, 0, 2, 65], "k": ["", "x", -1, 65], "id": [""],
             "outcome": ["bogus", ""], "document": ["x" * 70_000], "counted": ["2", ""],
             "retry_ms": [-1, "inf", "nan", "x", "1e12"], "marker_ttl_s": [0, "x", "1e300"],
             "keep_s": [-1, "nan"],
             "hold_ms": [-1, "x", "1e9"], "history": [0, "x", 10_001],
             "finish_lane": ["x", ""], "callers": ["a|b"], "lease_ms": [0, "nan", -5],
             "rate": [-1, "inf"], "burst": [0, "x"], "max_wait_ms": [-1, "1e7"],
             "max_attempts": [0, 1001, "x"], "prefer": ["x", ""],
             "claim_pause_ms": [0, "inf", "1e9"], "evidence": ["x", "2", ""],
             "o_failures": [0, "x", 1001], "o_distinct": [0, "nan"],
             "o_window_ms": [0, "inf"], "o_cap_ms": [0, "1e9"], "ramp_start": [-1, "nan"],
             "ramp_ms": [0, "x"]},
    "replay": {0: ["", "a b", "a:b", "x\n"]},
    "purge": {0: ["", "a b", "a:b", "x\n"]},
}  # fmt: skip
# how each step argument is recognised among the ones Store.step sends (distinct values;
# the outage detector's arguments are told apart by their values too)
STEP_ROLES = {"outcome": ("paused", 0), "counted": ("0", 0), "retry_ms": ("1250", 0),
              "marker_ttl_s": ("3601", 0), "keep_s": ("61", 0),
              "hold_ms": ("125", 0), "history": (str(HISTORY), 0), "finish_lane": ("b", 0),
              "callers": ("cA", 0), "lease_ms": ("5500", 0), "rate": ("0.5", 0),
              "burst": ("3", 0), "max_wait_ms": ("4750", 0), "max_attempts": ("6", 0),
              "prefer": ("l", 0), "claim_pause_ms": ("1500", 0), "evidence": ("-", 0),
              "o_failures": ("9", 0), "o_distinct": ("4", 0), "o_window_ms": ("61500", 0),
              "o_cap_ms": ("62500", 0), "ramp_start": ("7.5", 0),
              "ramp_ms": ("2250", 0)}  # fmt: skip
SCRIPT_CASES = [
    pytest.param(script, where, value, id=f"{script}-{where}-{str(value)[:8]!r}")
    for script, table in BAD.items()
    for where, values in table.items()
    for value in values
] + [
    # not a whole number of records; a good record, then a bad one
    ("enqueue", "extra", "x"),
    ("enqueue", "second", ["ID2", "app-c", "", NUMBER, "x"]),
    ("step", "extra", "x"),
    ("step", "missing", None),
    ("step", "second", "bogus"),  # a good attempt to record, then one with a bad outcome
    ("replay", "second", ["a b"]),
    ("purge", "second", ["a b"]),
]


class _Captured(Exception):
    pass


class _Capturing(redis.Redis):
    """A client that keeps the arguments of the first script call instead of running it."""

    sent: list[list[Any]]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if args and str(args[0]).upper() in ("EVALSHA", "EVAL"):
            self.sent.append(list(args))
            raise _Captured
        return super().execute_command(*args, **options)


def step_args(store: Store, delivery_id: str, second_outcome: str = "") -> list[Any]:
    """The arguments Store.step sends to record a paused attempt of ``delivery_id`` (claimed
    from the bulk lane with token 7) and claim the next one; the script does not run.
    ``second_outcome``: a second attempt to record, with that outcome."""
    client = _Capturing(connection_pool=store.redis.connection_pool)
    client.sent = []
    rules = OutageRules(failures=9, deliveries=4, window_s=61.5, probe_cap_s=62.5,
                        ramp_start_per_s=7.5, ramp_double_s=2.25)  # fmt: skip
    capturing = Store(client, dedupe_ttl_s=store.dedupe_ttl_s,
                      keep_delivered_s=store.keep_delivered_s, pause_s=store.pause_s,
                      outage=rules)  # fmt: skip
    record = BackfillRecord("app-c", NUMBER, "1681184764000", msgid="MSG")
    done = Finish(
        claim=Claim("claimed", delivery_id, "7", 1, record, lane=BULK, callers="cA"),
        answer=Answer(AnswerClass.BLOCKED, http_status=302, error="E-held"),
        verdict=Verdict(Outcome.PAUSED, 1.25, counted=False, hold_s=0.125),
    )
    second = replace(done, verdict=replace(done.verdict, outcome=second_outcome))
    finished = [done, second] if second_outcome else [done]
    with pytest.raises(_Captured):
        capturing.step(finished, claim=True, prefer_bulk=False, lease_s=5.5, max_attempts=6,
                       rate_per_s=0.5, burst=3, max_wait_s=4.75)  # fmt: skip
    ((command, _sha, numkeys, *sent),) = client.sent
    args = sent[int(numkeys) :]
    assert (str(command).upper(), int(numkeys)) == (
        "EVALSHA",
        len(scripts.STEP.keys),
    )  # the declared keys
    args = [str(a) for a in args]
    assert args[-1] == P
    assert args[:2] == [str(len(finished)), "1"]
    return args


def _position(args: list[Any], where: str, delivery_id: str) -> int:
    if where in ("n", "k"):  # how many attempts to record, how many to claim: always first
        return 0 if where == "n" else 1
    if where == "id":
        return args.index(delivery_id)
    if where == "document":
        (found,) = [i for i, a in enumerate(args) if a.startswith("{")]
        return found
    value, occurrence = STEP_ROLES[where]
    found = [i for i, a in enumerate(args) if a == value]
    shared = [role for role, (v, _) in STEP_ROLES.items() if v == value]
    assert len(found) == len(shared), f"Store.step no longer sends {shared} as {value!r}"
    return found[occurrence]


def _prepare(store: Store, script: str) -> str:
    """One delivery in the state a good call of ``script`` would change: dead, or pending
    in the bulk lane, due, claimed with token 7 (for a step)."""
    store.redis.flushdb()
    record = BackfillRecord("app-c", NUMBER, "1681184764000", msgid=unique())
    ((delivery_id, _),) = store.enqueue_many([record])
    if script == "step":
        store.redis.hset(keys.delivery(delivery_id), mapping={"k": "7", "c": "1", "u": "0"})
        store.redis.zadd(keys.BULK, {delivery_id: 0})
    else:
        store.redis.hset(keys.delivery(delivery_id), mapping={"s": "x", "z": "1", "k": "1"})
        store.redis.zrem(keys.BULK, delivery_id)
        store.redis.zadd(keys.DEAD, {delivery_id: 1})
        store.redis.zadd(keys.dead_app("app-c"), {delivery_id: 1})
    return delivery_id


def _good(store: Store, script: str, delivery_id: str) -> list[Any]:
    if script == "step":
        return step_args(store, delivery_id)
    good = GOOD_ENQUEUE if script == "enqueue" else GOOD_IDS
    return [delivery_id if a == "ID" else a for a in good]


def _bad(store: Store, script: str, delivery_id: str, where: Any, value: Any) -> list[Any]:
    args = _good(store, script, delivery_id)
    if where == "extra":
        return [*args[:-1], value, args[-1]]
    if where == "missing":
        return [*args[:-2], args[-1]]
    if where == "second" and script == "step":
        return step_args(store, delivery_id, second_outcome=value)
    if where == "second":
        return [*args[:-1], *value, args[-1]]
    position = where if isinstance(where, int) else _position(args, where, delivery_id)
    args[position] = value
    return args


@pytest.mark.parametrize("script", ["enqueue", "step", "replay", "purge"])
def test_a_script_given_good_arguments_does_change_the_state(quiet: Store, script: str) -> None:
    """The control for the next test: the same calls with good arguments write."""
    delivery_id = _prepare(quiet, script)
    args = _good(quiet, script, delivery_id)
    before = dump(quiet.redis)
    quiet._call(script, args)
    assert dump(quiet.redis) != before


@pytest.mark.parametrize(("script", "where", "value"), SCRIPT_CASES)
def test_a_script_given_a_bad_argument_changes_nothing(
    quiet: Store, script: str, where: Any, value: Any
) -> None:
    delivery_id = _prepare(quiet, script)
    args = _bad(quiet, script, delivery_id, where, value)
    before = dump(quiet.redis)
    with pytest.raises(redis.ResponseError, match=f"{script}: bad argument"):
        quiet._call(script, args)
    assert dump(quiet.redis) == before


def test_corrupt_outage_evidence_and_counter_keys_do_not_stop_a_step(quiet: Store) -> None:
    """The fleet's own bookkeeping keys overwritten with the wrong type (by hand, or by an
    older tool) must not make every step fail: the evidence set is rebuilt, the 10 s
    counter skipped, and the attempts are recorded."""
    r = quiet.redis
    r.flushdb()
    rows = [BackfillRecord("app-c", NUMBER, str(1681184764000 + i), msgid=unique()) for i in (0, 1)]
    quiet.enqueue_many(rows)
    r.set(keys.OUTAGE_SEEN, "not a sorted set")
    seconds, _ = r.time()
    for span in range(int(seconds) // 10 - 1, int(seconds) // 10 + 3):
        r.hset(keys.delivered_in(span), "x", "1")
    down = Answer(AnswerClass.TRANSIENT, http_status=503, error="HTTP 503")
    up = Answer(AnswerClass.SUCCESS, http_status=200, api_status="0", api_reason="success")
    first = quiet.step([], claim=2, prefer_bulk=True, lease_s=30, max_attempts=6)
    failed = [
        Finish(c, down, Verdict(Outcome.RETRY, 0.0, evidence=Evidence.DOWN)) for c in first.claims
    ]
    second = quiet.step(failed, claim=2, prefer_bulk=True, lease_s=30, max_attempts=6)
    assert second.recorded == [("retry", False), ("retry", False)]
    assert r.type(keys.OUTAGE_SEEN) == "zset"  # rebuilt with this step's evidence
    assert r.zcard(keys.OUTAGE_SEEN) == 2
    delivered = [
        Finish(c, up, Verdict(Outcome.DELIVERED, evidence=Evidence.UP)) for c in second.claims
    ]
    third = quiet.step(delivered, claim=0, prefer_bulk=True, lease_s=30, max_attempts=6)
    assert third.recorded == [("delivered", False), ("delivered", False)]
    assert quiet.states([c.delivery_id for c in second.claims]) == ["delivered", "delivered"]
    r.flushdb()


def test_a_ramp_clock_that_is_not_a_time_is_dropped_not_obeyed_forever(quiet: Store) -> None:
    """bf:ramp set by hand (no TTL, not a time, or in the future) would hold the fleet at
    the ramp's first rate for good: the claim drops it and sends at full speed."""
    r = quiet.redis
    for stored in ("garbage", str(10**15)):  # not a number; a start far in the future
        r.flushdb()
        quiet.enqueue_many(
            [BackfillRecord("app-c", NUMBER, str(1681184764000 + i)) for i in range(16)]
        )
        r.set(keys.RAMP, stored)
        step = quiet.step([], claim=16, prefer_bulk=True, lease_s=30, max_attempts=6)
        assert len(step.claims) == 16, step.status
        assert all(c.wait_s == 0 for c in step.claims)
        assert not r.exists(keys.RAMP)
    r.flushdb()
