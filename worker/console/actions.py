"""What the console changes: dead letters replayed or purged, each with an audit line.

One delivery, one group (every dead letter whose last error is the group's, not only
those the page showed) or all of them; groups and "all" go through the store 1,000
letters at a time in constant memory, as ``backfill dead replay --all`` does. Each batch
writes one ``console.replay`` / ``console.purge`` line naming the console user and the
delivery ids it changed.
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog

from worker.console.queries import dead_errors, error_key
from worker.store import Store

log = structlog.get_logger("worker.console")
ALL = ""  # the group key that means every dead letter


def replay(store: Store, user: str, delivery_ids: list[str], scope: str = "delivery") -> int:
    """Replay dead letters (others are left alone); how many were replayed."""
    done = store.replay(delivery_ids)
    log.info("console.replay", user=user, scope=scope, delivery_ids=done, replayed=len(done))
    return len(done)


def purge(store: Store, user: str, delivery_ids: list[str], scope: str = "delivery") -> int:
    """Delete dead letters for good (others are left alone); how many went."""
    gone = store.purge(delivery_ids)
    log.info("console.purge", user=user, scope=scope, delivery_ids=delivery_ids, purged=gone)
    return gone


def group_batches(store: Store, key: str) -> Iterator[list[str]]:
    """The dead letters of one group (``ALL``: every one), a batch at a time."""
    for batch in store.dead_batches():
        if key == ALL:
            yield batch
            continue
        errors = dead_errors(store.redis, batch)
        chosen = [i for i, error in zip(batch, errors, strict=True) if error_key(error) == key]
        if chosen:
            yield chosen


def replay_group(store: Store, user: str, key: str) -> int:
    """Replay every dead letter of a group; how many were replayed."""
    scope = "all" if key == ALL else f"group {key}"
    return sum(replay(store, user, batch, scope) for batch in group_batches(store, key))


def purge_group(store: Store, user: str, key: str) -> int:
    """Purge every dead letter of a group; how many went."""
    scope = "all" if key == ALL else f"group {key}"
    return sum(purge(store, user, batch, scope) for batch in group_batches(store, key))


def count_group(store: Store, key: str) -> int:
    """How many dead letters a group has now (for the purge confirmation)."""
    if key == ALL:
        return store.counts()["dead"]
    return sum(len(batch) for batch in group_batches(store, key))
