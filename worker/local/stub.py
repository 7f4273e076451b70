"""The local provider stub (SPEC section 7): a stand-in for ``POST {base}/postback/backfill``.

It checks headers, sign and body the way the provider does, records every request it
accepted, and injects faults (non-zero statuses, HTTP 500/503/429, slow answers, dropped
connections, non-JSON bodies) at random or scripted per ``msgid``. Tests, the demo and
the benchmarks use it; it never stands in for the real provider in production.
Standard library only, so a bare interpreter can run it.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from email.message import Message
from types import TracebackType
from typing import cast

from worker.local.stub_server import INVALID, StubServer, cut

# What ``backfill stub`` expects when no credentials are given: made up, for this machine.
LOCAL_API_KEY, LOCAL_API_SECRET = "local-test-key", "local-test-secret-not-for-production"
FAULT_KINDS = ("status", "500", "503", "429", "slow", "drop", "nonjson")
# Scripted only (never a random fault): a redirect, which pauses the whole fleet.
_STEP_KINDS = frozenset((*FAULT_KINDS, "ok", "redirect"))
_FIELDS = frozenset(("appId", "msgid", "number", "time"))
_REQUIRED = ("appId", "number", "time")

Step = tuple[str, str | None]


def parse_step(step: str) -> Step:
    """Split a plan step or fault kind like ``"429:5"`` into ``("429", "5")``; reject bad ones."""
    kind, sep, arg = step.partition(":")
    if kind not in _STEP_KINDS or (sep and kind not in ("status", "429", "slow")):
        raise ValueError(f"unknown stub step {step!r}")
    if not sep:
        return kind, None
    try:
        number = float(arg) if kind == "slow" else int(arg)
    except ValueError:
        raise ValueError(f"bad argument in stub step {step!r}") from None
    if kind != "status" and not 0 <= number <= 3600:
        raise ValueError(f"argument out of range in stub step {step!r}")
    return kind, arg


def _check_body(payload: object) -> tuple[str, str] | None:
    """The provider's body checks: ``None`` when the body is acceptable."""
    if payload is INVALID:
        return "-22", "body is not JSON"
    if not isinstance(payload, dict):
        return "-22", "body must be a JSON object"
    unknown = sorted(payload.keys() - _FIELDS)
    if unknown:
        return "-22", f"unknown field {unknown[0]}"
    for name, value in payload.items():
        if not isinstance(value, str):
            return "-22", f"{name} must be a string"
    for name in _REQUIRED:
        if not payload.get(name):
            return "-14", f"{name} is empty"
    return None


class ProviderStub:
    """The provider stand-in: binds when built, serves on ``start()`` or ``serve_forever()``."""

    _records: list[dict[str, object]]
    _log: list[dict[str, object]]
    _seen: set[tuple[str, str | None, str, str]]
    _plans: dict[str, deque[Step]]
    _counts: dict[str, int]
    _faults: dict[str, int]
    _codes: dict[str, int]
    _down: Step | None

    def __init__(
        self,
        api_key: str,
        api_secret: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        base_path: str = "/sms",
        fault_rate: float = 0.0,
        faults: Sequence[str] = FAULT_KINDS,
        slow_s: float = 20.0,
        latency_s: float = 0.0,
        retry_after_s: int = 1,
        transient_codes: Sequence[str] = ("-12", "-15", "-18", "-23"),
        max_skew_s: int = 300,
        seed: int | None = None,
        verbose: bool = False,
    ) -> None:
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError("fault_rate must be between 0 and 1")
        self._fault_steps = [parse_step(f) for f in faults]
        if fault_rate > 0 and not self._fault_steps:
            raise ValueError("fault_rate > 0 needs at least one fault kind")
        self._api_key = api_key
        self._sign_prefix = (api_key + api_secret).encode()  # the secret stays inside this
        base = base_path.strip("/")
        self._base_path = f"/{base}" if base else ""
        self.backfill_path = f"{self._base_path}/postback/backfill"
        self._fault_rate = fault_rate
        self._slow_s = slow_s
        if not 0.0 <= latency_s <= 60.0:
            raise ValueError("latency_s must be between 0 and 60 seconds")
        self._latency = (latency_s, 0.0)
        self._in_flight = 0
        self._retry_after_s = retry_after_s
        self._transient_codes = tuple(transient_codes) or ("-12",)
        self._max_skew_s = max_skew_s
        self._random = random.Random(seed)
        self.verbose = verbose
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self._serving = False
        self.reset()
        self._server = StubServer((host, port), self)

    @property
    def url(self) -> str:
        """Base URL with the real bound port, e.g. ``http://127.0.0.1:54321/sms``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self._base_path}"

    def start(self) -> ProviderStub:
        """Serve in a daemon thread; returns self."""
        self._serving = True  # before the thread runs, so an early stop() still shuts it down
        self._thread = threading.Thread(
            target=self.serve_forever, name="provider-stub", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve until ``stop()`` (blocking; the CLI uses this)."""
        self._serving = True
        try:
            self._server.serve_forever(poll_interval=0.02)  # stop() waits up to one poll
        finally:
            self._serving = False

    def stop(self) -> None:
        """Stop serving, wake slow answers, cut open connections, release the port. Idempotent."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            connections = list(self._connections)
        if self._serving:
            self._server.shutdown()
        for conn in connections:  # idle keep-alive threads would otherwise wait for the client
            cut(conn)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ProviderStub:
        """Start serving (see ``start()``)."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop serving (see ``stop()``)."""
        self.stop()

    def stats(self) -> dict[str, object]:
        """Counters: requests, accepted, unique, duplicates, faults by kind, answers by code."""
        with self._lock:
            return {
                **self._counts,
                "unique": len(self._seen),
                "faults": dict(self._faults),
                "codes": dict(self._codes),
            }

    def requests(self) -> list[dict[str, object]]:
        """Copies of the accepted requests, oldest first."""
        with self._lock:
            return [dict(r) for r in self._records]

    def seen(self) -> list[dict[str, object]]:
        """Every request on the backfill path, faulted or not: msgid, Timestamp, step."""
        with self._lock:
            return [dict(r) for r in self._log]

    def set_plan(self, by_msgid: Mapping[str, Sequence[str]]) -> None:
        """Script the next answers per msgid (merged into existing plans); ``"ok"`` is normal."""
        parsed = {msgid: deque(parse_step(s) for s in steps) for msgid, steps in by_msgid.items()}
        with self._lock:
            self._plans.update(parsed)

    def set_down(self, kind: str | None) -> None:
        """Answer every request with fault ``kind`` (e.g. ``"503"``, ``"drop"``, or
        ``"status:-1"`` for an account block) until it is set back to None: the provider
        is down. Plans and the fault rate wait meanwhile."""
        step = None if kind is None else parse_step(kind)
        if step is not None and (step[0] == "ok" or (step[0] == "status" and step[1] is None)):
            raise ValueError(f"a provider that is down does not answer {kind!r}")
        with self._lock:
            self._down = step

    def set_latency(self, base_s: float, per_request_s: float = 0.0) -> None:
        """Answer every backfill call after ``base_s`` plus ``per_request_s`` for each
        request in flight at the stub when it arrived (a provider that slows down under
        load); ``set_latency(0)`` answers at once again. A far-away provider is a fixed
        ``base_s``."""
        for name, value in (("base_s", base_s), ("per_request_s", per_request_s)):
            if not 0.0 <= value <= 60.0:
                raise ValueError(f"{name} must be between 0 and 60 seconds")
        with self._lock:
            self._latency = (base_s, per_request_s)

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when the stub stops (slow answers must not hold it up)."""
        self._stopping.wait(seconds)

    def delay(self, enter: bool) -> float:
        """Count a backfill call in (``enter``) or out; on the way in, how long it waits."""
        with self._lock:
            if not enter:
                self._in_flight -= 1
                return 0.0
            self._in_flight += 1
            base, per_request = self._latency
            return base + per_request * (self._in_flight - 1)

    def reset(self) -> None:
        """Forget records, counters and plans; the provider is up."""
        with self._lock:
            self._down = None
            self._records = []
            self._log = []
            self._seen = set()
            self._plans = {}
            self._counts = {"requests": 0, "accepted": 0, "duplicates": 0}
            self._faults = dict.fromkeys(FAULT_KINDS, 0)
            self._codes = {}

    def next_step(self, payload: object) -> tuple[str, str]:
        """Count the request and choose its fate: a scripted step, a random fault, or ``ok``."""
        msgid = payload.get("msgid") if isinstance(payload, dict) else None
        with self._lock:
            self._counts["requests"] += 1
            plan = self._plans.get(msgid) if isinstance(msgid, str) else None
            if self._down is not None:
                kind, arg = self._down
            elif plan is not None:
                kind, arg = plan.popleft() if plan else ("ok", None)
            elif self._fault_rate and self._random.random() < self._fault_rate:
                kind, arg = self._random.choice(self._fault_steps)
            else:
                return "ok", ""
            if kind != "ok":
                self._faults[kind] = self._faults.get(kind, 0) + 1
            if kind == "status" and arg is None:
                arg = self._random.choice(self._transient_codes)
        defaults = {"429": str(self._retry_after_s), "slow": str(self._slow_s)}
        return kind, arg if arg is not None else defaults.get(kind, "")

    def process(self, headers: Message[str, str], payload: object) -> tuple[str, str]:
        """The provider's checks in its order; records the request when it is accepted."""
        now = time.time()
        if not headers.get("Content-Type", "").lower().startswith("application/json"):
            return "-22", "content type must be application/json"
        if headers.get("Api-Key") != self._api_key:
            return "-1", "auth error"
        stamp = headers.get("Timestamp", "")
        fresh = stamp.isascii() and stamp.isdigit() and len(stamp) <= 12
        if not fresh or abs(now - int(stamp)) > self._max_skew_s:
            return "-16", "timestamp expired"
        expected = hashlib.md5(self._sign_prefix + stamp.encode()).hexdigest().encode()
        if not hmac.compare_digest(headers.get("Sign", "").encode(), expected):
            return "-1", "sign error"
        problem = _check_body(payload)
        if problem is not None:
            return problem
        body = cast(dict[str, str], payload)
        key = (body["appId"], body.get("msgid"), body["number"], body["time"])
        with self._lock:
            if key in self._seen:
                self._counts["duplicates"] += 1
                return "-20", "data existing"
            self._seen.add(key)
            self._counts["accepted"] += 1
            self._records.append({**body, "msgid": key[1], "timestamp": stamp, "received_at": now})
        return "0", "success"

    def note(self, payload: object, stamp: str, step: str) -> None:
        """Log a request on the backfill path, whatever its fate."""
        msgid = payload.get("msgid") if isinstance(payload, dict) else None
        with self._lock:
            self._log.append({"msgid": msgid, "timestamp": stamp, "step": step, "at": time.time()})

    def seen_at(self) -> dict[str, float]:
        """When each msgid first reached the backfill path (epoch seconds)."""
        with self._lock:
            first: dict[str, float] = {}
            for entry in self._log:
                msgid = entry["msgid"]
                if isinstance(msgid, str) and msgid not in first:
                    first[msgid] = cast(float, entry["at"])
            return first

    def count_code(self, code: str) -> None:
        """Count an answer's provider status code."""
        with self._lock:
            self._codes[code] = self._codes.get(code, 0) + 1

    def track(self, conn: socket.socket, *, open_: bool) -> None:
        """Remember an open connection (``stop()`` cuts them) or forget a closed one."""
        with self._lock:
            if open_:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)
