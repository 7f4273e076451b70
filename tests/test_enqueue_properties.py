"""Property tests on enqueue: every input is accepted, or rejected naming the field with
Redis left byte-for-byte unchanged.

They run against a Redis of their own, with no worker on it, so that "unchanged" can
mean every key's DUMP: nothing else writes there.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker import InvalidRecord, enqueue_backfill, enqueue_record, producer
from worker.local import LocalRedis
from worker.record import FIELDS, BackfillRecord
from worker.store import Store, connect

printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=70)
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    printable,
    st.from_regex(r"\+?[0-9]{4,22}", fullmatch=True),
    st.from_regex(r"[0-9]{9,14}", fullmatch=True),
    st.integers(min_value=10**11, max_value=10**14),
    st.datetimes(timezones=st.sampled_from([None, UTC, timezone(timedelta(hours=-5))])),
    st.lists(st.integers(), max_size=2),
)
records = st.dictionaries(
    st.sampled_from([*FIELDS, "extra", "appId"]), anything, min_size=0, max_size=6
)
fields_only = st.fixed_dictionaries(
    {"app_id": anything, "number": anything, "time": anything}, optional={"msgid": anything}
)
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def quiet_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    server = LocalRedis(Path(tmp_path_factory.mktemp("props"))).start()
    yield server
    server.stop()


@pytest.fixture
def store(quiet_redis: LocalRedis, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """The producer's store, pointed at the quiet Redis; published ids are collected."""
    own = Store(connect(quiet_redis.url), dedupe_ttl_s=3600, requeue_after_s=60)
    published: list[str] = []
    monkeypatch.setattr(producer, "get_store", lambda: own)
    monkeypatch.setattr(producer, "publish", published.extend)
    yield own
    own.redis.flushdb()
    own.redis.close()


def dump(client: redis.Redis) -> dict[str, Any]:
    return {k: client.dump(k) for k in client.scan_iter(count=1000)}


def check(store: Store, attempt: Any) -> None:
    before = dump(store.redis)
    try:
        delivery_id = attempt()
    except InvalidRecord as exc:
        assert exc.errors
        assert all(reason for reason in exc.errors.values())
        assert dump(store.redis) == before
    else:
        assert store.status(delivery_id) is not None


@SETTINGS
@given(data=records)
def test_any_mapping_is_accepted_or_rejected_by_field(store: Store, data: dict[str, Any]) -> None:
    check(store, lambda: enqueue_record(BackfillRecord.parse(data)))
    try:
        BackfillRecord.parse(data)
    except InvalidRecord as exc:
        assert set(exc.errors) <= set(data) | set(FIELDS)


@SETTINGS
@given(data=fields_only)
def test_any_keyword_call_is_accepted_or_rejected_by_field(
    store: Store, data: dict[str, Any]
) -> None:
    check(store, lambda: enqueue_backfill(**data))
