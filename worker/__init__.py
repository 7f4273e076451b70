"""Postback backfill worker: deliver signed backfill records to the SMS provider.

Public API: ``enqueue_backfill``, ``BackfillRecord``, ``InvalidRecord``, ``ConfigError``.
``celery -A worker worker`` finds the Celery app as ``worker.celery``.
"""

from worker.app import app as celery
from worker.errors import BackfillError, ConfigError, InvalidRecord
from worker.producer import enqueue_backfill, enqueue_record
from worker.record import BackfillRecord

__all__ = [
    "BackfillError",
    "BackfillRecord",
    "ConfigError",
    "InvalidRecord",
    "celery",
    "enqueue_backfill",
    "enqueue_record",
]
