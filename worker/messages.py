"""The Celery message that wakes a worker for one delivery, built without Celery's publisher.

``deliver.apply_async`` costs ~0.45 ms of CPU per message (argument repr, a fresh kombu
Redis client, a round trip); the dispatcher sends one per delivery. These are the same
messages (Celery protocol 2 in kombu's Redis envelope, as ``apply_async`` writes them for
the ``backfill.deliver`` task); ``tests/test_tasks.py`` compares the two field by field.
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


def wake_message(delivery_id: str, queue: str, origin: str) -> str:
    """The message ``deliver.apply_async((delivery_id,), queue=queue)`` would write."""
    task_id = str(uuid.uuid4())
    body = json.dumps([[delivery_id], {}, _EMBED]).encode()
    envelope = {
        "body": base64.b64encode(body).decode(),
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
            "argsrepr": repr((delivery_id,)),
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


def wake_messages(delivery_ids: Sequence[str], queue: str) -> list[str]:
    """One message per delivery, in order, from this process."""
    origin = f"gen{os.getpid()}@{_HOSTNAME}"
    return [wake_message(delivery_id, queue, origin) for delivery_id in delivery_ids]
