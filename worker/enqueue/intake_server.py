"""How ``backfill intake`` is served: uvicorn with bounded headers, and its Redis clients.

uvicorn bounds a request's headers in size (h11's incomplete-event limit) but not in
time: a client that sends half a request line keeps its connection forever. The
protocol below closes a connection whose request headers are not complete within
``header_timeout_s`` of their first byte (or of the connection opening). It also keeps
the connection limit itself: up to ``max_connections`` every request is served, past it
each one gets the documented JSON 503 with Retry-After (uvicorn's own limit answers in
plain text, and counts in-flight tasks too), except ``/healthz``, which is always served.
Given a ``per_address`` cap, it answers a plain 503 (``Retry-After``) to a client address
that already holds that many connections, so one address cannot take every connection of
the limit (the console uses it; behind a proxy every client shares its address, so the
intake leaves it off). A reverse
proxy in front (``ops/nginx-intake.conf``) remains the first line: TLS, per-client
limits, and buffering whole bodies before the intake sees them.

The intake's Redis clients fail fast: with Redis down a caller gets a 503 within
milliseconds (connection refused) or ~0.6 s (no answer to the connect), not after the
workers' 3.5 s of retries.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from uvicorn.protocols.http.h11_impl import H11Protocol

from worker.enqueue.intake_health import HEALTH_TIMEOUT_S
from worker.runtime import build_store
from worker.settings import Settings
from worker.state.connection import connect, sentinel_nodes
from worker.state.store import Store

RETRY_AFTER_S = 5  # what a 503 of the intake asks a client to wait
MAX_HEADERS = 16 * 1024  # request line and headers together
BUSY = json.dumps({"error": "the intake is at its connection limit; retry later"}).encode()
_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 39\r\nConnection: close\r\n\r\ntoo many connections from this address\n"
)


@dataclass(frozen=True)
class Limits:
    """How long a client may take and how much the intake takes on at once."""

    header_timeout_s: float = 10.0  # request line and headers, from the first byte
    body_timeout_s: float = 10.0  # the whole body, from the end of the headers
    keep_alive_s: float = 5.0  # an idle connection between requests
    max_connections: int = 512  # beyond: uvicorn answers 503 (bodies: 1 MiB each at most)
    threads: int = 1  # decode + validate + enqueue: a second one fights it for the GIL


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers come too slowly,
    and answering a connection past ``max_connections`` with the JSON 503."""

    header_timeout_s = 10.0
    max_connections: int | None = None
    per_address = 0  # connections one client address may hold at once (0: no cap)
    open_by_address: ClassVar[Counter[str]] = Counter()  # protocol() gives each its own
    _header_timer: asyncio.TimerHandle | None = None
    _address: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request's headers; past the limit, refuse."""
        super().connection_made(transport)
        if self.per_address:
            self._address = self.client[0] if self.client else ""
            self.open_by_address[self._address] += 1
            if self.open_by_address[self._address] > self.per_address:
                transport.write(_TOO_MANY)
                transport.close()
                # refused: it holds no place in the limit while its close completes
                self.connections.discard(self)
                return
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self.app = over_limit(self.app)
        self._arm()

    def data_received(self, data: bytes) -> None:
        """Stop the clock once a request's headers are in; start it on a new request's bytes."""
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm()
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        """A pipelined request's first bytes may already be waiting: start its clock."""
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the clock and the connection's count."""
        self._disarm()
        if self._address is not None:
            self.open_by_address[self._address] -= 1
            if self.open_by_address[self._address] <= 0:
                del self.open_by_address[self._address]
            self._address = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE:
            self.transport.close()


def over_limit(app: Any) -> Any:
    """The ASGI app of a connection past the limit: ``/healthz`` as usual (it costs the
    event loop a PING), any other request the documented JSON 503 with Retry-After."""

    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("path") == "/healthz":
            await app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(BUSY)),
            (b"retry-after", b"%d" % RETRY_AFTER_S), (b"connection", b"close"),
        ]})  # fmt: skip
        await send({"type": "http.response.body", "body": BUSY, "more_body": False})

    return refuse


def protocol(
    header_timeout_s: float, max_connections: int | None = None, per_address: int = 0
) -> type[HeaderDeadline]:
    """The HeaderDeadline protocol with this deadline, limit and cap per client address
    (uvicorn takes a class; each gets its own count of open connections)."""
    limits: dict[str, Any] = {
        "header_timeout_s": header_timeout_s, "max_connections": max_connections,
        "per_address": per_address, "open_by_address": Counter(),
    }  # fmt: skip
    return type("IntakeProtocol", (HeaderDeadline,), limits)


def intake_store(settings: Settings) -> Store:
    """A Store whose client gives up fast: one quick retry (a stale pooled connection)."""
    client = connect(
        settings.redis_url,
        settings.redis_master_name,
        connect_timeout_s=0.25,
        timeout_s=2.0,
        retries=1,
    )
    return build_store(settings, client)


def health_client(settings: Settings) -> aioredis.Redis:
    """An asyncio client of /healthz's own: its PING never waits behind the enqueue pool."""
    options: dict[str, Any] = {
        "socket_connect_timeout": HEALTH_TIMEOUT_S,
        "socket_timeout": HEALTH_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 0),
    }
    url = settings.redis_url
    if not url.startswith("sentinel://"):
        return aioredis.Redis.from_url(url, **options)
    nodes, password, db = sentinel_nodes(url)
    sentinel = Sentinel(nodes, socket_timeout=HEALTH_TIMEOUT_S)  # type: ignore[no-untyped-call, unused-ignore]
    client: aioredis.Redis = sentinel.master_for(
        settings.redis_master_name, password=password, db=db, **options
    )
    return client


def serve(app: Any, host: str, port: int, limits: Limits, per_address: int = 0) -> None:
    """Run uvicorn with the intake's limits (h11 forced: its header size limit applies),
    and at most ``per_address`` connections from one client address (0: no cap)."""
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,
        server_header=False,
        loop="asyncio",
        http=protocol(limits.header_timeout_s, limits.max_connections, per_address),
        h11_max_incomplete_event_size=MAX_HEADERS,
        timeout_keep_alive=max(1, round(limits.keep_alive_s)),
        # the limit is the protocol's (uvicorn's own answers 503 in plain text); a
        # request in flight at a SIGTERM gets its body's time and its enqueue's, no more
        timeout_graceful_shutdown=round(limits.body_timeout_s + 5),
        # Access lines from the event loop would queue for the log handler's lock behind
        # the pool's audit lines (1,000 a batch) and hold /healthz up; the audit line and
        # intake.refused say what happened to each request instead.
        access_log=False,
    )
