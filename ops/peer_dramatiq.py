"""A minimal dramatiq actor doing the project's signed POST: the peer of ``bench_latency.py``.

The textbook way: one actor, dramatiq's Redis broker and default middleware, the record
as the message's arguments, the same ``ProviderClient.send`` (fresh Timestamp and Sign,
pooled Session per thread) against the same stub. Needs the ``bench`` extra
(``pip install -e '.[bench]'``); the worker itself never imports this.

    PEER_REDIS_URL=redis://... PEER_BASE_URL=http://.../sms dramatiq peer_dramatiq
"""

from __future__ import annotations

import os
import threading

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from worker.deliver.provider import ProviderClient
from worker.enqueue.record import BackfillRecord

QUEUE = "peer"
broker = RedisBroker(url=os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/15"))
dramatiq.set_broker(broker)
_lock = threading.Lock()
_clients: list[ProviderClient] = []


def client() -> ProviderClient:
    """The process's provider client (its sessions are per thread)."""
    with _lock:
        if not _clients:
            _clients.append(
                ProviderClient(
                    os.environ["PEER_BASE_URL"],
                    os.environ["PEER_API_KEY"],
                    os.environ["PEER_API_SECRET"],
                )
            )
        return _clients[0]


@dramatiq.actor(queue_name=QUEUE, max_retries=3, min_backoff=1000)
def deliver(app_id: str, msgid: str, number: str, time: str) -> None:
    """Send one record; a failure is retried by dramatiq's Retries middleware."""
    answer = client().send(BackfillRecord(app_id, number, time, msgid=msgid))
    if answer.api_status not in ("0", "-20"):
        raise RuntimeError(answer.error or f"status {answer.api_status}")
