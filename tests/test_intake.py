"""The HTTP intake over real HTTP (uvicorn subprocess) and a real Redis."""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import read_log, wait_for
from tests.helpers import DeadRedis, backfill
from tests.intake_helpers import OTHER, TOKEN, Intake, healthy, rec, running_intake
from worker.local.processes import LocalRedis, WorkerProcess, free_port
from worker.state import keys, reads


@pytest.fixture(scope="module")
def intake(
    settings_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Intake]:
    log_path = tmp_path_factory.mktemp("intake") / "intake.log"
    with running_intake(settings_env, log_path) as client:
        yield client


def snapshot(r: redis.Redis) -> set[str]:
    """The id of every delivery hash: only an enqueue adds one.

    The test workers keep a delivered record's hash (BACKFILL_KEEP_DELIVERED_S=3600), so
    an enqueue shows here even once delivered. Markers are left out: a worker finishing an
    attempt whose delivery an earlier test's clean-up removed still writes one.
    """
    return {key.rsplit(":", 1)[1] for key in r.scan_iter(keys.delivery("*"), count=1000)}


@pytest.mark.parametrize("token", [None, "wrong-token-0000000000000", TOKEN + "x", ""])
def test_missing_or_wrong_token_is_401_and_nothing_is_enqueued(
    intake: Intake, r: redis.Redis, token: str | None
) -> None:
    before = snapshot(r)
    answer = intake.post(rec(), token=token)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert snapshot(r) == before
    assert intake.get("/v1/backfills/x", token=token).status_code == 401


def test_malformed_json_is_400(intake: Intake, r: redis.Redis) -> None:
    before = snapshot(r)
    assert intake.post(raw=b'{"app_id": ').status_code == 400
    assert snapshot(r) == before


def test_body_over_one_mib_is_413(intake: Intake, r: redis.Redis) -> None:
    before = snapshot(r)
    big = json.dumps({"records": [rec(msgid="x" * 60) for _ in range(20_000)]}).encode()
    assert len(big) > 1024 * 1024
    assert intake.post(raw=big).status_code == 413
    assert snapshot(r) == before


def test_invalid_records_are_422_listing_each_field_and_nothing_is_enqueued(
    intake: Intake, r: redis.Redis
) -> None:
    before = snapshot(r)
    body = {"records": [rec(), rec(number="12"), rec(), rec(time="1681184764", colour="red")]}
    answer = intake.post(body)
    assert answer.status_code == 422
    errors = answer.json()["errors"]
    assert [e["index"] for e in errors] == [1, 3]
    assert set(errors[0]["fields"]) == {"number"}
    assert set(errors[1]["fields"]) == {"time", "colour"}
    assert snapshot(r) == before
    assert intake.post({"records": []}).status_code == 422
    assert intake.post({"records": [rec()] * 1001}).status_code == 422
    assert intake.post([rec()]).status_code == 422
    assert snapshot(r) == before


def test_one_record_is_accepted_delivered_and_audited_with_the_token_name(
    intake: Intake, r: redis.Redis, worker: WorkerProcess
) -> None:
    answer = intake.post(rec())
    assert answer.status_code == 202
    delivery_id = answer.json()["delivery_id"]

    def delivered() -> dict[str, Any] | None:
        status: dict[str, Any] = intake.get(f"/v1/backfills/{delivery_id}").json()
        return status if status["state"] == "delivered" else None

    status = wait_for(delivered, 20, 0.1)
    assert status["number"] == "*********5678"
    assert len(status["attempts_made"]) == 1
    assert intake.get("/v1/backfills/no-such-id").status_code == 404
    events = wait_for(
        lambda: [e for e in read_log(intake.log_path) if e.get("delivery_id") == delivery_id]
    )
    assert events[0]["event"] == "postback.enqueued"
    assert events[0]["source"] == "intake"
    assert events[0]["caller"] == "php-shop"
    assert TOKEN not in intake.log_path.read_text()


def test_a_batch_of_a_thousand_is_accepted_and_repeats_are_duplicates(
    intake: Intake, r: redis.Redis
) -> None:
    records = [rec() for _ in range(1000)]
    answer = intake.post({"records": records}, token=OTHER)
    assert answer.status_code == 202
    body = answer.json()
    assert body["accepted"] == 1000
    assert len(set(body["delivery_ids"])) == 1000
    again = intake.post({"records": records[:10]}).json()
    assert again["duplicates"] == 10
    assert again["delivery_ids"] == body["delivery_ids"][:10]


def test_openapi_document_is_published(intake: Intake) -> None:
    document = intake.get("/openapi.json", token=None).json()
    assert "/v1/backfills" in document["paths"]
    assert "requestBody" in document["paths"]["/v1/backfills"]["post"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"records": st.lists(json_values, max_size=3)}),
    st.builds(lambda extra: {**rec(), **extra}, st.dictionaries(st.sampled_from(
        ["app_id", "msgid", "number", "time", "x"]), json_values, max_size=2)),
)  # fmt: skip


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_fuzzed_bodies_never_500_and_rejections_write_nothing(
    intake: Intake, r: redis.Redis, body: Any
) -> None:
    before = snapshot(r)
    answer = intake.post(body)
    assert answer.status_code in (202, 400, 422), answer.text
    if answer.status_code != 202:
        assert snapshot(r) == before


def test_health_command(settings_env: dict[str, str], worker: WorkerProcess) -> None:
    ok = backfill("health")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "healthy" in ok.stdout
    down = backfill("health", env={"BACKFILL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert down.returncode == 1
    assert "Redis" in down.stdout


def test_health_for_one_node(settings_env: dict[str, str], worker: WorkerProcess) -> None:
    from worker.app import app

    names = [name for reply in app.control.ping(timeout=2.0) for name in reply]
    assert names, "the session worker replies to a ping"
    mine = backfill("health", "--node", names[0])
    assert mine.returncode == 0, mine.stdout + mine.stderr
    assert names[0] in mine.stdout
    other = backfill("health", "--node", "celery@no-such-host", "--timeout", "0.5")
    assert other.returncode == 1  # another worker's reply does not count for this node
    assert "celery@no-such-host did not reply" in other.stdout


# --- hostile callers: depth, content type, Redis down, scoping, slow clients, load ---


def test_deep_nesting_is_400_before_parsing_and_brackets_in_strings_do_not_count(
    intake: Intake, r: redis.Redis
) -> None:
    before = snapshot(r)
    for raw in (b"[" * 100_000, b'{"a":' * 100_000, json.dumps(_nested(33)).encode()):
        answer = intake.post(raw=raw)
        assert answer.status_code == 400, answer.text
        assert "deeper than 32" in answer.json()["error"]
    assert intake.post(raw=b"[" * 20).json()["error"].startswith("body is not valid JSON")
    assert intake.post(raw=b'{"time": NaN}').status_code == 400
    assert intake.post({"records": [_nested(30)]}).status_code == 422  # deep enough, not too
    assert snapshot(r) == before
    brackets = intake.post(rec(app_id="{" * 64, msgid='"' + "[" * 63))  # escaped quote too
    assert brackets.status_code == 202, brackets.text
    log = intake.log_path.read_text()
    assert "Traceback" not in log
    assert "RecursionError" not in log


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("application/jsonx", 415),
        ("application/json; charset=latin-1", 415),
        ("", 415),
        ("application/json; charset=utf-8", 202),
        ('Application/JSON;charset="UTF-8"', 202),
    ],
)
def test_only_application_json_is_accepted(
    intake: Intake, r: redis.Redis, content_type: str, status: int
) -> None:
    before = snapshot(r)
    answer = intake.post(rec(), **{"Content-Type": content_type})
    assert answer.status_code == status, answer.text
    if status == 415:
        assert answer.json()["error"].startswith("Content-Type")
        assert snapshot(r) == before


def test_openapi_documents_every_answer(intake: Intake) -> None:
    paths = intake.get("/openapi.json", token=None).json()["paths"]
    assert {"202", "400", "401", "408", "413", "415", "422", "503"} <= set(
        paths["/v1/backfills"]["post"]["responses"]
    )
    assert {"401", "404", "503"} <= set(paths["/v1/backfills/{delivery_id}"]["get"]["responses"])


def test_a_caller_reads_only_its_own_deliveries(intake: Intake, r: redis.Redis) -> None:
    from worker import enqueue_backfill

    record = rec()
    mine = intake.post(record).json()["delivery_id"]
    unknown = intake.get("/v1/backfills/no-such-delivery", token=OTHER)
    theirs = intake.get(f"/v1/backfills/{mine}", token=OTHER)
    assert (theirs.status_code, theirs.json()) == (unknown.status_code, unknown.json())
    assert theirs.status_code == 404
    read = intake.get(f"/v1/backfills/{mine}")
    assert read.status_code == 200
    assert "callers" not in read.json()  # one caller never learns another's name

    # the same record from the other caller: the same delivery, now readable by both
    assert intake.post(record, token=OTHER).json()["delivery_id"] == mine
    assert intake.get(f"/v1/backfills/{mine}", token=OTHER).status_code == 200
    assert _callers(mine) == "php-shop,java-crm"
    assert intake.post(record, token=OTHER).status_code == 202
    assert _callers(mine) == "php-shop,java-crm"  # listed once

    batch = intake.post({"records": [rec(), rec()]}, token=OTHER).json()["delivery_ids"]
    assert [intake.get(f"/v1/backfills/{d}").status_code for d in batch] == [404, 404]
    assert [intake.get(f"/v1/backfills/{d}", token=OTHER).status_code for d in batch] == [200] * 2

    from_python = enqueue_backfill(app_id="py", number="8613512345678", time=1681184764000)
    assert intake.get(f"/v1/backfills/{from_python}").status_code == 404
    assert intake.get(f"/v1/backfills/{from_python}", token=OTHER).status_code == 404
    assert intake.get("/v1/backfills/" + "a" * 5000).status_code == 404


def _callers(delivery_id: str) -> str:
    from worker.runtime import get_store

    status = get_store().status(delivery_id)
    assert status is not None
    return str(status["callers"])


def _two_record_call() -> list[Any]:
    """The arguments Store.enqueue_many passes for two fresh records (the key prefix last)."""
    from worker.enqueue.record import BackfillRecord
    from worker.state.delivery import delivery_id

    args: list[Any] = ["b", "", 0, "", "", "1"]
    for _ in range(2):
        record = BackfillRecord.parse(rec())
        args += [delivery_id(record), record.app_id, record.msgid, record.number, record.time]
    return [*args, keys.PREFIX]


def _with(items: list[Any], index: int, value: Any) -> list[Any]:
    return [*items[:index], value, *items[index + 1 :]]


# Each spoils one argument of a two-record call; the first record's writes would come first.
SPOILERS = {
    "lane unknown": lambda a: _with(a, 0, "x"),
    "caller with a comma": lambda a: _with(a, 1, "a,b"),
    "due not a number": lambda a: _with(a, 2, "soon"),
    "due infinite": lambda a: _with(a, 2, "1e999"),
    "due negative": lambda a: _with(a, 2, -1),
    "wake queue without a message": lambda a: _with(a, 3, "backfill"),
    "index flag unknown": lambda a: _with(a, 5, "yes"),
    "an argument short": lambda a: [*a[:-2], a[-1]],
    "id with a space": lambda a: _with(a, 11, "bad id"),
    "app_id empty": lambda a: _with(a, 12, ""),
    "time fractional": lambda a: _with(a, 15, "1681184764000.5"),
}


@pytest.mark.parametrize("spoil", SPOILERS.values(), ids=SPOILERS.keys())
def test_enqueue_script_checks_every_argument_before_writing(
    settings_env: dict[str, str], r: redis.Redis, spoil: Any
) -> None:
    from worker.runtime import get_store

    store = get_store()
    call = _two_record_call()
    ids, apps = [call[6], call[11]], {call[7], call[12]}
    index_before = {app: len(reads.index_entries(r, app, "-", "+", 10**6)) for app in apps}
    with pytest.raises(redis.ResponseError, match="enqueue: bad argument"):
        store._call("enqueue", spoil(call))
    # nothing of either record was written: no delivery, no lane entry, no index entry
    # (the session worker may change other tests' keys meanwhile, so only these are read)
    for delivery in ids:
        assert not r.exists(keys.delivery(delivery), keys.attempts(delivery))
        assert r.zscore(keys.LIVE, delivery) is None
        assert r.zscore(keys.BULK, delivery) is None
    assert {app: len(reads.index_entries(r, app, "-", "+", 10**6)) for app in apps} == index_before
    created = store._call("enqueue", _two_record_call())  # the unspoilt call passes
    assert created[0::2] == [1, 1]


def test_redis_down_is_a_fast_503_with_retry_after_and_one_warning_line(
    settings_env: dict[str, str], private_redis: LocalRedis, tmp_path: Path
) -> None:
    env = {**settings_env, "BACKFILL_REDIS_URL": private_redis.url}
    with running_intake(env, tmp_path / "intake.log") as intake:
        delivery_id = intake.post(rec()).json()["delivery_id"]
        private_redis.stop()
        dead = DeadRedis(private_redis.port)
        try:
            tries = []
            for request in (
                lambda: intake.post(rec()),
                lambda: intake.get(f"/v1/backfills/{delivery_id}"),
                lambda: intake.get("/healthz", token=None),
            ):
                before = dead.accepted
                answer = request()
                tries.append(dead.accepted - before)
                assert answer.status_code == 503, answer.text
                assert answer.headers.get("Retry-After", "5") == "5"  # /healthz has none
        finally:
            dead.close()
        # fast: the intake's client tries twice at most (one quick retry, for a stale
        # pooled connection), /healthz's once, where the workers' (six retries, riding a
        # Redis restart out for 3.5 s) would try seven times
        assert all(t <= most for t, most in zip(tries, (2, 2, 1), strict=True)), tries
        assert sum(tries) >= 1  # the count sees the intake's attempts
        warnings = wait_for(
            lambda: [
                e for e in read_log(intake.log_path) if e["event"] == "intake.redis_unavailable"
            ]
        )
    assert len(warnings) == 2
    assert warnings[0]["level"] == "warning"
    assert "ConnectionError" in warnings[0]["error"]
    assert "Traceback" not in intake.log_path.read_text()


@pytest.fixture(scope="module")
def strict_intake(
    settings_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Intake]:
    """An intake with one-second header and body deadlines and room for 8 connections."""
    log_path = tmp_path_factory.mktemp("strict-intake") / "intake.log"
    args = ("--header-timeout", "1", "--body-timeout", "1", "--max-connections", "8")
    with running_intake(settings_env, log_path, *args) as client:
        client.session.close()  # raw sockets only: a pooled connection would count
        yield client


def _connect(intake: Intake, data: bytes = b"") -> socket.socket:
    host, port = intake.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def _until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, chunks = time.monotonic(), []
    with sock:
        try:
            while chunk := sock.recv(65536):  # a 10 s socket timeout fails the test
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks), time.monotonic() - started


def _request(body: bytes, length: int | None = None) -> bytes:
    return (
        f"POST /v1/backfills HTTP/1.1\r\nHost: intake\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length or len(body)}\r\n\r\n"
    ).encode() + body


def test_a_body_that_does_not_arrive_in_time_is_408_and_the_connection_closed(
    strict_intake: Intake, r: redis.Redis
) -> None:
    before = snapshot(r)
    body = json.dumps(rec()).encode()
    answer, took = _until_closed(_connect(strict_intake, _request(body[:10], len(body))))
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"body not received within 1 s" in answer
    assert took < 5
    # a trickle does not reset the deadline: it bounds the whole body
    sock = _connect(strict_intake, _request(b"", len(body)))
    started = time.monotonic()
    for byte in body[:-1]:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.05)
    answer, _ = _until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started < 5
    assert snapshot(r) == before


def _one_response(sock: socket.socket) -> bytes:
    """One whole response on a kept-alive connection (by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head.lower())[1])  # type: ignore[index]
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _kept_alive(intake: Intake) -> socket.socket:
    """A connection idle after one whole request: uvicorn's keep-alive closes it 5 s on."""
    sock = _connect(intake, b"GET /healthz HTTP/1.1\r\nHost: intake\r\n\r\n")
    _one_response(sock)
    return sock


def _still_open(sock: socket.socket) -> bool:
    """Whether the server has not closed ``sock`` (now: it is not readable, or what it has
    to read is data, not the end)."""
    readable, _, _ = select.select([sock], [], [], 0)
    try:
        return not readable or sock.recv(1, socket.MSG_PEEK) != b""
    except ConnectionResetError:
        return False


@pytest.mark.parametrize(
    "data",
    [
        b"",  # connected, sent nothing
        b"POST /v1/backfills HTTP/1.1\r\nHost: intake\r\n",  # headers never finished
        b"GET /healthz HTTP/1.1\r\nHost: intake\r\n\r\nGET /heal",  # the second request stalls
    ],
    ids=["silent", "partial headers", "stalled next request"],
)
def test_headers_that_do_not_arrive_in_time_close_the_connection(
    strict_intake: Intake, data: bytes
) -> None:
    # closed by the header deadline (1 s), not by uvicorn's keep-alive (5 s): before a
    # connection idle since just before it, which the keep-alive closes
    control = _kept_alive(strict_intake)
    try:
        started = time.monotonic()
        answer, _ = _until_closed(_connect(strict_intake, data))
        took = time.monotonic() - started
        assert _still_open(control), "the keep-alive closed the idle connection first"
    finally:
        control.close()
    assert took > 0.95  # the deadline's second, counted from the connection
    assert answer.count(b"HTTP/1.1") == data.count(b"\r\n\r\n")  # only complete requests


def test_a_keep_alive_connection_that_stalls_in_its_next_headers_is_closed(
    strict_intake: Intake,
) -> None:
    sock = _connect(strict_intake, b"GET /healthz HTTP/1.1\r\nHost: intake\r\n\r\n")
    assert _one_response(sock).startswith(b"HTTP/1.1 ")
    control = _kept_alive(strict_intake)  # idle from now: the keep-alive closes it 5 s on
    try:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        answer, _ = _until_closed(sock)
        took = time.monotonic() - started
        # closed by the header deadline (1 s from those bytes): uvicorn's keep-alive stops
        # once a request's bytes come, and would close neither
        assert _still_open(control), "the keep-alive closed the idle connection first"
    finally:
        control.close()
    assert answer == b""
    assert took > 0.95


def test_oversized_headers_are_400_and_connections_are_capped(strict_intake: Intake) -> None:
    sock = _connect(strict_intake, b"GET /healthz HTTP/1.1\r\nHost: intake\r\n")
    try:  # headers arriving piece by piece are refused once they pass 16 KiB
        for _ in range(10):
            sock.sendall(b"X-Pad: " + b"x" * 4000 + b"\r\n")
            time.sleep(0.02)
    except OSError:
        pass
    answer, _ = _until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    idle = [_connect(strict_intake) for _ in range(8)]
    try:  # past the limit: the JSON 503 with Retry-After, and /healthz still served
        answer, _ = _until_closed(_connect(strict_intake, _request(json.dumps(rec()).encode())))
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 5\r\n" in answer.lower()
        assert answer.endswith(b'{"error": "the intake is at its connection limit; retry later"}')
        answer, _ = _until_closed(
            _connect(
                strict_intake, b"GET /healthz HTTP/1.1\r\nHost: i\r\nConnection: close\r\n\r\n"
            )
        )
        assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        for sock in idle:
            sock.close()
    # the idle ones gone, the intake answers again
    assert wait_for(lambda: healthy(strict_intake), 10, 0.2)


def test_healthz_answers_during_a_burst_of_batches(intake: Intake, r: redis.Redis) -> None:
    bodies = [json.dumps({"records": [rec() for _ in range(1000)]}) for _ in range(16)]
    answers: list[tuple[int, object]] = []
    done = threading.Event()

    def poll() -> None:
        with requests.Session() as session:
            while not done.is_set():
                answer = session.get(f"{intake.url}/healthz", timeout=30)
                answers.append((answer.status_code, answer.json()))
                time.sleep(0.02)

    def post(body: str) -> int:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        url = f"{intake.url}/v1/backfills"
        return requests.post(url, data=body, headers=headers, timeout=120).status_code

    with ThreadPoolExecutor(25) as pool:
        poller = pool.submit(poll)
        statuses = list(pool.map(post, bodies))
        done.set()
        poller.result()
    assert statuses == [202] * len(bodies)
    assert answers
    # Never a wrong answer: Redis is up, so "ok", or (a machine too busy for the INFO to come
    # back within HEALTH_TIMEOUT_S, 0.5 s) the documented 503 naming the timeout; never an
    # error or a hang.
    # How fast /healthz answers during a burst is a figure of ops/bench_intake.py.
    for status, body in answers:
        assert (status, body) == (200, {"ok": True}) or (
            status == 503 and re.fullmatch(r"redis: \w*Timeout\w*", body["error"])  # type: ignore[index]
        ), (status, body)
    assert wait_for(lambda: healthy(intake), 10, 0.2)
    written = list(r.scan_iter(f"{keys.PREFIX}*", count=5000))
    for start in range(0, len(written), 5000):  # faster than the fixture's key-by-key cleanup
        r.delete(*written[start : start + 5000])
