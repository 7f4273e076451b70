"""The producer side: validate a record, store it, wake a worker (SPEC section 6)."""

from __future__ import annotations

from datetime import datetime

import structlog

from worker.record import BackfillRecord, mask_number
from worker.store import Store
from worker.tasks import get_store, publish

log = structlog.get_logger("worker.producer")


def enqueue_backfill(
    *, app_id: str, number: str, time: str | int | datetime, msgid: str | None = None
) -> str:
    """Validate and enqueue one record; returns its delivery_id (the same for a repeat).

    Raises ``InvalidRecord`` naming each bad field; nothing reaches Redis then.
    """
    record = BackfillRecord.parse(
        {"app_id": app_id, "msgid": msgid, "number": number, "time": time}
    )
    return enqueue_record(record)


def enqueue_record(
    record: BackfillRecord,
    *,
    source: str = "api",
    caller: str | None = None,
    store: Store | None = None,
) -> str:
    """Enqueue a validated record: one Lua call to store it, one publish to wake a worker.

    ``caller`` (an intake token's name) may then read the delivery through the intake;
    ``store`` defaults to the process's own (the intake passes its fail-fast one).
    """
    store = store or get_store()
    delivery_id, created = store.enqueue(
        record, source=source, dispatch_grace_s=None, caller=caller
    )
    if created:
        try:
            publish([delivery_id], store)
        except Exception as exc:
            log.warning(
                "postback.publish_deferred",
                delivery_id=delivery_id,
                error=f"{type(exc).__name__}: {exc}",
            )
    log_enqueued(record, delivery_id, created, source=source, caller=caller)
    return delivery_id


def log_enqueued(
    record: BackfillRecord,
    delivery_id: str,
    created: bool,
    *,
    source: str,
    caller: str | None = None,
) -> None:
    """The ``postback.enqueued`` audit event (``caller``: the intake token's name)."""
    fields = {
        "delivery_id": delivery_id,
        "app_id": record.app_id,
        "msgid": record.msgid,
        "number": mask_number(record.number),
        "created": created,
        "source": source,
    }
    if caller is not None:
        fields["caller"] = caller
    log.info("postback.enqueued", **fields)
