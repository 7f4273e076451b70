"""The provider stub over real HTTP on loopback: checks, records, scripted and random faults."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from worker.local.stub import FAULT_KINDS, ProviderStub, parse_step

# The provider's published test vector (SPEC section 1).
VECTOR_KEY = "bDqJFiq9"
VECTOR_SECRET = "7bz1lzh9"
VECTOR_TIMESTAMP = "1630468800"
VECTOR_SIGN = "05d7a50893e22a5c4bb3216ae3396c7c"

TIMEOUT = 2.0


def md5_sign(key: str, secret: str, timestamp: str) -> str:
    """The sign computed here, independently of the stub and of worker.deliver.provider."""
    return hashlib.md5((key + secret + timestamp).encode()).hexdigest()


def signed_headers(
    timestamp: str | None = None, *, key: str = VECTOR_KEY, secret: str = VECTOR_SECRET
) -> dict[str, str]:
    """The headers a correct client sends."""
    stamp = timestamp or str(int(time.time()))
    return {
        "Content-Type": "application/json;charset=UTF-8",
        "Api-Key": key,
        "Timestamp": stamp,
        "Sign": md5_sign(key, secret, stamp),
    }


def record(msgid: str | None = "m1", **fields: Any) -> dict[str, Any]:
    """A valid body; ``msgid=None`` leaves it out."""
    body: dict[str, Any] = {"appId": "app1", "number": "8613800000000", "time": "1630468800"}
    if msgid is not None:
        body["msgid"] = msgid
    return body | fields


@pytest.fixture
def provider() -> Iterator[ProviderStub]:
    """A fresh stub on an ephemeral port, stopped afterwards."""
    with ProviderStub(VECTOR_KEY, VECTOR_SECRET, seed=1) as stub:
        yield stub


@pytest.fixture
def session() -> Iterator[requests.Session]:
    """A pooled keep-alive session, like the worker's."""
    with requests.Session() as s:
        yield s


def post(
    s: requests.Session,
    stub: ProviderStub,
    body: object,
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> requests.Response:
    """POST a backfill call to the stub."""
    return s.post(
        stub.url + "/postback/backfill",
        data=json.dumps(body),
        headers=headers or signed_headers(),
        timeout=timeout,
    )


def control(stub: ProviderStub, path: str) -> str:
    """The URL of a control endpoint (they live at the server root)."""
    return stub.url.removesuffix("/sms") + path


def test_published_sign_vector_is_accepted(session: requests.Session) -> None:
    assert md5_sign(VECTOR_KEY, VECTOR_SECRET, VECTOR_TIMESTAMP) == VECTOR_SIGN
    headers = signed_headers(VECTOR_TIMESTAMP)
    assert headers["Sign"] == VECTOR_SIGN
    # A 2021 timestamp is only fresh for a stub that allows any skew.
    with ProviderStub(VECTOR_KEY, VECTOR_SECRET, max_skew_s=10**10) as stub:
        answer = post(session, stub, record(), headers)
    assert answer.status_code == 200
    assert answer.json() == {"status": "0", "reason": "success"}


def test_valid_request_is_accepted_and_recorded(
    provider: ProviderStub, session: requests.Session
) -> None:
    headers = signed_headers()
    answer = post(session, provider, record("m-ok"), headers)
    assert answer.json() == {"status": "0", "reason": "success"}
    [seen] = provider.requests()
    assert {k: seen[k] for k in ("appId", "msgid", "number", "time")} == record("m-ok")
    assert seen["timestamp"] == headers["Timestamp"]
    assert isinstance(seen["received_at"], float)


def test_msgid_is_optional(provider: ProviderStub, session: requests.Session) -> None:
    assert post(session, provider, record(None)).json()["status"] == "0"
    assert provider.requests()[0]["msgid"] is None


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        ({"Sign": "0" * 32}, "-1", "sign error"),
        ({"Api-Key": "someone-else"}, "-1", "auth error"),
        ({"Timestamp": "1630468800"}, "-16", "timestamp expired"),
        ({"Timestamp": "soon"}, "-16", "timestamp expired"),
        ({"Content-Type": "text/plain"}, "-22", None),
    ],
)
def test_bad_headers_are_refused(
    provider: ProviderStub,
    session: requests.Session,
    change: dict[str, str],
    status: str,
    reason: str | None,
) -> None:
    answer = post(session, provider, record(), signed_headers() | change)
    assert answer.status_code == 200
    assert answer.json()["status"] == status
    if reason is not None:
        assert answer.json()["reason"] == reason
    assert provider.requests() == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"appId": "app1", "time": "t"}, "-14"),
        (record(number=""), "-14"),
        (record(extra="x"), "-22"),
        (record(number=8613800000000), "-22"),
        ([record()], "-22"),
    ],
)
def test_bad_bodies_are_refused(
    provider: ProviderStub, session: requests.Session, body: object, status: str
) -> None:
    assert post(session, provider, body).json()["status"] == status
    assert provider.requests() == []


def test_invalid_json_is_a_parameter_error(
    provider: ProviderStub, session: requests.Session
) -> None:
    url = provider.url + "/postback/backfill"
    answer = session.post(url, data=b"{not json", headers=signed_headers(), timeout=TIMEOUT)
    assert answer.json()["status"] == "-22"


def test_same_record_twice_is_data_existing(
    provider: ProviderStub, session: requests.Session
) -> None:
    assert post(session, provider, record("m-dup")).json()["status"] == "0"
    assert post(session, provider, record("m-dup")).json() == {
        "status": "-20",
        "reason": "data existing",
    }
    stats = provider.stats()
    assert (stats["accepted"], stats["unique"], stats["duplicates"]) == (1, 1, 1)


def plan_by_endpoint(stub: ProviderStub, by_msgid: dict[str, list[str]]) -> None:
    """Script answers the way a test in another process would."""
    with requests.Session() as s:
        answer = s.post(control(stub, "/_stub/plan"), json={"by_msgid": by_msgid}, timeout=TIMEOUT)
    assert answer.status_code == 200


def plan_in_process(stub: ProviderStub, by_msgid: dict[str, list[str]]) -> None:
    """Script answers through the Python API."""
    stub.set_plan(by_msgid)


planners = pytest.mark.parametrize("plan", [plan_in_process, plan_by_endpoint])


@planners
@pytest.mark.parametrize(
    ("step", "http_status", "header"),
    [("500", 500, None), ("503", 503, None), ("429", 429, "1"), ("429:7", 429, "7")],
)
def test_http_faults(
    provider: ProviderStub,
    session: requests.Session,
    plan: Any,
    step: str,
    http_status: int,
    header: str | None,
) -> None:
    plan(provider, {"m-f": [step]})
    answer = post(session, provider, record("m-f"))
    assert answer.status_code == http_status
    assert answer.headers.get("Retry-After") == header
    assert provider.requests() == []
    assert provider.stats()["faults"] == dict.fromkeys(FAULT_KINDS, 0) | {step[:3]: 1}


@planners
def test_drop_closes_without_an_answer(
    provider: ProviderStub, session: requests.Session, plan: Any
) -> None:
    plan(provider, {"m-drop": ["drop"]})
    with pytest.raises(requests.ConnectionError):
        post(session, provider, record("m-drop"))
    assert provider.requests() == []
    # The plan is used up: the retry goes through on a fresh connection.
    assert post(session, provider, record("m-drop")).json()["status"] == "0"


@planners
def test_nonjson_answer(provider: ProviderStub, session: requests.Session, plan: Any) -> None:
    plan(provider, {"m-html": ["nonjson"]})
    answer = post(session, provider, record("m-html"))
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/html")
    assert answer.text == "<html>gateway</html>"


@planners
def test_scripted_status_codes(
    provider: ProviderStub, session: requests.Session, plan: Any
) -> None:
    plan(provider, {"m-st": ["status:-9", "status", "ok"]})
    assert post(session, provider, record("m-st")).json() == {"status": "-9", "reason": "injected"}
    assert post(session, provider, record("m-st")).json()["status"] in {"-12", "-15", "-18", "-23"}
    assert post(session, provider, record("m-st")).json()["status"] == "0"
    assert provider.stats()["faults"] == dict.fromkeys(FAULT_KINDS, 0) | {"status": 2}


@planners
def test_slow_answer_times_out_but_is_recorded(
    provider: ProviderStub, session: requests.Session, plan: Any
) -> None:
    plan(provider, {"m-slow": ["slow:1"]})
    with pytest.raises(requests.ReadTimeout):
        post(session, provider, record("m-slow"), timeout=0.2)
    assert [r["msgid"] for r in provider.requests()] == ["m-slow"]
    # The client's retry finds it already there, as with the real provider.
    assert post(session, provider, record("m-slow")).json()["status"] == "-20"


def test_plan_steps_run_in_order_then_normal(
    provider: ProviderStub, session: requests.Session
) -> None:
    provider.set_plan({"m-seq": ["500", "ok", "503"]})
    codes = [post(session, provider, record("m-seq")).status_code for _ in range(4)]
    assert codes == [500, 200, 503, 200]
    assert [r["msgid"] for r in provider.requests()] == ["m-seq"]


def test_bad_plans_are_refused(provider: ProviderStub, session: requests.Session) -> None:
    with pytest.raises(ValueError, match="unknown"):
        provider.set_plan({"m": ["teapot"]})
    bad_plans: list[object] = [{"by_msgid": {"m": ["slow:x"]}}, {"by_msgid": {"m": "500"}}, []]
    for bad in bad_plans:
        answer = session.post(control(provider, "/_stub/plan"), json=bad, timeout=TIMEOUT)
        assert answer.status_code == 400


def test_parse_step() -> None:
    assert parse_step("429:5") == ("429", "5")
    assert parse_step("status:-9") == ("status", "-9")
    assert parse_step("drop") == ("drop", None)
    for bad in ("500:1", "slow:-1", "429:x", "nope"):
        with pytest.raises(ValueError, match="stub step"):
            parse_step(bad)


def test_fault_rate_one_always_faults(session: requests.Session) -> None:
    with ProviderStub(VECTOR_KEY, VECTOR_SECRET, fault_rate=1.0, faults=["500"]) as stub:
        codes = [post(session, stub, record(f"m{i}")).status_code for i in range(3)]
        stats = stub.stats()
    assert codes == [500, 500, 500]
    assert stats["requests"] == 3
    assert stats["accepted"] == 0
    assert stats["faults"] == dict.fromkeys(FAULT_KINDS, 0) | {"500": 3}


def test_stats_count_everything(provider: ProviderStub, session: requests.Session) -> None:
    post(session, provider, record("a"))
    post(session, provider, record("a"))
    post(session, provider, record("b"), signed_headers() | {"Sign": "f" * 32})
    provider.set_plan({"c": ["503"]})
    post(session, provider, record("c"))
    expected = {
        "requests": 4,
        "accepted": 1,
        "unique": 1,
        "duplicates": 1,
        "faults": dict.fromkeys(FAULT_KINDS, 0) | {"503": 1},
        "codes": {"0": 1, "-20": 1, "-1": 1},
    }
    assert provider.stats() == expected
    assert session.get(control(provider, "/_stub/stats"), timeout=TIMEOUT).json() == expected
    remote = session.get(control(provider, "/_stub/requests"), timeout=TIMEOUT).json()
    assert remote == provider.requests()


@pytest.mark.parametrize("via", ["method", "endpoint"])
def test_reset_forgets_everything(
    provider: ProviderStub, session: requests.Session, via: str
) -> None:
    post(session, provider, record("r"))
    provider.set_plan({"r": ["500"]})
    if via == "method":
        provider.reset()
    else:
        assert session.post(control(provider, "/_stub/reset"), timeout=TIMEOUT).ok
    assert provider.requests() == []
    assert provider.stats()["requests"] == 0
    assert post(session, provider, record("r")).json()["status"] == "0"


def test_health_and_unknown_routes(provider: ProviderStub, session: requests.Session) -> None:
    assert session.get(control(provider, "/healthz"), timeout=TIMEOUT).json() == {"ok": True}
    assert session.get(provider.url + "/postback/backfill", timeout=TIMEOUT).status_code == 404
    assert session.post(control(provider, "/nope"), json={}, timeout=TIMEOUT).status_code == 404
    assert session.delete(control(provider, "/healthz"), timeout=TIMEOUT).status_code == 404
    assert provider.stats()["requests"] == 0


def test_answers_never_echo_the_sign_or_secret(
    provider: ProviderStub, session: requests.Session
) -> None:
    headers = signed_headers()
    bad = headers | {"Sign": "a" * 32}
    answers = [post(session, provider, record("e"), h) for h in (headers, bad)]
    answers.append(session.get(control(provider, "/_stub/requests"), timeout=TIMEOUT))
    answers.append(session.get(control(provider, "/_stub/stats"), timeout=TIMEOUT))
    for answer in answers:
        text = answer.text + json.dumps(dict(answer.headers))
        assert VECTOR_SECRET not in text
        assert headers["Sign"] not in text
        assert "a" * 32 not in text


def test_stop_is_idempotent_and_frees_idle_connections(session: requests.Session) -> None:
    stub = ProviderStub(VECTOR_KEY, VECTOR_SECRET).start()
    assert post(session, stub, record()).json()["status"] == "0"  # leaves a keep-alive open
    # and one kept alive on a socket of the test's own: its handler waits for the next request
    host, port = stub.url.removeprefix("http://").split("/")[0].split(":")
    idle = socket.create_connection((host, int(port)), timeout=30)
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: stub\r\n\r\n")
    answer = b""
    while not answer.endswith(b'{"ok": true}'):
        answer += idle.recv(65536)
    stub.stop()
    stub.stop()
    # stop() did not give up on its serving thread (its join waits 5 s at most), and cut
    # the idle connection, which would otherwise wait for a request forever
    assert stub._thread is not None
    assert not stub._thread.is_alive()
    with idle:
        assert idle.recv(65536) == b""  # the end, not the 30 s timeout
    with socket.socket() as again:  # and the port is free (TIME_WAIT aside: nothing listens)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind((host, int(port)))
        again.listen()
