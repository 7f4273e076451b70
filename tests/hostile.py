"""A misbehaving provider for the hardening tests: raw sockets, scripted per msgid.

Unlike the stub (which behaves like the provider, with faults), this server does what a
broken or hostile peer does: redirect, trickle headers or a body a byte at a time, send
50 MB or a gzip bomb, nest JSON 100,000 deep, echo the request's credentials back, send
statuses the provider never documents. Each behaviour is a function that writes the
answer on the socket; ``plan(msgid, [behaviour, ...])`` scripts the next answers.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import ssl
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    """One request as the server read it."""

    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)

    @property
    def payload(self) -> dict[str, Any]:
        """The JSON body (empty when it is not a JSON object)."""
        try:
            value = json.loads(self.body)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


# A behaviour writes an answer (or misbehaves) and says whether the connection may go on.
Behaviour = Callable[[socket.socket, Request], bool]


def _head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def answer(
    status: int = 200, body: bytes | dict[str, Any] = b"", headers: dict[str, str] | None = None
) -> Behaviour:
    """A complete answer with a Content-Length."""
    raw = json.dumps(body).encode() if isinstance(body, dict) else body

    def send(conn: socket.socket, _: Request) -> bool:
        extra = list((headers or {}).items())
        conn.sendall(_head(status, [("Content-Length", str(len(raw))), *extra]) + raw)
        return True

    return send


def ok() -> Behaviour:
    """What the provider says when all is well."""
    return answer(200, {"status": "0", "reason": "success"})


def echo() -> Behaviour:
    """A bad-record answer whose reason echoes the request: key, Sign and the full number."""

    def send(conn: socket.socket, request: Request) -> bool:
        reason = (
            f"rejected Api-Key={request.headers.get('api-key')} "
            f"Sign={request.headers.get('sign')} number={request.payload.get('number')}"
        )
        return answer(200, {"status": "-9", "reason": reason})(conn, request)

    return send


def trickle(every_s: float, *, headers_too: bool = False, seconds: float = 60.0) -> Behaviour:
    """Headers (or just the status line) at once, then one byte every ``every_s``."""

    def send(conn: socket.socket, _: Request) -> bool:
        if headers_too:
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            drip = b"X-Drip: " + b"a" * 10_000
        else:
            conn.sendall(_head(200, [("Content-Length", "100000")]))
            drip = b" " * 100_000
        deadline = time.monotonic() + seconds
        with contextlib.suppress(OSError):
            for byte in drip:
                if time.monotonic() > deadline:
                    break
                conn.sendall(bytes([byte]))
                time.sleep(every_s)
        return False

    return send


def big_body(size: int) -> Behaviour:
    """A 200 whose body is ``size`` bytes of JSON-looking filler, sent as fast as it goes."""

    def send(conn: socket.socket, _: Request) -> bool:
        conn.sendall(_head(200, [("Content-Length", str(size))]))
        block = b" " * 65536
        with contextlib.suppress(OSError):
            for _ in range(size // len(block)):
                conn.sendall(block)
        return False

    return send


_bombs: dict[int, bytes] = {}


def gzip_bomb(inflated: int) -> Behaviour:
    """A gzip body that inflates to ``inflated`` bytes of zeros (about 1,000 to 1)."""
    if inflated not in _bombs:
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
        zeros = bytes(1 << 20)
        parts = [packer.compress(zeros) for _ in range(inflated >> 20)]
        _bombs[inflated] = b"".join(parts) + packer.flush()
    return answer(200, _bombs[inflated], {"Content-Encoding": "gzip"})


def bad_gzip() -> Behaviour:
    """A body that says gzip and is not."""
    return answer(200, b"this is not gzip at all", {"Content-Encoding": "gzip"})


def small_gzip() -> Behaviour:
    """A correct, small gzip answer: decoded, within the cap."""
    body = gzip.compress(json.dumps({"status": "0", "reason": "success"}).encode())
    return answer(200, body, {"Content-Encoding": "gzip"})


def many_headers(count: int = 150) -> Behaviour:
    """More headers than http.client accepts (100): an exception deep in the client."""

    def send(conn: socket.socket, _: Request) -> bool:
        extra = [(f"X-H{i}", "v") for i in range(count)]
        conn.sendall(_head(200, [("Content-Length", "2"), *extra]) + b"{}")
        return False

    return send


class HostileServer:
    """A threaded raw-socket HTTP/1.1 server on loopback, optionally TLS."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._tls = tls
        self.port = int(self._listener.getsockname()[1])
        self._plans: dict[str, deque[Behaviour]] = {}
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        """The base URL to give the worker."""
        scheme = "https" if self._tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/sms"

    def plan(self, msgid: str, steps: Iterable[Behaviour]) -> None:
        """The next answers for this msgid; when they run out, ``ok()``."""
        with self._lock:
            self._plans[msgid] = deque(steps)

    def seen(self, msgid: str) -> list[Request]:
        """The requests that carried this msgid."""
        with self._lock:
            return [r for r in self.requests if r.payload.get("msgid") == msgid]

    def start(self) -> HostileServer:
        """Serve in a daemon thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting; connections in progress end with their threads."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            reader = conn.makefile("rb")
            while not self._stopping.is_set():
                request = _read_request(reader)
                if request is None:
                    return
                with self._lock:
                    self.requests.append(request)
                    steps = self._plans.get(str(request.payload.get("msgid")))
                    step = steps.popleft() if steps else ok()
                if not step(conn, request):
                    return
        except (OSError, ssl.SSLError, ValueError):
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()


def _read_request(reader: Any) -> Request | None:
    line = reader.readline(65537)
    if not line:
        return None
    headers: dict[str, str] = {}
    while True:
        line = reader.readline(65537)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", "0")))
    return Request(headers, body)
