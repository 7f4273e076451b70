"""The provider stub's HTTP side: a threading server and its request handler.

The handler parses what arrives and asks its ``Backend`` what to answer: the
``ProviderStub`` (``stub.py``) is one, holding the plans, faults, checks and records.
This module does not import the stub; the stub imports it. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from collections.abc import Callable, Mapping
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any, Protocol, cast


class Backend(Protocol):
    """What the HTTP side asks of the stub behind it."""

    backfill_path: str
    verbose: bool

    def stats(self) -> dict[str, object]: ...
    def requests(self) -> list[dict[str, object]]: ...
    def seen(self) -> list[dict[str, object]]: ...
    def seen_at(self) -> dict[str, float]: ...
    def reset(self) -> None: ...
    def set_plan(self, by_msgid: Mapping[str, list[str]]) -> None: ...
    def track(self, conn: socket.socket, *, open_: bool) -> None: ...
    def delay(self, enter: bool) -> float: ...
    def wait(self, seconds: float) -> None: ...
    def next_step(self, payload: object) -> tuple[str, str]: ...
    def note(self, payload: object, stamp: str, step: str) -> None: ...
    def count_code(self, code: str) -> None: ...
    def process(self, headers: Message[str, str], payload: object) -> tuple[str, str]: ...


_MAX_BODY = 1 << 20
# GET routes that read the stub's state
_VIEWS: dict[str, Callable[[Backend], object]] = {
    "/healthz": lambda _: {"ok": True},
    "/_stub/stats": lambda stub: stub.stats(),
    "/_stub/requests": lambda stub: stub.requests(),
    "/_stub/seen": lambda stub: stub.seen(),
    "/_stub/seen_at": lambda stub: stub.seen_at(),
}
INVALID = object()  # what a body that is not JSON parses to


def _parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return INVALID


def cut(conn: socket.socket) -> None:
    """Shut a connection down both ways without a word; one already gone is fine."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class StubServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not hold up stop()
    request_queue_size = 1024  # benchmarks open many pooled connections at once

    def __init__(self, address: tuple[str, int], stub: Backend) -> None:
        self.stub = stub
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the host up with getfqdn (reverse DNS): slow, useless.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # clients hanging up (timeouts, dropped connections) is routine here
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the pooled client expects
    disable_nagle_algorithm = True  # headers and body are two writes; Nagle would stall the body
    server_version = "provider-stub"
    sys_version = ""

    @property
    def stub(self) -> Backend:
        """The stub this connection belongs to."""
        return cast(StubServer, self.server).stub

    def setup(self) -> None:
        """Track the connection so ``stop()`` can cut it."""
        super().setup()
        self.stub.track(self.connection, open_=True)

    def finish(self) -> None:
        """Untrack the connection."""
        try:
            super().finish()
        finally:
            self.stub.track(self.connection, open_=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet unless verbose; never resolves the client's name."""
        if self.stub.verbose:
            sys.stderr.write(f"{self.client_address[0]} - {format % args}\n")

    def do_GET(self) -> None:
        """Health and the control endpoints that read state."""
        view = _VIEWS.get(self.path.partition("?")[0])
        if view is None:
            self._not_found()
        elif self._read_body() is not None:
            self._json(200, view(self.stub))

    def do_POST(self) -> None:
        """The backfill call and the control endpoints that change state."""
        route = self.path.partition("?")[0]
        body = self._read_body()
        if body is None:
            return
        if route == self.stub.backfill_path:
            self._backfill(body)
        elif route == "/_stub/plan":
            self._plan(body)
        elif route == "/_stub/reset":
            self.stub.reset()
            self._json(200, {"ok": True})
        else:
            self._json(404, {"error": "not found"})

    def _not_found(self) -> None:
        """Any other path or method: drain the body (keep-alive) and answer 404."""
        if self._read_body() is not None:
            self._json(404, {"error": "not found"})

    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _not_found

    def _backfill(self, body: bytes) -> None:
        delay = self.stub.delay(enter=True)
        try:
            if delay > 0:  # a provider far away, or one slowing down under load
                self.stub.wait(delay)
            self._answer(body)
        finally:
            self.stub.delay(enter=False)

    def _answer(self, body: bytes) -> None:
        stub = self.stub
        payload = _parse_json(body)
        kind, arg = stub.next_step(payload)
        stub.note(payload, self.headers.get("Timestamp", ""), kind)
        if kind == "drop":
            self.close_connection = True
            cut(self.connection)
        elif kind in ("500", "503"):
            self._json(int(kind), {"error": f"injected {kind}"})
        elif kind == "429":
            self._json(429, {"error": "too many requests"}, {"Retry-After": arg})
        elif kind == "redirect":
            self._send(302, b"", "text/plain", {"Location": "https://elsewhere.invalid/sms"})
        elif kind == "nonjson":
            self._send(200, b"<html>gateway</html>", "text/html")
        elif kind == "status":
            stub.count_code(arg)
            self._json(200, {"status": arg, "reason": "injected"})
        else:
            code, reason = stub.process(self.headers, payload)
            if kind == "slow":  # recorded already, as the provider would have; answer too late
                stub.wait(float(arg))
            stub.count_code(code)
            self._json(200, {"status": code, "reason": reason})

    def _plan(self, body: bytes) -> None:
        payload = _parse_json(body)
        plans = payload.get("by_msgid") if isinstance(payload, dict) else None
        if not isinstance(plans, dict) or not all(
            isinstance(steps, list) and all(isinstance(s, str) for s in steps)
            for steps in plans.values()
        ):
            self._json(400, {"error": 'expected {"by_msgid": {msgid: [step, ...]}}'})
            return
        try:
            self.stub.set_plan(plans)
        except ValueError as exc:
            self._json(400, {"error": str(exc)})
            return
        self._json(200, {"ok": True, "planned": len(plans)})

    def _read_body(self) -> bytes | None:
        """The request body, or ``None`` after answering a body this stub cannot frame."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if "Transfer-Encoding" in self.headers or not 0 <= length <= _MAX_BODY:
            self.close_connection = True  # the rest of the stream cannot be trusted
            self._json(411, {"error": "a Content-Length up to 1 MiB is required"})
            return None
        return self.rfile.read(length) if length else b""

    def _json(self, status: int, value: object, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), "application/json", headers)

    def _send(
        self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
