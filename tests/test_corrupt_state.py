"""The project's own Redis state, damaged by hand or by a bug: orphans, corrupt deliveries,
a pause without a TTL, and Lua scripts fed bad arguments. Nothing loops, nothing is half
written, nothing bad is sent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import read_log, unique, wait_for
from worker import keys
from worker.connection import connect
from worker.local import LocalRedis
from worker.record import BackfillRecord
from worker.runtime import get_store
from worker.store import HISTORY, Store
from worker.stub import ProviderStub

pytestmark = pytest.mark.usefixtures("worker")


def parked(msgid: str | None = None) -> str:
    """A delivery stored but left alone by the dispatchers for ten minutes."""
    record = BackfillRecord("app-c", "8613512345678", "1681184764000", msgid=msgid or unique())
    delivery_id, _ = get_store().enqueue(record, dispatch_grace_s=600)
    return delivery_id


def due_now(r: redis.Redis, delivery_id: str) -> None:
    r.zadd(keys.SCHEDULE, {delivery_id: time.time()})


def lines(worker_log: Path, event: str, delivery_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in read_log(worker_log)
        if e.get("event") == event and e.get("delivery_id") == delivery_id
    ]


def test_an_orphan_is_dropped_from_the_schedule_with_one_line(
    r: redis.Redis, worker_log: Path
) -> None:
    orphan = "orphan-" + unique()
    due_now(r, orphan)
    wait_for(lambda: r.zscore(keys.SCHEDULE, orphan) is None, 10)
    time.sleep(1.0)  # a few dispatcher ticks: nothing comes back
    assert r.zscore(keys.SCHEDULE, orphan) is None
    assert len(lines(worker_log, "postback.orphan", orphan)) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("due_at", "soon"),
        ("due_at", "inf"),
        ("attempts", "x"),
        ("attempts", "1.5"),
        ("claims", "nan"),
        ("state", "weird"),
        ("lease_until", "later"),
    ],
)
def test_a_corrupt_delivery_is_dead_lettered_once_with_the_field(
    stub: ProviderStub, r: redis.Redis, worker_log: Path, field: str, value: str
) -> None:
    msgid = unique()
    delivery_id = parked(msgid)
    r.hset(keys.delivery(delivery_id), field, value)
    due_now(r, delivery_id)
    wait_for(lambda: r.zscore(keys.DEAD, delivery_id) is not None, 10)
    stored = r.hgetall(keys.delivery(delivery_id))
    assert stored["state"] == "dead"
    assert stored["last_error"] == f"corrupt state: {field}"
    assert stored["number"] == "8613512345678"  # the payload is kept
    assert r.zscore(keys.SCHEDULE, delivery_id) is None
    time.sleep(0.5)
    assert len(lines(worker_log, "postback.corrupt", delivery_id)) == 1
    assert not [s for s in stub.seen() if s["msgid"] == msgid]


def test_a_delivery_key_of_the_wrong_type_is_kept_aside_and_dead_lettered(
    r: redis.Redis, worker_log: Path
) -> None:
    delivery_id = "wrongtype-" + unique()
    r.set(keys.delivery(delivery_id), "something a repair script wrote")
    due_now(r, delivery_id)
    wait_for(lambda: r.zscore(keys.DEAD, delivery_id) is not None, 10)
    assert r.get(keys.delivery(delivery_id) + ":corrupt") == "something a repair script wrote"
    stored = r.hgetall(keys.delivery(delivery_id))
    assert stored["last_error"].startswith("corrupt state: type (string")
    assert len(lines(worker_log, "postback.corrupt", delivery_id)) == 1


@pytest.mark.parametrize(("field", "value"), [("number", "12ab"), ("time", "0000000000000")])
def test_a_stored_record_that_no_longer_validates_is_dead_lettered_not_sent(
    stub: ProviderStub, r: redis.Redis, audit: Any, field: str, value: str
) -> None:
    msgid = unique()
    delivery_id = parked(msgid)
    r.hset(keys.delivery(delivery_id), field, value)
    due_now(r, delivery_id)
    wait_for(lambda: r.zscore(keys.DEAD, delivery_id) is not None, 10)
    assert r.hget(keys.delivery(delivery_id), "last_error") == f"corrupt state: {field}"
    (line,) = wait_for(lambda: audit(delivery_id), 10)
    assert line["outcome"] == "dead"
    assert not [s for s in stub.seen() if s["msgid"] == msgid]


def test_a_pause_without_a_ttl_is_given_one_and_holds_every_claim(
    stub: ProviderStub, r: redis.Redis
) -> None:
    r.set(keys.PAUSED, "set by hand, no TTL")
    try:
        wait_for(lambda: r.pttl(keys.PAUSED) > 0, 5)  # repaired with BACKFILL_PAUSE_S
        msgid = unique()
        delivery_id = get_store().enqueue(
            BackfillRecord("app-c", "8613512345678", "1681184764000", msgid=msgid)
        )[0]
        assert get_store().claim(delivery_id, 5, max_attempts=4, pause_s=1.5).verdict == "paused"
        wait_for(lambda: get_store().states([delivery_id]) == ["delivered"], 20)
        assert [s["msgid"] for s in stub.seen()].count(msgid) == 1
    finally:
        r.delete(keys.PAUSED, keys.PROBE, keys.PROBE_LOCK)


# Every Lua script checks its arguments before its first write ----------------------------


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """A Redis of its own with no worker: nothing but the script under test writes."""
    server = LocalRedis(tmp_path_factory.mktemp("scripts")).start()
    store = Store(connect(server.url), dedupe_ttl_s=3600, requeue_after_s=5)
    yield store
    store.redis.close()
    server.stop()


def dump(client: redis.Redis) -> dict[str, Any]:
    return {k: (client.dump(k), client.pttl(k) < 0) for k in sorted(client.scan_iter(count=1000))}


GOOD_CLAIM = ["ID", 5, 0, 1, 5, 4, 1000]
GOOD_FINISH = ["ID", "1", "retry", "{}", "1", 1.0, 3600, 60, "", "", 0, HISTORY]
GOOD_PROMOTE = [500, 60, 2000, 5000, 60000]
GOOD_REPLAY = ["ID", 3600, 0]
BAD_CLAIM = {1: ["x", "inf", "-1", 0], 2: ["nan", -1], 3: [0], 4: ["nan", -1], 5: [0, "x"],
             6: ["1e300", "inf", 0]}  # fmt: skip
BAD_FINISH = {2: ["bogus"], 4: ["2", ""], 5: ["inf", "nan", -1], 6: [0, "x"], 7: ["1e300", 0],
              10: [-1, "inf"], 11: [0, "x"], 3: ["x" * 70_000]}  # fmt: skip
BAD_PROMOTE = {0: ["x", -1], 1: ["inf"], 2: ["nan"], 3: [0], 4: ["1e300", 0]}
BAD_REPLAY = {1: ["nan", 0, "1e300"], 2: [-1, "inf"]}


def cases(good: list[Any], bad: dict[int, list[Any]]) -> list[list[Any]]:
    out = []
    for position, values in bad.items():
        for value in values:
            args = list(good)
            args[position] = value
            out.append(args)
    return out


@pytest.mark.parametrize(
    ("script", "args"),
    [("claim", a) for a in cases(GOOD_CLAIM, BAD_CLAIM)]
    + [("finish", a) for a in cases(GOOD_FINISH, BAD_FINISH)]
    + [("promote", a) for a in cases(GOOD_PROMOTE, BAD_PROMOTE)]
    + [("replay", a) for a in cases(GOOD_REPLAY, BAD_REPLAY)],
)
def test_a_script_given_a_bad_argument_changes_nothing(
    quiet: Store, script: str, args: list[Any]
) -> None:
    record = BackfillRecord("app-c", "8613512345678", "1681184764000", msgid=unique())
    delivery_id, _ = quiet.enqueue(record, dispatch_grace_s=0)
    quiet.redis.hset(keys.delivery(delivery_id), mapping={"state": "dead", "claims": "1"})
    quiet.redis.zadd(keys.DEAD, {delivery_id: 1})
    delivery_keys = {
        "claim": [keys.delivery(delivery_id), keys.SCHEDULE, keys.PAUSED, keys.RATE, keys.DEAD],
        "finish": [
            keys.delivery(delivery_id), keys.attempts(delivery_id), keys.SCHEDULE, keys.DEAD,
            keys.dedupe(record.fingerprint()), keys.PAUSED, keys.PROBE, keys.PROBE_LOCK, keys.RATE,
        ],
        "promote": [keys.SCHEDULE, keys.PAUSED, keys.PROBE, keys.PROBE_LOCK, "backfill"],
        "replay": [keys.delivery(delivery_id), keys.SCHEDULE, keys.DEAD],
    }[script]  # fmt: skip
    if script != "promote":
        args = [delivery_id if a == "ID" else a for a in args]
    if script == "claim":  # a pending delivery, which a good claim would change
        quiet.redis.hset(keys.delivery(delivery_id), "state", "pending")
    before = dump(quiet.redis)
    with pytest.raises(redis.ResponseError, match="bad argument"):
        getattr(quiet, f"_{script}")(delivery_keys, args)
    assert dump(quiet.redis) == before
    quiet.redis.flushdb()
