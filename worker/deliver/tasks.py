"""The Celery task: a ``backfill.deliver`` wake-up drains due deliveries.

A ``backfill.deliver`` message is a wake-up: the task drains due deliveries from Redis
(``drain.py``). The waker thread (``waker.py``) publishes wake-ups for idle capacity.
"""

from __future__ import annotations

import re
from typing import Any

import structlog

from worker.app import app
from worker.deliver.drain import Context, drain
from worker.deliver.messages import DELIVER_TASK
from worker.operate.redact import cap
from worker.runtime import get_client, get_settings, get_store

log = structlog.get_logger("worker.tasks")
# What an argument may look like in a wake-up from an older producer (a delivery id).
_LEGACY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@app.task(name=DELIVER_TASK, bind=True, ignore_result=True, max_retries=None)
def deliver(self: Any, *args: object, **kwargs: object) -> int:
    """Drain due deliveries (Celery entry point); how many attempts were made.

    Arguments are not used: older producers sent a delivery id, which is fine; anything
    else is logged (capped) and the wake-up still drains.
    """
    if kwargs or len(args) > 1 or (args and not _legacy_id(args[0])):
        log.warning("postback.bad_message", arguments=cap(repr((args, kwargs)), 100))
    return drain(Context(get_settings(), get_store(), get_client(), self.request.id))


def _legacy_id(value: object) -> bool:
    return isinstance(value, str) and _LEGACY_ID.fullmatch(value) is not None
