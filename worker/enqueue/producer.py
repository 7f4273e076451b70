"""The producer side: validate a record, store it, wake a worker (SPEC section 6)."""

from __future__ import annotations

from datetime import datetime

from worker.enqueue.record import BackfillRecord
from worker.operate.audit import audit_line
from worker.operate.redact import mask_number
from worker.runtime import checked_store, wake_message
from worker.state.store import Store


def enqueue_backfill(
    *, app_id: str, number: str, time: str | int | datetime, msgid: str | None = None
) -> str:
    """Validate and enqueue one record; returns its delivery_id (the same for a repeat).

    Raises ``InvalidRecord`` naming each bad field; nothing reaches Redis then.
    Raises ``ConfigError`` when Redis's maxmemory-policy evicts keys (records could vanish;
    see BACKFILL_ACCEPT_EVICTION) and ``RedisFull`` when Redis refused it for lack of
    memory (nothing was stored).
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
    """Enqueue a validated record in the live lane: one Lua call stores it and, when it is
    new, pushes a wake-up so a worker sends it at once. One Redis round trip.

    ``caller`` (an intake token's name) may then read the delivery through the intake;
    ``store`` defaults to the process's own (the intake passes its fail-fast one).
    """
    queue, wake = wake_message()
    delivery_id, created = (store or checked_store()).enqueue(
        record, caller=caller, wake_queue=queue, wake=wake
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
    audit_line("worker.producer", "postback.enqueued", fields)
