"""A misbehaving provider (SPEC section 8) against a real worker, a private Redis and real
HTTP: redirects, trickles, huge and compressed bodies, deep JSON, echoed credentials,
undocumented statuses, bad certificates. Nothing loops, leaks, bloats or is sent twice."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import hostile
from tests.certs import CA
from tests.conftest import API_KEY, API_SECRET, read_log, unique, wait_for
from tests.helpers import open_store
from worker.deliver.policy import AnswerClass
from worker.deliver.provider import ProviderClient
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess, local_env
from worker.settings import load_settings
from worker.state import keys
from worker.state.connection import connect
from worker.state.store import Store

NUMBER = "8613512345678"
MAX_ATTEMPTS = 3
CONNECT_S, READ_S = 1, 2  # the hard deadline of an attempt is their sum: 3 s


@pytest.fixture(scope="module")
def server() -> Iterator[hostile.HostileServer]:
    provider = hostile.HostileServer().start()
    yield provider
    provider.stop()


def hostile_env(redis_url: str, base_url: str) -> dict[str, str]:
    return local_env(
        redis_url, base_url, API_KEY, API_SECRET, max_attempts=MAX_ATTEMPTS,
        backoff_base_s=0.05, backoff_cap_s=0.2, connect_timeout_s=CONNECT_S,
        read_timeout_s=READ_S, pause_s=1.5, scheduler_tick_s=0.05,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hworker(
    server: hostile.HostileServer,
    module_redis: LocalRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    log_path = tmp_path_factory.mktemp("hostile-worker") / "worker.log"
    process = WorkerProcess(hostile_env(module_redis.url, server.url), log_path, concurrency=8)
    process.start().wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def store(module_redis: LocalRedis) -> Iterator[Store]:
    own = open_store(module_redis.url, keep_delivered_s=900, pause_s=1.5)
    yield own
    own.redis.close()


def send(store: Store, server: hostile.HostileServer, steps: list[hostile.Behaviour]) -> str:
    msgid = unique("h")
    server.plan(msgid, steps)
    record = BackfillRecord("app-h", NUMBER, "1681184764000", msgid=msgid)
    delivery_id, created = store.enqueue(record)
    assert created
    return delivery_id


def final(store: Store, delivery_id: str, timeout_s: float = 40.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status = store.status(delivery_id)
        return status if status and status["state"] in ("delivered", "dead") else None

    result: dict[str, Any] = wait_for(done, timeout_s, 0.1)
    return result


def events(worker: WorkerProcess, delivery_id: str, name: str) -> list[dict[str, Any]]:
    return [
        e
        for e in read_log(worker.log_path)
        if e.get("event") == name and e.get("delivery_id") == delivery_id
    ]


def msgid_of(store: Store, delivery_id: str) -> str:
    status = store.status(delivery_id)
    assert status is not None
    return str(status["msgid"])


@pytest.mark.parametrize("code", [302, 307])
def test_a_redirect_is_not_followed_and_pauses_the_fleet_without_counting(
    store: Store, server: hostile.HostileServer, hworker: WorkerProcess, code: int
) -> None:
    elsewhere = hostile.HostileServer().start()
    try:
        location = elsewhere.url + "/postback/backfill?key=" + API_KEY
        delivery_id = send(store, server, [hostile.answer(code, b"", {"Location": location})])
        status = final(store, delivery_id)
        assert elsewhere.requests == []  # neither the credentials nor the record went there
    finally:
        elsewhere.stop()
    assert status["state"] == "delivered"  # the probe after the pause went through
    first, _ = status["attempts_made"]
    assert first["outcome"] == "paused"
    assert first["error"].startswith(f"HTTP {code} redirect to http://127.0.0.1:")
    assert "not followed" in first["error"]
    assert API_KEY not in first["error"]
    assert status["attempts"] == 1  # the paused attempt did not count
    paused = wait_for(lambda: events(hworker, delivery_id, "postback.paused"), 10)
    assert "redirect" in paused[0]["error"]


def test_a_trickling_provider_is_cut_at_the_deadline_and_each_attempt_counts(
    store: Store, server: hostile.HostileServer, hworker: WorkerProcess
) -> None:
    steps = [hostile.trickle(0.5), hostile.trickle(0.5, headers_too=True), hostile.trickle(0.5)]
    delivery_id = send(store, server, steps)
    status = final(store, delivery_id, 60)
    assert status["state"] == "dead"  # three attempts, each ended by the deadline, all counted
    attempts = status["attempts_made"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    deadline_ms = (CONNECT_S + READ_S) * 1000
    for attempt in attempts:
        # ended by the deadline (its error says so), not before it; without it each read
        # would wait out the trickle, 60 s: far beyond the 20 s allowed a busy machine
        assert attempt["error"].startswith("deadline exceeded")
        assert deadline_ms - 100 <= attempt["latency_ms"] < 20_000
    sent = [r.at for r in server.seen(msgid_of(store, delivery_id))]
    assert len(sent) == 3
    # never a second send of the same delivery while an attempt was in flight
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
    assert min(gaps) >= CONNECT_S + READ_S - 0.2
    print(f"attempt durations under a trickle: {[a['latency_ms'] for a in attempts]} ms")


def test_a_delivery_claimed_to_the_budget_without_an_outcome_is_dead_lettered_as_poison(
    store: Store, server: hostile.HostileServer, hworker: WorkerProcess
) -> None:
    msgid = unique("poison")
    record = BackfillRecord("app-h", NUMBER, "1681184764000", msgid=msgid)
    ((delivery_id, _),) = store.enqueue_many([record], due_in_s=600)  # the workers wait

    def due_now() -> None:
        # the lane's score and the hash's due time: a claim trusts the hash
        now_ms = int(time.time() * 1000)
        store.redis.hset(keys.delivery(delivery_id), "u", now_ms)
        store.redis.zadd(keys.BULK, {delivery_id: now_ms})

    for expected in range(1, MAX_ATTEMPTS + 1):
        # a worker claims it and dies before any outcome is written
        due_now()
        step = store.step(
            None, claim=True, prefer_bulk=True, lease_s=0.05, max_attempts=MAX_ATTEMPTS
        )
        # the lanes hold it back from the running worker until the next claim
        store.redis.zadd(keys.BULK, {delivery_id: int(time.time() * 1000) + 600_000})
        claim = step.claim
        assert (claim.verdict, claim.delivery_id, claim.attempts) == (
            "claimed", delivery_id, expected,
        )  # fmt: skip
        time.sleep(0.1)  # its lease ends
    assert server.seen(msgid) == []
    due_now()
    status = final(store, delivery_id)
    assert status["state"] == "dead"
    assert status["last_error"] == (
        f"poison record: claimed {MAX_ATTEMPTS} times without a recorded outcome"
    )
    assert status["attempts"] == MAX_ATTEMPTS
    assert server.seen(msgid) == []
    (line,) = wait_for(lambda: events(hworker, delivery_id, "postback.attempt"), 10)
    assert (line["outcome"], line["attempt"]) == ("dead", MAX_ATTEMPTS)
    assert line["error"].startswith("poison record")
    assert wait_for(lambda: events(hworker, delivery_id, "postback.dead"), 10)
    time.sleep(0.5)
    assert len(events(hworker, delivery_id, "postback.dead")) == 1


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        (hostile.answer(429, b"", {"Retry-After": "\xb2"}), "HTTP 429"),  # '²'.isdigit()
        (hostile.answer(200, b"[" * 60_000), "body is not JSON"),
        (hostile.answer(200, b'{"status": ' + b"[" * 60_000), "body is not JSON"),
        (hostile.many_headers(), "connection error"),
        (hostile.bad_gzip(), "bad compressed body"),
    ],
    ids=["retry-after-superscript", "deep-json", "deep-status", "many-headers", "bad-gzip"],
)
def test_an_unparseable_answer_is_an_audited_counted_transient_failure(
    store: Store,
    server: hostile.HostileServer,
    hworker: WorkerProcess,
    behaviour: hostile.Behaviour,
    error: str,
) -> None:
    delivery_id = send(store, server, [behaviour])
    status = final(store, delivery_id)
    assert status["state"] == "delivered"
    first, second = status["attempts_made"]
    assert (first["attempt"], first["outcome"]) == (1, "retry")
    assert first["error"].startswith(error), first["error"]
    assert second["outcome"] == "delivered"
    lines = wait_for(lambda: len(e := events(hworker, delivery_id, "postback.attempt")) == 2 and e)
    assert [e["outcome"] for e in lines] == ["retry", "delivered"]


def test_huge_and_compressed_bodies_are_capped_and_worker_memory_stays_flat(
    store: Store, server: hostile.HostileServer, hworker: WorkerProcess
) -> None:
    assert hworker.process is not None
    bomb = hostile.gzip_bomb(500 << 20)
    assert len(hostile._bombs[500 << 20]) < 1 << 20  # half a megabyte on the wire
    ids = [send(store, server, [hostile.big_body(50 << 20)]) for _ in range(4)]
    ids += [send(store, server, [bomb]) for _ in range(4)]
    small = send(store, server, [hostile.small_gzip()])
    for delivery_id in ids:
        status = final(store, delivery_id, 60)
        first = status["attempts_made"][0]
        assert first["error"] == "body too large (over 65536 bytes)"
        assert status["state"] == "delivered"
    assert final(store, small)["attempts_made"][0]["outcome"] == "delivered"
    peak_mb = _peak_rss_mb(hworker.process.pid)
    print(f"worker peak RSS after 4 x 50 MB bodies and 4 x 500 MB gzip bombs: {peak_mb:.0f} MB")
    assert peak_mb <= 150


def test_provider_text_is_redacted_in_the_log_the_store_and_the_cli(
    store: Store, server: hostile.HostileServer, hworker: WorkerProcess, module_redis: LocalRedis
) -> None:
    delivery_id = send(store, server, [hostile.echo()])
    status = final(store, delivery_id)
    assert status["state"] == "dead"  # -9: the record is bad
    (request,) = server.seen(msgid_of(store, delivery_id))
    secrets = [API_KEY, API_SECRET, request.headers["sign"], NUMBER]
    reason = status["attempts_made"][0]["api_reason"]
    assert reason == "rejected Api-Key=[REDACTED] Sign=[REDACTED] number=*********5678"
    assert wait_for(lambda: events(hworker, delivery_id, "postback.dead"))
    env = {**os.environ, "BACKFILL_REDIS_URL": module_redis.url}
    shown = [
        subprocess.run(
            [sys.executable, "-m", "worker", *args],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        ).stdout
        for args in (["dead", "list"], ["dead", "show", delivery_id], ["status", delivery_id])
    ]  # fmt: skip
    assert "number=*********5678" in shown[0]
    for text in (hworker.log_path.read_text(), *shown):
        for secret in secrets:
            assert secret not in text
    # the store keeps the record's number to send it, and nothing else of the list
    stored = json.dumps(store.status(delivery_id)["attempts_made"])  # type: ignore[index]
    assert not [s for s in secrets if s in stored]


@pytest.mark.parametrize("value", ["0 ", "\u00a00", "+0", "0x0", "", True, 0.0, None, [0]])
def test_a_status_the_provider_never_documents_is_an_unknown_answer(
    store: Store, server: hostile.HostileServer, hworker: WorkerProcess, value: object
) -> None:
    delivery_id = send(store, server, [hostile.answer(200, {"status": value, "reason": "?"})])
    status = final(store, delivery_id)
    first = status["attempts_made"][0]
    assert first["outcome"] == "retry"  # not delivered on a lenient reading
    assert first["error"].startswith("unknown answer: status")
    assert status["state"] == "delivered"


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


# TLS: the verification reason reaches the error text -----------------------------------


@pytest.fixture(scope="module")
def trusted(tmp_path_factory: pytest.TempPathFactory) -> tuple[CA, Path]:
    ca = CA("backfill test CA")
    return ca, ca.write(tmp_path_factory.mktemp("ca") / "ca.pem")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("valid", None),
        ("untrusted", "unable to get local issuer certificate"),
        ("wrong-host", "mismatch"),
        ("expired", "certificate has expired"),
    ],
)
def test_tls_failures_name_their_reason(
    trusted: tuple[CA, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    reason: str | None,
) -> None:
    ca, bundle = trusted
    issuer = CA("someone else") if case == "untrusted" else ca
    context = issuer.server_context(
        tmp_path,
        host="other.example" if case == "wrong-host" else "127.0.0.1",
        expired=case == "expired",
    )
    server = hostile.HostileServer(tls=context).start()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    try:
        client = ProviderClient(server.url, API_KEY, API_SECRET, read_timeout_s=5)
        answer = client.send(BackfillRecord("app-h", NUMBER, "1681184764000", msgid="tls"))
    finally:
        server.stop()
    if reason is None:
        assert answer.kind is AnswerClass.SUCCESS
    else:
        assert answer.kind is AnswerClass.TRANSIENT
        assert answer.error is not None
        assert answer.error.startswith("tls error: ")
        assert reason in answer.error


def test_a_worker_audits_the_tls_reason_and_warns_of_cleartext(
    trusted: tuple[CA, Path], tmp_path: Path, private_redis_factory: Callable[..., LocalRedis]
) -> None:
    ca, bundle = trusted
    server = hostile.HostileServer(tls=ca.server_context(tmp_path, expired=True)).start()
    local = private_redis_factory()
    env = {**hostile_env(local.url, server.url), "REQUESTS_CA_BUNDLE": str(bundle)}
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        own = Store(connect(local.url), dedupe_ttl_s=3600)
        record = BackfillRecord("app-h", NUMBER, "1681184764000", msgid=unique())
        delivery_id, _ = own.enqueue(record)
        line = wait_for(lambda: events(worker, delivery_id, "postback.attempt"), 20)[0]
        assert line["error"] == "tls error: certificate has expired"
    finally:
        worker.stop()
        server.stop()
    # a loopback http:// provider is not "cleartext on the network"; another host is
    assert not [e for e in read_log(worker.log_path) if e["event"] == "provider.cleartext"]
    clear = WorkerProcess(
        hostile_env(local.url, "http://provider.invalid/sms"), tmp_path / "clear.log"
    ).start()
    try:
        clear.wait_ready()
        (warning,) = [e for e in read_log(clear.log_path) if e["event"] == "provider.cleartext"]
        assert warning["level"] == "warning"
    finally:
        clear.stop()


def test_a_missing_ca_bundle_stops_the_worker_at_start_up(tmp_path: Path) -> None:
    env = {
        **os.environ,
        **hostile_env("redis://127.0.0.1:1/0", "https://127.0.0.1:1/sms"),
        "REQUESTS_CA_BUNDLE": str(tmp_path / "nowhere.pem"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "worker", "worker"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "REQUESTS_CA_BUNDLE" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("connect_s", "read_s"), [(0.1, 0.1), (5, 15), (60, 300)])
def test_the_lease_outlasts_the_attempt_deadline(connect_s: float, read_s: float) -> None:
    settings = load_settings(
        connect_timeout_s=connect_s, read_timeout_s=read_s, visibility_timeout_s=3600
    )
    client = ProviderClient("https://x.invalid", "k", "s", connect_timeout_s=connect_s,
                            read_timeout_s=read_s)  # fmt: skip
    assert client.deadline_s == connect_s + read_s
    assert settings.attempt_lease_s >= client.deadline_s + 5
