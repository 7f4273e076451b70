"""Mass actions on dead letters (replay or purge all, an app's, a group) that end.

A mass action fixes its end when it begins: the newest letter's time of death (ms) and
the letters that died in that very millisecond (``fixed_end``). It then walks the index
oldest first up to that end, never past it, so a letter that dies after the start (a
replay the fleet kills again at once) is never touched, and each letter is acted on once.
What the action did comes back as a ``MassResult``: how many were done, looked at, there
at the start, and how many dead letters now died after the start (left alone).

A confirmation page fixes its end as a moment of Redis's clock instead (``end_before``:
the letters that died before it). Every letter's time of death is read from that clock,
so the action the page confirms, given the same moment later, finds the same end
however long the page was shown.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from worker.state import keys

BATCH = 1000
_TIES = 1000  # letters read to find those that died in the end's millisecond


class Store(Protocol):
    """What a mass action needs of ``worker.state.store.Store`` (which imports this module)."""

    @property
    def redis(self) -> redis.Redis: ...
    def replay(self, delivery_ids: Sequence[str]) -> list[str]: ...
    def purge(self, delivery_ids: Sequence[str]) -> int: ...


@dataclass(frozen=True, slots=True)
class DeadEnd:
    """Where a mass action stops: the newest death (ms; None when there was no letter),
    the letters that died in that millisecond, and how many letters there were."""

    ms: int | None
    last: frozenset[str]
    count: int


@dataclass(slots=True)
class MassResult:
    """What a mass action did."""

    end_ms: int | None
    at_start: int  # letters in scope when it began
    seen: int = 0  # letters it looked at (a group: those of the group)
    done: int = 0  # letters replayed or purged
    later: int = 0  # letters in scope now that died after it began (left alone)
    first: list[str] = field(default_factory=list)  # the first ids done, if the caller keeps them


def index_of(app_id: str | None) -> str:
    """The dead-letter index of one app, or of every letter."""
    return keys.dead_app(app_id) if app_id else keys.DEAD


def fixed_end(client: redis.Redis, app_id: str | None = None) -> DeadEnd:
    """The end of a mass action beginning now (one transaction)."""
    index = index_of(app_id)
    pipe = client.pipeline(transaction=True)
    pipe.zrevrange(index, 0, _TIES - 1, withscores=True)
    pipe.zcard(index)
    top, count = pipe.execute()
    return _end(client, index, top, count)


def redis_ms(client: redis.Redis) -> int:
    """Redis's clock (ms): the clock every letter's time of death is read from."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def end_before(client: redis.Redis, before_ms: int, app_id: str | None = None) -> DeadEnd:
    """The end of a mass action over the letters that died before ``before_ms`` (Redis's
    clock, ``redis_ms``). A letter dies at Redis's time of its death, so once that clock
    has passed ``before_ms`` the same letters are found again whenever this is called: a
    confirmation page carries ``before_ms`` and its confirmed action stops where it
    counted, not at a new end."""
    index = index_of(app_id)
    pipe = client.pipeline(transaction=True)
    pipe.zrevrangebyscore(index, f"({before_ms}", "-inf", start=0, num=_TIES, withscores=True)
    pipe.zcount(index, "-inf", f"({before_ms}")
    top, count = pipe.execute()
    return _end(client, index, top, count)


def _end(client: redis.Redis, index: str, top: list[Any], count: int) -> DeadEnd:
    """The end whose newest letters (score descending, at most _TIES) are ``top``."""
    if not top:
        return DeadEnd(None, frozenset(), 0)
    ms = top[0][1]
    last = [str(m) for m, s in top if s == ms]
    if len(last) == _TIES:  # more died in that millisecond than were read: read them all
        last = [str(m) for m in client.zrangebyscore(index, ms, ms)]
    return DeadEnd(int(ms), frozenset(last), int(count))


def batches(
    client: redis.Redis, app_id: str | None = None, batch: int = BATCH, end: DeadEnd | None = None
) -> Iterator[list[str]]:
    """The dead letters' ids a batch at a time, oldest first, in constant memory; safe to
    replay or purge each batch before asking for the next. With ``end``, only the letters
    that had died by it (without: up to whatever is newest when the walk gets there)."""
    index = index_of(app_id)
    if end is not None and end.ms is None:
        return
    if end is None:
        yield from _walk(client, index, batch, "+inf")
        return
    held: list[str] = []  # the last batch, which the end's millisecond may join
    for chunk in itertools.chain(
        _walk(client, index, batch, f"({end.ms}"), _last(client, index, batch, end)
    ):
        if held and len(held) + len(chunk) > batch:
            yield held
            held = []
        held = held + chunk
    if held:
        yield held


def _last(client: redis.Redis, index: str, batch: int, end: DeadEnd) -> Iterator[list[str]]:
    """The letters that died in the end's millisecond and are still there, dead then."""
    ids = sorted(end.last)
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        scores: list[Any] = client.zmscore(index, chunk)
        # not those that were replayed and died again later, or went meanwhile
        yield [i for i, s in zip(chunk, scores, strict=True) if s is not None and s == end.ms]


def died_after(
    client: redis.Redis, end: DeadEnd, app_id: str | None = None, batch: int = BATCH
) -> Iterator[list[str]]:
    """The letters that died after ``end`` (those a mass action left alone), a batch at a
    time, oldest first."""
    if end.ms is not None:
        yield from _walk(client, index_of(app_id), batch, "+inf", f"({end.ms}")


def _walk(
    client: redis.Redis, index: str, batch: int, high: str, low: float | str = "-inf"
) -> Iterator[list[str]]:
    seen: set[str] = set()  # the ids already given at score ``low``
    while True:
        rows: list[Any] = client.zrangebyscore(
            index, low, high, start=0, num=batch + len(seen), withscores=True
        )
        fresh = [(str(m), float(s)) for m, s in rows if not (s == low and str(m) in seen)]
        if not fresh:
            return
        fresh = fresh[:batch]
        yield [member for member, _ in fresh]
        top = fresh[-1][1]
        seen = {m for m, s in fresh if s == top} | (seen if top == low else set())
        low = top


def act_until(
    store: Store,
    act: Callable[[list[str]], int],
    *,
    app_id: str | None = None,
    end: DeadEnd | None = None,
    choose: Callable[[list[str]], list[str]] | None = None,
) -> MassResult:
    """Run ``act`` (ids -> how many it did) over the letters up to ``end`` (fixed now
    when not given), ``choose`` picking those of a group from each batch."""
    end = fixed_end(store.redis, app_id) if end is None else end
    result = MassResult(end.ms, end.count)
    for ids in batches(store.redis, app_id, end=end):
        chosen = choose(ids) if choose is not None else ids
        if chosen:
            result.seen += len(chosen)
            result.done += act(chosen)
    if choose is not None:  # those of the group: the later letters read a batch at a time
        result.later = sum(len(choose(ids)) for ids in died_after(store.redis, end, app_id))
    elif end.ms is not None:
        result.later = int(store.redis.zcount(index_of(app_id), f"({end.ms}", "+inf"))
    return result


def replay_until(
    store: Store,
    *,
    app_id: str | None = None,
    end: DeadEnd | None = None,
    choose: Callable[[list[str]], list[str]] | None = None,
) -> MassResult:
    """Replay every dead letter (of an app, of a group) that had died by ``end``."""
    return act_until(
        store, lambda ids: len(store.replay(ids)), app_id=app_id, end=end, choose=choose
    )


def purge_until(
    store: Store,
    *,
    app_id: str | None = None,
    end: DeadEnd | None = None,
    choose: Callable[[list[str]], list[str]] | None = None,
) -> MassResult:
    """Purge every dead letter (of an app, of a group) that had died by ``end``."""
    return act_until(store, store.purge, app_id=app_id, end=end, choose=choose)
