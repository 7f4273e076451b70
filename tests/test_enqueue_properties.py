"""Property tests on enqueue: every input is accepted, or rejected naming the field with
Redis left byte-for-byte unchanged.

Each draw starts from a valid record and, about half the time, breaks exactly one thing
(a bad value, an unknown key, a missing field), so both paths are exercised and each
example knows which path it must take. They run against a Redis of their own, with no
worker on it, so that "unchanged" can mean every key's DUMP: nothing else writes there.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import InvalidRecord, enqueue_backfill, enqueue_record
from worker.enqueue import producer
from worker.enqueue.record import EARLIEST_TIME_MS, FIELDS, BackfillRecord
from worker.runtime import wake_message
from worker.state import keys
from worker.state.store import Store

NOW_MS = int(time.time() * 1000)
DAY_MS = 24 * 3600 * 1000
LATEST_NAIVE = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=1)
ZONES = st.sampled_from([UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=14))])
SETTINGS = settings(max_examples=150, deadline=None)

printable = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
token = st.text(printable, min_size=1, max_size=64)
good_ms = st.integers(EARLIEST_TIME_MS, NOW_MS)
good_fields = st.fixed_dictionaries(
    {
        "app_id": token,
        "number": st.from_regex(r"\+?[0-9]{6,20}", fullmatch=True),
        "time": st.one_of(
            good_ms.map(str),
            good_ms,
            st.datetimes(datetime(2010, 1, 2), LATEST_NAIVE, timezones=ZONES),
        ),
    },
    optional={"msgid": st.one_of(st.none(), st.just(""), token)},
)

not_a_string = st.one_of(
    st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2)
)
outside_token = st.characters(max_codepoint=0x20) | st.characters(min_codepoint=0x7F)
bad_text = st.one_of(
    st.text(printable, min_size=65, max_size=80),
    st.tuples(st.text(printable, max_size=5), outside_token, st.text(printable, max_size=5)).map(
        "".join
    ),
)
not_13_digits = st.text(max_size=20).filter(lambda s: not re.fullmatch(r"[0-9]{13}", s))
BAD: dict[str, st.SearchStrategy[Any]] = {
    "app_id": st.one_of(st.none(), st.just(""), not_a_string, bad_text),
    "msgid": st.one_of(not_a_string, bad_text),
    "number": st.one_of(
        st.none(),
        st.integers(),
        st.from_regex(
            r"\+?[0-9]{0,5}|\+?[0-9]{21,25}|[0-9]{1,9}[a-z +-][0-9]{1,9}", fullmatch=True
        ),
        bad_text,
    ),
    "time": st.one_of(
        st.none(),
        st.floats(),
        st.booleans(),
        not_13_digits,
        st.datetimes(timezones=st.none()),  # naive
        st.integers(0, EARLIEST_TIME_MS - 1).map(lambda ms: str(ms).zfill(13)),  # before 2010
        st.integers(max_value=EARLIEST_TIME_MS - 1),
        st.integers(NOW_MS + 2 * DAY_MS, 10**13 - 1).map(str),  # days ahead
        st.integers(min_value=NOW_MS + 2 * DAY_MS),
        st.datetimes(max_value=datetime(2009, 12, 30), timezones=ZONES),
        st.datetimes(min_value=LATEST_NAIVE + timedelta(days=4), timezones=ZONES),
    ),
}
anything = st.one_of(st.none(), not_a_string, st.text(max_size=10))


@st.composite
def drafts(draw: st.DrawFn, *, keyword: bool) -> tuple[dict[str, Any], str | None]:
    """A valid record, or one with exactly one thing broken and the name that says what.

    ``keyword``: for ``enqueue_backfill(**data)``, whose signature refuses unknown or
    missing keywords with a TypeError, only values are broken.
    """
    data = draw(good_fields)
    if draw(st.booleans()):
        return data, None
    kinds = [*BAD] if keyword else [*BAD, "unknown", "missing"]
    kind = draw(st.sampled_from(kinds))
    if kind == "unknown":
        name = draw(st.sampled_from(["extra", "appId", "Number", "", "msg id"]))
        data[name] = draw(anything)
        return data, name
    if kind == "missing":
        name = draw(st.sampled_from(["app_id", "number", "time"]))
        del data[name]
        return data, name
    data[kind] = draw(BAD[kind])
    return data, kind


@pytest.fixture
def store_options() -> dict[str, Any]:
    """``store`` keeps no delivered record."""
    return {"keep_delivered_s": 0}


@pytest.fixture
def producer_store(store: Store, monkeypatch: pytest.MonkeyPatch) -> Store:
    """The producer's store is ``store``, on the module's quiet Redis (its wake-ups wait
    there unread)."""
    monkeypatch.setattr(producer, "checked_store", lambda: store)
    return store


def dump(client: redis.Redis) -> dict[str, Any]:
    return {k: client.dump(k) for k in client.scan_iter(count=1000)}


def check(
    store: Store, data: dict[str, Any], broken: str | None, attempt: Callable[[], str]
) -> str:
    """Run one enqueue; it must take the path the draw implies. Returns the path taken."""
    before = dump(store.redis)
    queue = wake_message()[0]  # where the producer pushes its wake-ups
    depth = store.redis.llen(queue)
    try:
        delivery_id = attempt()
    except InvalidRecord as exc:
        assert broken is not None, f"a valid record was rejected: {exc.errors}"
        assert broken in exc.errors
        assert all(reason for reason in exc.errors.values())
        assert dump(store.redis) == before
        return "rejected"
    assert broken is None, f"{broken!r} was broken, yet the record was accepted"
    stored = store.status(delivery_id)
    assert stored is not None
    expected = BackfillRecord.parse(data).to_fields()
    assert {name: stored[name] for name in FIELDS} == expected
    # a new record wakes a worker (one message, pushed by the same script); a repeat does not
    new = keys.delivery(delivery_id) not in before
    assert store.redis.llen(queue) == depth + new
    return "accepted"


def both_paths(paths: Counter[str]) -> None:
    """Each path was taken in at least a fifth of the examples."""
    total = sum(paths.values())
    assert paths["accepted"] >= total / 5, paths
    assert paths["rejected"] >= total / 5, paths


def explore(store: Store, keyword: bool, enqueue: Callable[[dict[str, Any]], str]) -> None:
    """Drafts, keyword-ready or not, through ``enqueue``: each is accepted or refused by
    field (``check``), and both paths are taken often."""
    paths: Counter[str] = Counter()

    @SETTINGS
    @given(draft=drafts(keyword=keyword))
    def run(draft: tuple[dict[str, Any], str | None]) -> None:
        data, broken = draft
        paths[check(store, data, broken, lambda: enqueue(data))] += 1

    run()
    both_paths(paths)


def test_any_mapping_is_accepted_or_rejected_by_field(producer_store: Store) -> None:
    explore(producer_store, False, lambda data: enqueue_record(BackfillRecord.parse(data)))


def test_any_keyword_call_is_accepted_or_rejected_by_field(producer_store: Store) -> None:
    explore(producer_store, True, lambda data: enqueue_backfill(**data))
