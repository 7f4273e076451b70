"""Postback backfill worker: deliver signed backfill records to the SMS provider.

Public API: ``enqueue_backfill``, ``enqueue_record``, ``BackfillRecord``,
``InvalidRecord``, ``ConfigError``, ``BackfillError``. ``celery -A worker worker`` finds
the Celery app as ``worker.celery``.

Importing the package is cheap: the names above are loaded on first use, so the pure
core (``worker.deliver.policy``, ``worker.enqueue.record``, ``worker.deliver.provider``)
imports and runs without Celery or Redis installed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.app import app as celery
    from worker.enqueue.producer import enqueue_backfill, enqueue_record
    from worker.enqueue.record import BackfillRecord
    from worker.operate.errors import BackfillError, ConfigError, InvalidRecord

# public name -> (module, attribute)
_LAZY = {
    "celery": ("worker.app", "app"),
    "BackfillError": ("worker.operate.errors", "BackfillError"),
    "ConfigError": ("worker.operate.errors", "ConfigError"),
    "InvalidRecord": ("worker.operate.errors", "InvalidRecord"),
    "enqueue_backfill": ("worker.enqueue.producer", "enqueue_backfill"),
    "enqueue_record": ("worker.enqueue.producer", "enqueue_record"),
    "BackfillRecord": ("worker.enqueue.record", "BackfillRecord"),
}

__all__ = [
    "BackfillError",
    "BackfillRecord",
    "ConfigError",
    "InvalidRecord",
    "celery",
    "enqueue_backfill",
    "enqueue_record",
]


def __getattr__(name: str) -> Any:
    """Load a public name on first use (PEP 562)."""
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'worker' has no attribute {name!r}") from None
    value = getattr(import_module(module), attribute)
    globals()[name] = value
    return value
