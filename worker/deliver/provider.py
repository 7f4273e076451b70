"""The signed provider call (SPEC section 1): build, send, classify. No Celery, no Redis.

Every answer is hostile until parsed (SPEC section 8): redirects are never followed, an
attempt ends by a hard deadline (connect + read timeout) whatever the server does, the
body is read up to ``MAX_BODY`` bytes after decompression, the ``status`` must be what
the provider documents, and every piece of provider text passes ``worker.operate.redact``.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import json
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import requests
import urllib3

from worker.deliver.deadline import DeadlineExceeded, Watchdog, WatchedAdapter
from worker.deliver.policy import DEFAULT_CODE_CLASSES, AnswerClass, classify_code, classify_http
from worker.enqueue.record import BackfillRecord
from worker.operate.clock import clock
from worker.operate.redact import cap, redact

PATH = "/postback/backfill"
CONTENT_TYPE = "application/json;charset=UTF-8"
# The provider answers with a few dozen bytes; anything past this is not an answer.
MAX_BODY = 64 * 1024
_CHUNK = 16 * 1024
_STATUS = re.compile(r"-?[0-9]{1,9}")
_DELTA_SECONDS = re.compile(r"[0-9]{1,10}")
_EXCERPT = 60

Scrub = Callable[[str], str]


def sign(api_key: str, api_secret: str, timestamp: str) -> str:
    """The provider's Sign: lowercase hex MD5 of key + secret + timestamp (UTF-8)."""
    return hashlib.md5((api_key + api_secret + timestamp).encode()).hexdigest()


def build_headers(api_key: str, api_secret: str, now: float | None = None) -> dict[str, str]:
    """Fresh headers for one attempt; the timestamp is taken now (by the shared clock),
    never reused."""
    timestamp = str(int(clock.now() if now is None else now))
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


def _same(text: str) -> str:
    return cap(text)


def parse_status(value: object) -> str | None:
    """The provider's ``status`` as documented (an int, or ASCII digits with an optional
    leading minus), normalised to its string form; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        return None
    if not _STATUS.fullmatch(text):
        return None
    return str(int(text))


def classify_response(
    http_status: int,
    body: bytes,
    headers: Mapping[str, str],
    table: Mapping[str, AnswerClass] = DEFAULT_CODE_CLASSES,
    scrub: Scrub = _same,
) -> Answer:
    """Classify an HTTP answer: HTTP status first, then the JSON ``status`` code."""
    retry_after = parse_retry_after(headers.get("Retry-After"))
    if 300 <= http_status < 400:
        # A redirect is never followed: credentials and the record go to the base URL only.
        # Every delivery would meet it, so it pauses the fleet like an account block (unless
        # the provider accepted another record meanwhile: then it is this record's own).
        where = scrub(headers.get("Location") or "no Location")
        return Answer(
            AnswerClass.BLOCKED,
            http_status=http_status,
            error=f"HTTP {http_status} redirect to {where} (not followed: check BACKFILL_BASE_URL)",
        )
    by_http = classify_http(http_status)
    if by_http is not None:
        return Answer(
            by_http, http_status=http_status, error=f"HTTP {http_status}", retry_after_s=retry_after
        )
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        excerpt = scrub(body[:_EXCERPT].decode("utf-8", "replace"))
        return Answer(
            AnswerClass.TRANSIENT, http_status=http_status, error=f"body is not JSON: {excerpt!r}"
        )
    if not isinstance(payload, dict) or "status" not in payload:
        return Answer(
            AnswerClass.TRANSIENT, http_status=http_status, error="JSON without a status field"
        )
    reason = payload.get("reason")
    reason_text = None if reason is None else scrub(str(reason))
    code = parse_status(payload["status"])
    if code is None:
        return Answer(
            AnswerClass.TRANSIENT,
            http_status=http_status,
            api_reason=reason_text,
            error=f"unknown answer: status {scrub(repr(payload['status']))}",
        )
    return Answer(
        classify_code(code, table),
        http_status=http_status,
        api_status=code,
        api_reason=reason_text,
        retry_after_s=retry_after,
    )


def _tls_reason(exc: BaseException) -> str:
    """The verification reason buried in a requests SSLError (expired, hostname, issuer)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return str(current.verify_message or current.reason or "certificate verify failed")
        if isinstance(current, ssl.SSLError):
            return str(current.reason or current.strerror or type(current).__name__)
        todo += [a for a in current.args if isinstance(a, BaseException)]
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
    return type(exc).__name__


def classify_exception(exc: BaseException, deadline_s: float | None = None) -> Answer:
    """Every transport failure is transient; the error names its kind, never headers."""
    if isinstance(exc, DeadlineExceeded):
        return Answer(
            AnswerClass.TRANSIENT,
            error=f"deadline exceeded: no complete answer within {deadline_s or 0:g} s",
        )
    if isinstance(exc, requests.Timeout):
        error = f"timeout: {type(exc).__name__}"
    elif isinstance(exc, requests.exceptions.SSLError):
        error = f"tls error: {cap(_tls_reason(exc), 120)}"
    elif isinstance(exc, requests.ConnectionError):
        error = f"connection error: {type(exc).__name__}"
    elif isinstance(exc, urllib3.exceptions.DecodeError):
        error = "bad compressed body: DecodeError"
    elif isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        error = f"timeout: {type(exc).__name__}"
    elif isinstance(exc, requests.RequestException | urllib3.exceptions.HTTPError):
        error = f"transport error: {type(exc).__name__}"
    else:
        error = f"unexpected error: {type(exc).__name__}"
    return Answer(AnswerClass.TRANSIENT, error=error)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: ASCII delta-seconds or an HTTP date; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and _DELTA_SECONDS.fullmatch(value):
        return float(value)
    if not value.isascii() or len(value) > 64:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    try:
        return max(0.0, when.timestamp() - clock.now())
    except (OverflowError, OSError, ValueError):
        return None


class BodyTooLarge(Exception):
    """The answer's body (after decompression) passed MAX_BODY."""


def read_capped(response: requests.Response, limit: int = MAX_BODY) -> bytes:
    """The body, decompressed, streamed in chunks and never more than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.raw.stream(_CHUNK, decode_content=True):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


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
        # The hard deadline of one attempt: whatever the server does, it ends by then.
        self.deadline_s = connect_timeout_s + read_timeout_s
        self._table = code_table
        self._on_sign = on_sign
        self._local = threading.local()
        self._watchdog = Watchdog()

    def __repr__(self) -> str:
        return f"ProviderClient(url={self.url!r})"

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = WatchedAdapter(pool_connections=1, pool_maxsize=2, max_retries=0)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
            # The environment (proxies, CA bundle) is read once here, not on every request:
            # requests' per-call environment merge was ~4% of worker CPU.
            session.proxies.update(requests.utils.get_environ_proxies(self.url))
            session.verify = ca_bundle() or True
            session.trust_env = False
            # Our answers are a few dozen bytes: ask for them plain (a compressed one is
            # still decoded, within MAX_BODY).
            session.headers["Accept-Encoding"] = "identity"
            self._local.session = session
        return session

    def send(self, record: BackfillRecord) -> Answer:
        """One attempt: fresh Timestamp and Sign, ended by the deadline, never raising."""
        headers = build_headers(self._api_key, self._api_secret)
        if self._on_sign is not None:
            self._on_sign(headers["Sign"])
        secrets = (self._api_key, self._api_secret, headers["Sign"])

        def scrub(text: str) -> str:
            return redact(text, secrets=secrets, number=record.number)

        started = time.perf_counter()
        try:
            answer = self._exchange(record, headers, scrub)
        except BodyTooLarge:
            answer = Answer(AnswerClass.TRANSIENT, error=f"body too large (over {MAX_BODY} bytes)")
        except Exception as exc:  # any failure of an attempt is an audited transient one
            answer = classify_exception(exc, self.deadline_s)
        latency_ms = round((time.perf_counter() - started) * 1000.0, 2)
        return dataclasses.replace(answer, latency_ms=latency_ms)

    def _exchange(self, record: BackfillRecord, headers: dict[str, str], scrub: Scrub) -> Answer:
        with self._watchdog.deadline(self.deadline_s):
            response = self._session().post(
                self.url,
                data=build_body(record),
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
                stream=True,
            )
            try:
                body = b"" if 300 <= response.status_code < 400 else read_capped(response)
            finally:
                response.close()  # a connection with unread body left is dropped, not reused
        clock.witness(response.headers.get("Date"), response.elapsed.total_seconds())
        return classify_response(response.status_code, body, response.headers, self._table, scrub)

    def close(self) -> None:
        """Close this thread's session (other threads' sessions close with their thread)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is not None:
            session.close()
            self._local.session = None


def ca_bundle() -> str | None:
    """The CA bundle requests will use: REQUESTS_CA_BUNDLE, else CURL_CA_BUNDLE, else None
    (certifi's). SSL_CERT_FILE is not read by requests."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None
