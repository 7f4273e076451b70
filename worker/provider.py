"""The signed provider call (SPEC section 1): build, send, classify. No Celery, no Redis."""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter

from worker.policy import DEFAULT_CODE_CLASSES, AnswerClass, classify_code, classify_http
from worker.record import BackfillRecord

PATH = "/postback/backfill"
CONTENT_TYPE = "application/json;charset=UTF-8"
_REASON_LIMIT = 200


def sign(api_key: str, api_secret: str, timestamp: str) -> str:
    """The provider's Sign: lowercase hex MD5 of key + secret + timestamp (UTF-8)."""
    return hashlib.md5((api_key + api_secret + timestamp).encode()).hexdigest()


def build_headers(api_key: str, api_secret: str, now: float | None = None) -> dict[str, str]:
    """Fresh headers for one attempt; the timestamp is taken now, never reused."""
    timestamp = str(int(time.time() if now is None else now))
    return {
        "Content-Type": CONTENT_TYPE,
        "Api-Key": api_key,
        "Timestamp": timestamp,
        "Sign": sign(api_key, api_secret, timestamp),
    }


def build_body(record: BackfillRecord) -> bytes:
    """The JSON body; msgid is left out when the producer has none."""
    return json.dumps(record.provider_body(), separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Answer:
    """What one attempt came to: its class and everything the audit line reports."""

    kind: AnswerClass
    http_status: int | None = None
    api_status: str | None = None
    api_reason: str | None = None
    error: str | None = None
    retry_after_s: float | None = None
    latency_ms: float = 0.0


def classify_response(
    http_status: int,
    body: bytes,
    headers: Mapping[str, str],
    table: Mapping[str, AnswerClass] = DEFAULT_CODE_CLASSES,
) -> Answer:
    """Classify an HTTP answer: HTTP status first, then the JSON ``status`` code."""
    retry_after = parse_retry_after(headers.get("Retry-After"))
    by_http = classify_http(http_status)
    if by_http is not None:
        return Answer(
            by_http,
            http_status=http_status,
            error=f"HTTP {http_status}",
            retry_after_s=retry_after,
        )
    try:
        payload = json.loads(body)
    except ValueError:
        return Answer(AnswerClass.TRANSIENT, http_status=http_status, error="body is not JSON")
    if not isinstance(payload, dict) or "status" not in payload:
        return Answer(
            AnswerClass.TRANSIENT, http_status=http_status, error="JSON without a status field"
        )
    code = str(payload["status"])
    reason = payload.get("reason")
    reason_text = None if reason is None else str(reason)[:_REASON_LIMIT]
    return Answer(
        classify_code(code, table),
        http_status=http_status,
        api_status=code,
        api_reason=reason_text,
        retry_after_s=retry_after,
    )


def classify_exception(exc: BaseException) -> Answer:
    """Every transport failure is transient; the error names its kind, never headers."""
    if isinstance(exc, requests.Timeout):
        kind = "timeout"
    elif isinstance(exc, requests.exceptions.SSLError):
        kind = "tls error"
    elif isinstance(exc, requests.ConnectionError):
        kind = "connection error"
    else:
        kind = "transport error"
    return Answer(AnswerClass.TRANSIENT, error=f"{kind}: {type(exc).__name__}")


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ProviderClient:
    """Sends signed backfill calls; one pooled keep-alive Session per thread, TLS verified."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        api_secret: str,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 15.0,
        code_table: Mapping[str, AnswerClass] = DEFAULT_CODE_CLASSES,
        on_sign: Callable[[str], None] | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + PATH
        self._api_key = api_key
        self._api_secret = api_secret
        self._timeout = (connect_timeout_s, read_timeout_s)
        self._table = code_table
        self._on_sign = on_sign
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"ProviderClient(url={self.url!r})"

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=2, max_retries=0)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
            # The environment (proxies, CA bundle) is read once here, not on every request:
            # requests' per-call environment merge was ~4% of worker CPU.
            session.proxies.update(requests.utils.get_environ_proxies(self.url))
            session.verify = (
                os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
            )
            session.trust_env = False
            self._local.session = session
        return session

    def send(self, record: BackfillRecord) -> Answer:
        """One attempt: fresh Timestamp and Sign, bounded by connect and read timeouts."""
        headers = build_headers(self._api_key, self._api_secret)
        if self._on_sign is not None:
            self._on_sign(headers["Sign"])
        started = time.perf_counter()
        try:
            response = self._session().post(
                self.url, data=build_body(record), headers=headers, timeout=self._timeout
            )
            body = response.content
        except requests.RequestException as exc:
            answer = classify_exception(exc)
        else:
            answer = classify_response(response.status_code, body, response.headers, self._table)
        latency_ms = round((time.perf_counter() - started) * 1000.0, 2)
        return dataclasses.replace(answer, latency_ms=latency_ms)

    def close(self) -> None:
        """Close this thread's session (other threads' sessions close with their thread)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is not None:
            session.close()
            self._local.session = None
