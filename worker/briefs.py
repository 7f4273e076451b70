"""What a one-line summary of a delivery reads from Redis, in one round trip.

``backfill find`` and the intake's lookup (``lookup.py``) and the console's lists
(``console/queries.py``) show the same thing per delivery: its hash, its last attempt
(for the last error) and, once compacted, its delivered marker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from worker import keys

# (hash fields, last attempt document, marker); each an Exception when its key has the
# wrong type (left for the next claim to deal with)
Brief = tuple[Any, Any, Any]


def read_briefs(
    client: redis.Redis, delivery_ids: Sequence[str], *, with_time: bool = False
) -> tuple[int | None, list[Brief]]:
    """Redis's clock in ms (when ``with_time``) and each delivery's brief, in order."""
    pipe = client.pipeline(transaction=False)
    if with_time:
        pipe.time()
    for delivery_id in delivery_ids:
        pipe.hgetall(keys.delivery(delivery_id))
        pipe.lindex(keys.attempts(delivery_id), -1)
        pipe.get(keys.marker(delivery_id))
    replies = pipe.execute(raise_on_error=False)
    now_ms = None
    if with_time:
        seconds, micros = replies.pop(0)
        now_ms = int(seconds) * 1000 + int(micros) // 1000
    return now_ms, [tuple(replies[i : i + 3]) for i in range(0, len(replies), 3)]
