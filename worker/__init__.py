"""Postback backfill worker: deliver signed backfill records to the SMS provider.

Public API: ``enqueue_backfill``, ``enqueue_record``, ``BackfillRecord``,
``InvalidRecord``, ``ConfigError``, ``BackfillError``. ``celery -A worker worker`` finds
the Celery app as ``worker.celery``.

Importing the package is cheap: the names above are loaded on first use, so the pure
core (``worker.policy``, ``worker.record``, ``worker.provider``) imports and runs without
Celery or Redis installed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.app import app as celery
    from worker.errors import BackfillError, ConfigError, InvalidRecord
    from worker.producer import enqueue_backfill, enqueue_record
    from worker.record import BackfillRecord

# public name -> (module, attribute)
_LAZY = {
    "celery": ("worker.app", "app"),
    "BackfillError": ("worker.errors", "BackfillError"),
    "ConfigError": ("worker.errors", "ConfigError"),
    "InvalidRecord": ("worker.errors", "InvalidRecord"),
    "enqueue_backfill": ("worker.producer", "enqueue_backfill"),
    "enqueue_record": ("worker.producer", "enqueue_record"),
    "BackfillRecord": ("worker.record", "BackfillRecord"),
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
