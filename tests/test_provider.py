"""The signed call: the provider's test vector, headers, body, answer classification."""

from __future__ import annotations

import json

import pytest
import requests

from worker.deliver.policy import AnswerClass
from worker.deliver.provider import (
    ProviderClient,
    build_body,
    build_headers,
    classify_exception,
    classify_response,
    parse_retry_after,
    sign,
)
from worker.enqueue.record import BackfillRecord


def test_sign_matches_the_providers_published_vector() -> None:
    assert sign("bDqJFiq9", "7bz1lzh9", "1630468800") == "05d7a50893e22a5c4bb3216ae3396c7c"


def test_headers_are_signed_with_the_timestamp_they_carry() -> None:
    headers = build_headers("bDqJFiq9", "7bz1lzh9", now=1630468800.9)
    assert headers == {
        "Content-Type": "application/json;charset=UTF-8",
        "Api-Key": "bDqJFiq9",
        "Timestamp": "1630468800",
        "Sign": "05d7a50893e22a5c4bb3216ae3396c7c",
    }


def test_each_attempt_gets_a_fresh_timestamp_and_sign() -> None:
    first = build_headers("k", "s", now=1_700_000_000)
    later = build_headers("k", "s", now=1_700_000_003)
    assert first["Timestamp"] != later["Timestamp"]
    assert first["Sign"] != later["Sign"]


def test_body_is_compact_json_of_strings() -> None:
    record = BackfillRecord("app", "8613512345678", "1681184764000", msgid="m1")
    assert json.loads(build_body(record)) == {
        "appId": "app",
        "msgid": "m1",
        "number": "8613512345678",
        "time": "1681184764000",
    }
    assert b"msgid" not in build_body(BackfillRecord("app", "8613512345678", "1681184764000"))


@pytest.mark.parametrize(
    ("http", "body", "kind"),
    [
        (200, b'{"status": "0", "reason": "success"}', AnswerClass.SUCCESS),
        (200, b'{"status": 0}', AnswerClass.SUCCESS),
        (200, b'{"status": "-20", "reason": "data existing"}', AnswerClass.DUPLICATE),
        (200, b'{"status": "-12"}', AnswerClass.TRANSIENT),
        (200, b'{"status": "-9"}', AnswerClass.BAD_RECORD),
        (200, b'{"status": "-1", "reason": "auth error"}', AnswerClass.BLOCKED),
        (200, b"<html>gateway</html>", AnswerClass.TRANSIENT),
        (200, b'{"reason": "no status"}', AnswerClass.TRANSIENT),
        (200, b"[1, 2]", AnswerClass.TRANSIENT),
        (500, b'{"status": "0"}', AnswerClass.TRANSIENT),
        (429, b"", AnswerClass.TRANSIENT),
        (403, b'{"status": "0"}', AnswerClass.BAD_RECORD),
    ],
)
def test_answers_are_classified(http: int, body: bytes, kind: AnswerClass) -> None:
    assert classify_response(http, body, {}).kind is kind


def test_retry_after_is_read_from_the_answer() -> None:
    answer = classify_response(429, b"", {"Retry-After": "7"})
    assert answer.retry_after_s == 7
    assert answer.error == "HTTP 429"
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("exc", "word"),
    [
        (requests.ConnectTimeout(), "timeout"),
        (requests.ReadTimeout(), "timeout"),
        (requests.ConnectionError(), "connection"),
        (requests.exceptions.SSLError(), "tls"),
        (requests.exceptions.ChunkedEncodingError(), "transport"),
    ],
)
def test_transport_failures_are_transient(exc: Exception, word: str) -> None:
    answer = classify_exception(exc)
    assert answer.kind is AnswerClass.TRANSIENT
    assert answer.error is not None
    assert answer.error.startswith(word)


def test_session_reads_proxies_and_ca_bundle_once_and_keeps_tls_verified(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    plain = ProviderClient("https://api.example.test/sms", "key", "secret")._session()
    assert plain.verify is True
    assert plain.trust_env is False  # the environment is not re-read on every request
    assert "https" not in plain.proxies

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/corp-ca.pem")
    proxied = ProviderClient("https://api.example.test/sms", "key", "secret")._session()
    assert proxied.proxies["https"] == "http://proxy.internal:3128"
    assert proxied.verify == "/etc/ssl/corp-ca.pem"  # a CA bundle, never False

    monkeypatch.setenv("NO_PROXY", "api.example.test")
    bypass = ProviderClient("https://api.example.test/sms", "key", "secret")._session()
    assert "https" not in bypass.proxies
