"""What the console changes: dead letters replayed or purged, each with an audit line.

One delivery, one group (every dead letter whose last error is the group's, not only
those the page showed) or all of them; groups and "all" go through the store 1,000
letters at a time in constant memory, as ``backfill dead replay --all`` does. Each batch
writes one ``console.replay`` / ``console.purge`` line naming the console user and the
delivery ids it changed.

A confirmation page counts the letters that died before a moment of Redis's clock
(``counted_end``) and carries that moment in its form: the action it confirms stops at
the same end, so a letter that dies after the page was shown is left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import structlog

from worker.console.queries import dead_errors, error_key
from worker.state.dead_letters import (
    DeadEnd,
    MassResult,
    act_until,
    batches,
    end_before,
    fixed_end,
    redis_ms,
)
from worker.state.store import Store

log = structlog.get_logger("worker.console")
ALL = ""  # the group key that means every dead letter


def replay(store: Store, user: str, delivery_ids: list[str], scope: str = "delivery") -> int:
    """Replay dead letters (others are left alone); how many were replayed."""
    return len(_replay(store, user, delivery_ids, scope))


def _replay(store: Store, user: str, delivery_ids: list[str], scope: str) -> list[str]:
    done = store.replay(delivery_ids)
    log.info("console.replay", user=user, scope=scope, delivery_ids=done, replayed=len(done))
    return done


def purge(store: Store, user: str, delivery_ids: list[str], scope: str = "delivery") -> int:
    """Delete dead letters for good (others are left alone); how many went."""
    gone = store.purge(delivery_ids)
    log.info("console.purge", user=user, scope=scope, delivery_ids=delivery_ids, purged=gone)
    return gone


def choose(store: Store, key: str) -> Callable[[list[str]], list[str]] | None:
    """What picks a group's letters from a batch (None: ``ALL``, every letter)."""
    if key == ALL:
        return None

    def chosen(batch: list[str]) -> list[str]:
        errors = dead_errors(store.redis, batch)
        return [i for i, error in zip(batch, errors, strict=True) if error_key(error) == key]

    return chosen


def group_batches(
    store: Store, key: str, end: DeadEnd | None = None, app_id: str | None = None
) -> Iterator[list[str]]:
    """The dead letters of one group (``ALL``: every one; of one app when given), a batch
    at a time, up to ``end`` (fixed now when not given)."""
    pick = choose(store, key)
    for batch in batches(store.redis, app_id, end=end or fixed_end(store.redis, app_id)):
        chosen = batch if pick is None else pick(batch)
        if chosen:
            yield chosen


def counted_end(store: Store, before_ms: int | None = None) -> tuple[int, DeadEnd]:
    """The end a confirmation page counts up to: the letters that died before
    ``before_ms`` (Redis's clock; now when not given). ValueError when that moment is
    still to come (only a page this console made names one, and it names a past one)."""
    now = redis_ms(store.redis)
    if before_ms is None:
        before_ms = now
    elif before_ms > now:
        raise ValueError("the end is still to come")
    return before_ms, end_before(store.redis, before_ms)


def replay_group_until(
    store: Store, user: str, key: str, end: DeadEnd | None = None, keep: int = 0
) -> MassResult:
    """Replay every dead letter of a group that had died by ``end`` (fixed now when not
    given: a confirmation page fixes it when it counts); what was done, with the ids of
    the first ``keep`` replayed (``MassResult.first``)."""
    scope = "all" if key == ALL else f"group {key}"
    first: list[str] = []

    def act(ids: list[str]) -> int:
        done = _replay(store, user, ids, scope)
        first.extend(done[: max(keep - len(first), 0)])
        return len(done)

    result = act_until(store, act, end=end, choose=choose(store, key))
    result.first = first
    return result


def purge_group_until(store: Store, user: str, key: str, end: DeadEnd | None = None) -> MassResult:
    """Purge every dead letter of a group that had died by ``end``; what was done."""
    scope = "all" if key == ALL else f"group {key}"
    act = lambda ids: purge(store, user, ids, scope)  # noqa: E731
    return act_until(store, act, end=end, choose=choose(store, key))


def replay_group(store: Store, user: str, key: str) -> int:
    """Replay every dead letter of a group (up to an end fixed now); how many were replayed."""
    return replay_group_until(store, user, key).done


def purge_group(store: Store, user: str, key: str) -> int:
    """Purge every dead letter of a group (up to an end fixed now); how many went."""
    return purge_group_until(store, user, key).done


def count_group(
    store: Store, key: str, end: DeadEnd | None = None, app_id: str | None = None
) -> int:
    """How many dead letters a group has now (up to ``end``; of one app when given), for
    a confirmation."""
    if key == ALL:
        return (end or fixed_end(store.redis, app_id)).count
    return sum(len(batch) for batch in group_batches(store, key, end, app_id))
