"""Connections to Redis: one client per process for the project's state (broker aside).

``sentinel://h1:26379;sentinel://h2:26379/0`` (kombu's form) asks the sentinels for the
current primary and follows it through a failover. ``persist`` retries a write through a
Redis restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

T = TypeVar("T")
TRANSIENT_REDIS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def connect(
    url: str,
    master_name: str = "mymaster",
    *,
    connect_timeout_s: float = 5.0,
    timeout_s: float = 10.0,
    retries: int = 6,
) -> redis.Redis:
    """A client for the project's state, retrying briefly through connection blips.

    The defaults ride out a blip of ~3.5 s; the intake asks for less (it answers 503).
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": connect_timeout_s,
        "socket_timeout": timeout_s,
        "health_check_interval": 30,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
        "retry_on_error": list(TRANSIENT_REDIS),
    }
    if not url.startswith("sentinel://"):
        return redis.Redis.from_url(url, **options)
    nodes, password, db = sentinel_nodes(url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        nodes, socket_timeout=2, sentinel_kwargs={"socket_timeout": 2}
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        master_name, password=password, db=db, **options
    )
    return client


def sentinel_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, int]:
    """The (host, port) of each sentinel in a kombu-style URL, the password and the db."""
    nodes, password, db = [], None, 0
    for part in filter(None, url.split(";")):
        parsed = urlsplit(part.strip())
        if parsed.scheme != "sentinel" or not parsed.hostname:
            raise ValueError(f"expected sentinel://host:port, got {part!r}")
        nodes.append((parsed.hostname, parsed.port or 26379))
        password = password or parsed.password
        if parsed.path.strip("/").isdigit():
            db = int(parsed.path.strip("/"))
    return nodes, password, db


def persist(write: Callable[[], T], deadline_s: float) -> T:
    """Run a Redis write, retrying connection failures until ``deadline_s`` has passed."""
    give_up = time.monotonic() + deadline_s
    delay = 0.1
    while True:
        try:
            return write()
        except TRANSIENT_REDIS:
            if time.monotonic() >= give_up:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
