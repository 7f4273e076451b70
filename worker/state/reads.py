"""The read model beside the store: every raw Redis read of the lookup (``lookup.py``,
``backfill find``), the console's lists and chart (``console/queries.py``, ``console/watch.py``).

With ``store.py`` (state changes and the worker's own reads) this is the one place that
knows the key layout (``keys.py``) and speaks Redis: a change of layout touches these two.
Callers hand in the client they hold (``Client``); a key of the wrong type (hand-made) reads
as nothing, never as an error, unless said otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from worker.state import keys

Client = redis.Redis
# (hash fields, last attempt document, marker); each an Exception when its key has the
# wrong type (left for the next claim to deal with)
Brief = tuple[Any, Any, Any]
LANES = {"live": keys.LIVE, "bulk": keys.BULK}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_briefs(
    client: Client, delivery_ids: Sequence[str], *, with_time: bool = False
) -> tuple[int | None, list[Brief]]:
    """Redis's clock in ms (when ``with_time``) and each delivery's brief, in order: what a
    one-line summary shows (its hash, its last attempt for the last error, its marker)."""
    pipe = client.pipeline(transaction=False)
    if with_time:
        pipe.time()
    for delivery_id in delivery_ids:
        pipe.hgetall(keys.delivery(delivery_id))
        pipe.lindex(keys.attempts(delivery_id), -1)
        pipe.get(keys.marker(delivery_id))
    replies = pipe.execute(raise_on_error=False)
    now_ms = None
    if with_time:
        seconds, micros = replies.pop(0)
        now_ms = int(seconds) * 1000 + int(micros) // 1000
    return now_ms, [tuple(replies[i : i + 3]) for i in range(0, len(replies), 3)]


# -- the lookup index (keys.index_directory, keys.INDEX_APPS: see lookup.py). An app's
# entries are in buckets (small sorted sets by name), each from a bound the directory lists.

ENTRIES_PER_BUCKET = 64  # what a split leaves in a bucket: how many buckets a read takes


def index_entries(client: Client, app: str, low: str, high: str, want: int) -> list[str]:
    """Up to ``want`` of an app's index entries within the ZRANGEBYLEX bounds, in order."""
    return first_entries(client, [(app, low, high)], want)[0]


def indexed_apps(client: Client, low: str, count: int) -> list[str] | None:
    """Up to ``count`` indexed apps from ``low`` (ZRANGEBYLEX); None when the list of apps
    is not a sorted set."""
    try:
        return [_text(name) for name in client.zrangebylex(keys.INDEX_APPS, low, "+", 0, count)]
    except redis.ResponseError:
        return None


def first_entries(
    client: Client, ranges: Sequence[tuple[str, str, str]], want: int
) -> list[list[str]]:
    """Per (app, low, high) (ZRANGEBYLEX bounds): up to ``want`` of its index entries, in
    order. Two round trips for any number of apps; more only for an app whose entries in
    the range span more buckets than ``want`` needs. A key of the wrong type reads as empty."""
    ahead = 1 + want // ENTRIES_PER_BUCKET  # the buckets after the first one read takes
    found: list[list[str]] = [[] for _ in ranges]
    todo: dict[int, str | None] = dict.fromkeys(range(len(ranges)))  # None: from ``low``
    while todo:
        pipe = client.pipeline(transaction=False)
        for i, after in todo.items():
            app, low, high = ranges[i]
            directory = keys.index_directory(app)
            if after is None:  # the bucket holding ``low`` (for '-', the next read has it)
                pipe.zrevrangebylex(directory, "[" + low[1:] if low != "-" else "-", "-", 0, 1)
            pipe.zrangebylex(directory, after or low, high, start=0, num=ahead)
        replies = iter(pipe.execute(raise_on_error=False))
        bounds: dict[int, tuple[list[str], bool]] = {}  # the buckets to read; more after?
        for i, after in todo.items():
            holding = _rows(next(replies)) if after is None else []
            inside = _rows(next(replies))
            bounds[i] = list(dict.fromkeys(holding + inside)), len(inside) == ahead
        todo = _read_buckets(client, ranges, bounds, found, want)
    return found


def _read_buckets(
    client: Client,
    ranges: Sequence[tuple[str, str, str]],
    bounds: dict[int, tuple[list[str], bool]],
    found: list[list[str]],
    want: int,
) -> dict[int, str | None]:
    """Read each range's buckets at ``bounds`` into ``found`` (``want`` each at most); the
    ranges still short whose directory goes on, each with the spec to go on from."""
    pipe = client.pipeline(transaction=False)
    for i, (at, _) in bounds.items():
        app, low, high = ranges[i]
        for bound in at:
            pipe.zrangebylex(keys.index_bucket(app, bound), low, high, start=0, num=want)
    replies = iter(pipe.execute(raise_on_error=False))
    todo: dict[int, str | None] = {}
    for i, (at, more) in bounds.items():
        for _ in at:
            found[i].extend(_rows(next(replies)))
        del found[i][want:]
        if more and len(found[i]) < want:
            todo[i] = "(" + at[-1]
    return todo


def _rows(reply: Any) -> list[str]:
    return [] if isinstance(reply, Exception) else [_text(row) for row in reply]


# -- the console's figures, lists and chart


def delivered_counts(client: Client, spans: Sequence[int], hours: Sequence[int]) -> list[Any]:
    """The raw delivered counters of these 10 s spans, then of these hours (None: none)."""
    names = [keys.delivered_in(span) for span in spans]
    names += [keys.delivered_in_hour(hour) for hour in hours]
    return list(client.mget(names))


def lane_sizes(client: Client) -> list[int]:
    """How many deliveries each lane holds (live, bulk)."""
    return [int(client.zcard(lane)) for lane in LANES.values()]


def lane_heads(client: Client, stop: int) -> list[str]:
    """Each lane's earliest due deliveries up to rank ``stop`` (-1: all), live then bulk."""
    return [str(m) for lane in LANES.values() for m in client.zrange(lane, 0, stop)]


def created_times(client: Client, delivery_ids: Sequence[str]) -> list[Any]:
    """Each delivery's raw creation time (ms; None or an Exception when unreadable)."""
    pipe = client.pipeline(transaction=False)
    for delivery_id in delivery_ids:
        pipe.hget(keys.delivery(delivery_id), keys.FIELD["created"])
    return list(pipe.execute(raise_on_error=False))


def minute_outcomes(client: Client, minutes: Sequence[int]) -> list[Any]:
    """The raw verdict counts of each minute (a dict; an Exception for a hand-made key)."""
    pipe = client.pipeline(transaction=False)
    for minute in minutes:
        pipe.hgetall(keys.outcomes_in(minute))
    return list(pipe.execute(raise_on_error=False))


def lane_figures(client: Client, now_ms: int) -> list[tuple[int, int, list[Any]]]:
    """Per lane (live, bulk): depth, due now, and [(member, score)] of the one due first."""
    pipe = client.pipeline(transaction=False)
    for key in LANES.values():
        pipe.zcard(key)
        pipe.zcount(key, "-inf", now_ms)
        pipe.zrange(key, 0, 0, withscores=True)
    found = pipe.execute()
    return [(int(found[i]), int(found[i + 1]), found[i + 2]) for i in range(0, len(found), 3)]


def lane_page(
    client: Client, lane: str, pending: bool, start: int, count: int, now_ms: int
) -> tuple[list[str], int]:
    """A page of one lane's deliveries due now (``pending``) or later, in due order, and
    how many there are in all."""
    key = LANES[lane]
    due = int(client.zcount(key, "-inf", now_ms))
    total = due if pending else int(client.zcard(key)) - due
    first = start if pending else due + start
    rows: list[Any] = (
        client.zrange(key, first, first + count - 1, withscores=True) if start < total else []
    )
    wanted = [str(member) for member, score in rows if (float(score) <= now_ms) == pending]
    return wanted, total


def newest_page(client: Client, dead: bool, start: int, count: int) -> tuple[list[str], int]:
    """A page of the dead letters (``dead``) or the newest delivered, newest first, and how
    many there are in all."""
    pipe = client.pipeline(transaction=True)
    if dead:
        pipe.zcard(keys.DEAD)
        pipe.zrevrange(keys.DEAD, start, start + count - 1)
    else:
        pipe.llen(keys.DONE)
        pipe.lrange(keys.DONE, start, start + count - 1)
    try:
        total, members = pipe.execute()
    except redis.ResponseError:  # another type (bf:done was a sorted set before): nothing yet
        return [], 0
    return [str(member) for member in members], int(total)
