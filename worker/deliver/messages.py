"""The Celery message that wakes a worker, built without Celery's publisher.

``deliver.apply_async`` costs ~0.45 ms of CPU per message (argument repr, a fresh kombu
Redis client, a round trip). These are the same messages (Celery protocol 2 in kombu's
Redis envelope, as ``deliver.apply_async((), queue=queue)`` writes them); a test compares
the two field by field. A wake-up carries no delivery: the woken task drains the lanes.
No I/O here.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from collections.abc import Sequence

DELIVER_TASK = "backfill.deliver"
_HOSTNAME = socket.gethostname()
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


_BODY = base64.b64encode(json.dumps([[], {}, _EMBED]).encode()).decode()


def wake_message(queue: str, origin: str, args: Sequence[object] = ()) -> str:
    """The message ``deliver.apply_async(args, queue=queue)`` would write (a wake-up takes
    no arguments; tests give some to play an older or a hostile producer)."""
    task_id = str(uuid.uuid4())
    body = base64.b64encode(json.dumps([list(args), {}, _EMBED]).encode()).decode()
    envelope = {
        "body": body if args else _BODY,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": DELIVER_TASK,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr(tuple(args)),
            "kwargsrepr": "{}",
            "origin": origin,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": None,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope)


def wake_messages(count: int, queue: str) -> list[str]:
    """``count`` wake-ups from this process."""
    origin = f"gen{os.getpid()}@{_HOSTNAME}"
    return [wake_message(queue, origin) for _ in range(count)]
