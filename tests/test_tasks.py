"""The delivery path end to end: real Redis, a real worker process, real HTTP to the stub."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import API_KEY, API_SECRET, read_log, unique, wait_for
from worker import enqueue_backfill
from worker.enqueue.record import BackfillRecord
from worker.local.stub import ProviderStub
from worker.runtime import get_store
from worker.state import keys
from worker.state.delivery import delivery_id as delivery_id_of

Audit = Callable[[str], list[dict[str, Any]]]
pytestmark = pytest.mark.usefixtures("worker")


def send(stub: ProviderStub, plan: list[str] | None = None, **fields: Any) -> str:
    """Enqueue one record with a fresh msgid, scripting the stub's answers for it first."""
    msgid = fields.pop("msgid", None) or unique()
    if plan:
        stub.set_plan({msgid: plan})
    record = {"app_id": "app-t", "number": "8613512345678", "time": "1681184764000", **fields}
    return enqueue_backfill(msgid=msgid, **record)


def final(delivery_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Wait until the delivery is delivered or dead; its stored status."""

    def done() -> dict[str, Any] | None:
        status = get_store().status(delivery_id)
        return status if status and status["state"] in ("delivered", "dead") else None

    result: dict[str, Any] = wait_for(done, timeout_s)
    return result


def outcomes(audit: Audit, delivery_id: str, count: int) -> list[str]:
    events = wait_for(lambda: (e := audit(delivery_id)) and len(e) >= count and e, 10)
    return [e["outcome"] for e in events]


@pytest.mark.parametrize(
    ("fault", "first_error"),
    [
        ("status:-12", None),
        ("status:-99", None),
        ("500", "HTTP 500"),
        ("503", "HTTP 503"),
        ("429:1", "HTTP 429"),
        ("drop", "connection error"),
        ("nonjson", "body is not JSON"),
        ("slow:1.6", "timeout"),
    ],
)
def test_each_transient_fault_is_retried_then_delivered(
    stub: ProviderStub, r: redis.Redis, audit: Audit, fault: str, first_error: str | None
) -> None:
    delivery_id = send(stub, [fault, "ok"])
    status = final(delivery_id)
    assert status["state"] == "delivered"
    assert status["attempts"] == 2
    first, second = status["attempts_made"]
    assert first["outcome"] == "retry"
    if first_error:
        assert first["error"].startswith(first_error)
    # a slow answer was recorded by the provider before the timeout: the retry is a -20
    assert second["outcome"] == ("duplicate" if fault.startswith("slow") else "delivered")
    assert outcomes(audit, delivery_id, 2) == ["retry", second["outcome"]]


def test_retry_after_is_honoured(stub: ProviderStub, r: redis.Redis, audit: Audit) -> None:
    delivery_id = send(stub, ["429:1", "ok"])
    status = final(delivery_id)
    first = status["attempts_made"][0]
    # base 0.05 s would give at most 0.05 s; the header asks for 1 s
    assert first["retry_in_s"] >= 1.0
    assert audit(delivery_id)[0]["retry_in_s"] >= 1.0


@pytest.mark.parametrize("code", ["-9", "-11", "-14", "-21", "-22", "-24", "-25"])
def test_bad_record_codes_are_dead_lettered_at_once(
    stub: ProviderStub, r: redis.Redis, audit: Audit, worker_log: Path, code: str
) -> None:
    delivery_id = send(stub, [f"status:{code}", "ok"])
    status = final(delivery_id)
    assert status["state"] == "dead"
    assert status["attempts"] == 1
    assert status["attempts_made"][0]["api_status"] == code
    assert r.zscore(keys.DEAD, delivery_id) is not None
    assert r.zscore(keys.LIVE, delivery_id) is None
    assert outcomes(audit, delivery_id, 1) == ["dead"]
    dead_events = wait_for(
        lambda: [
            e
            for e in read_log(worker_log)
            if e.get("event") == "postback.dead" and e.get("delivery_id") == delivery_id
        ]
    )
    assert len(dead_events) == 1


def test_already_recorded_answer_counts_as_delivered(
    stub: ProviderStub, r: redis.Redis, audit: Audit
) -> None:
    delivery_id = send(stub, ["status:-20"])
    status = final(delivery_id)
    assert status["state"] == "delivered"
    assert outcomes(audit, delivery_id, 1) == ["duplicate"]


def test_max_attempts_dead_letters_with_every_attempt(
    stub: ProviderStub, r: redis.Redis, audit: Audit
) -> None:
    delivery_id = send(stub, ["500", "503", "status:-12", "drop", "ok"])
    status = final(delivery_id)
    assert status["state"] == "dead"
    assert [a["attempt"] for a in status["attempts_made"]] == [1, 2, 3, 4]
    assert status["last_error"].startswith("connection error")
    assert outcomes(audit, delivery_id, 4) == ["retry", "retry", "retry", "dead"]
    assert {e["max_attempts"] for e in audit(delivery_id)} == {4}


def test_account_blocked_pauses_the_fleet_and_resumes_without_losing_the_delivery(
    stub: ProviderStub, r: redis.Redis, audit: Audit, worker_log: Path
) -> None:
    blocked_msgid, other_msgid = unique(), unique()
    blocked = send(stub, ["status:-10", "ok"], msgid=blocked_msgid)
    wait_for(lambda: r.exists(keys.PAUSED))
    other = send(stub, msgid=other_msgid)  # enqueued during the pause: it must wait too
    assert final(blocked)["state"] == "delivered"
    assert final(other)["state"] == "delivered"
    # the pause held the other record back until the first probe was due (1 s after it began;
    # the probe may be either record); a busy machine only makes it later
    first = stub.seen_at()
    assert first[other_msgid] - first[blocked_msgid] >= 0.95
    assert outcomes(audit, blocked, 2) == ["paused", "delivered"]
    # the paused attempt did not count against the delivery
    assert get_store().status(blocked)["attempts"] == 1  # type: ignore[index]
    assert audit(other)[0]["attempt"] == 1
    pauses = [e for e in read_log(worker_log) if e.get("event") == "postback.paused"]
    assert [e["delivery_id"] for e in pauses].count(blocked) == 1


def test_audit_lines_match_the_attempts_the_stub_saw(
    stub: ProviderStub, r: redis.Redis, audit: Audit
) -> None:
    before = stub.stats()["requests"]
    plans = [["ok"], ["500", "ok"], ["drop", "503", "ok"], ["status:-9"], ["nonjson", "ok"]] * 4
    ids = [send(stub, plan) for plan in plans]
    for delivery_id in ids:
        final(delivery_id)
    seen = stub.stats()["requests"] - before  # type: ignore[operator]
    assert seen == sum(len(p) for p in plans)
    assert sum(len(audit(i)) for i in ids) == seen


def test_secret_and_sign_never_reach_the_log(
    stub: ProviderStub, r: redis.Redis, worker_log: Path
) -> None:
    delivery_id = send(stub, ["500", "drop", "ok"])
    final(delivery_id)
    log_text = worker_log.read_text()
    assert API_SECRET not in log_text
    signs = {
        hashlib.md5((API_KEY + API_SECRET + str(s["timestamp"])).encode()).hexdigest()
        for s in stub.seen()
    }
    assert signs
    assert not [s for s in signs if s in log_text]


def test_number_is_masked_in_the_audit(
    stub: ProviderStub, r: redis.Redis, audit: Audit, worker_log: Path
) -> None:
    delivery_id = send(stub, number="+4915112345678")
    final(delivery_id)
    (event,) = audit(delivery_id)
    assert event["number"] == "*********5678"
    assert "4915112345678" not in worker_log.read_text()


def test_enqueue_is_idempotent(stub: ProviderStub, r: redis.Redis) -> None:
    msgid = unique()
    first = send(stub, msgid=msgid)
    again = send(stub, msgid=msgid)
    assert first == again
    final(first)
    assert send(stub, msgid=msgid) == first  # still the same once delivered
    assert [q["msgid"] for q in stub.requests()].count(msgid) == 1
    record = BackfillRecord("app-t", "8613512345678", "1681184764000", msgid=msgid)
    ttl = r.ttl(keys.marker(delivery_id_of(record)))
    assert 0 < ttl <= 7 * 24 * 3600


def test_a_retried_request_carries_a_fresh_timestamp(stub: ProviderStub, r: redis.Redis) -> None:
    msgid = unique()
    delivery_id = send(stub, ["429:1", "ok"], msgid=msgid)
    final(delivery_id)
    stamps = [s["timestamp"] for s in stub.seen() if s["msgid"] == msgid]
    assert len(stamps) == 2
    assert int(stamps[1]) > int(stamps[0])


def test_every_worker_line_is_json_and_task_lines_carry_the_task_id(
    stub: ProviderStub, r: redis.Redis, worker_log: Path
) -> None:
    final(send(stub, ["500", "ok"]))
    events = read_log(worker_log)  # fails on any non-JSON line, Celery's own included
    assert any(e.get("logger", "").startswith("celery") for e in events)
    attempts = [e for e in events if e.get("event") == "postback.attempt"]
    assert attempts
    assert all(e.get("task_id") for e in attempts)


def test_published_messages_are_the_ones_celery_itself_writes(r: redis.Redis) -> None:
    """Wake-ups are protocol-2 messages built by hand; they must match apply_async's."""
    from worker.deliver.messages import wake_message
    from worker.deliver.tasks import deliver

    queue = f"compare-{unique()}"
    try:
        deliver.apply_async((), queue=queue)
        raw = r.rpop(queue)
        assert isinstance(raw, str)
        theirs = json.loads(raw)
        ours = json.loads(wake_message(queue, theirs["headers"]["origin"]))
        for doc in (theirs, ours):
            # per-message identifiers: fresh on every publish, checked for shape only
            task_id = doc["headers"].pop("id")
            assert doc["headers"].pop("root_id") == task_id
            assert doc["properties"].pop("correlation_id") == task_id
            assert len(doc["properties"].pop("delivery_tag")) == 36
            doc["properties"].pop("reply_to")  # results are off; Celery's is a process oid
            doc["body"] = json.loads(base64.b64decode(doc["body"]))
        assert ours == theirs
    finally:
        r.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
