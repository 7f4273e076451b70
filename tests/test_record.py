"""The record and its validation (SPEC section 2), without Redis."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.enqueue.record import (
    EARLIEST_TIME_MS,
    MAX_TIME_AHEAD_MS,
    MAX_UNKNOWN_NAMED,
    BackfillRecord,
    time_out_of_range,
)
from worker.operate.errors import InvalidRecord
from worker.operate.redact import mask_number

GOOD = {"app_id": "app-1", "msgid": "m-1", "number": "8613512345678", "time": "1681184764000"}


def parse(**changes: object) -> BackfillRecord:
    return BackfillRecord.parse({**GOOD, **changes})


def errors_of(**changes: object) -> dict[str, str]:
    with pytest.raises(InvalidRecord) as info:
        parse(**changes)
    return info.value.errors


def test_good_record_round_trips_through_fields() -> None:
    record = parse()
    assert BackfillRecord.from_fields(record.to_fields()) == record
    assert record.provider_body() == {
        "appId": "app-1",
        "msgid": "m-1",
        "number": "8613512345678",
        "time": "1681184764000",
    }


def test_msgid_is_optional_and_left_out_of_the_body() -> None:
    record = parse(msgid=None)
    assert record.msgid is None
    assert "msgid" not in record.provider_body()
    assert BackfillRecord.from_fields(record.to_fields()).msgid is None


def test_leading_plus_is_stripped() -> None:
    assert parse(number="+8613512345678").number == "8613512345678"


@pytest.mark.parametrize("number", ["12345", "1" * 21, "86 135", "86-135123", "abc123", "+", ""])
def test_bad_numbers_are_rejected_by_name(number: str) -> None:
    assert "number" in errors_of(number=number)


def test_number_must_be_a_string() -> None:
    assert "string" in errors_of(number=8613512345678)["number"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1681184764000", "1681184764000"),
        (1681184764000, "1681184764000"),
        (datetime(2023, 4, 11, 3, 46, 4, tzinfo=UTC), "1681184764000"),
        (datetime(2023, 4, 11, 11, 46, 4, tzinfo=timezone(timedelta(hours=8))), "1681184764000"),
    ],
)
def test_time_accepts_the_three_forms(value: object, expected: str) -> None:
    assert parse(time=value).time == expected


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("1681184764", "seconds"),
        (1681184764, "seconds"),
        (1681184764000.0, "float"),
        (datetime(2023, 4, 11, 3, 46, 4), "naive"),
        (True, "bool"),
        ("2023-04-11", "13-digit"),
        ([1], "list"),
    ],
)
def test_time_rejects_other_forms_and_says_which_is_expected(value: object, hint: str) -> None:
    message = errors_of(time=value)["time"]
    assert hint in message
    assert "13-digit" in message


HOUR_MS = 3600 * 1000


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.mark.parametrize(
    "value",
    [
        "0000000000000",  # 1970: a zero default
        "1000000000000",  # 2001
        str(EARLIEST_TIME_MS - 1),
        EARLIEST_TIME_MS - 1,
        datetime(2009, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(2010, 1, 1, 7, 59, tzinfo=timezone(timedelta(hours=8))),  # 2009 in UTC
    ],
)
def test_time_before_2010_is_rejected_by_name(value: object) -> None:
    message = errors_of(time=value)["time"]
    assert "before 2010-01-01T00:00:00Z" in message


@pytest.mark.parametrize(
    "value",
    [
        lambda: "7258118400000",  # 2200-01-01
        lambda: "9999999999999",
        lambda: str(now_ms() + MAX_TIME_AHEAD_MS + HOUR_MS),
        lambda: now_ms() + 25 * HOUR_MS,
        lambda: datetime.now(UTC) + timedelta(hours=25),
        lambda: datetime(2200, 1, 1, tzinfo=timezone(timedelta(hours=-5))),
        lambda: datetime.max.replace(tzinfo=UTC),
    ],
)
def test_time_more_than_a_day_ahead_is_rejected_by_name(value: Callable[[], object]) -> None:
    message = errors_of(time=value())
    assert "time" in message
    assert "ahead of now" in message["time"] or "out of range" in message["time"]


@pytest.mark.parametrize(
    "value",
    [
        str(EARLIEST_TIME_MS),
        EARLIEST_TIME_MS,
        datetime(2010, 1, 1, tzinfo=UTC),
        datetime(2010, 1, 1, 8, tzinfo=timezone(timedelta(hours=8))),
    ],
)
def test_time_at_the_earliest_bound_is_accepted(value: object) -> None:
    assert parse(time=value).time == str(EARLIEST_TIME_MS)


def test_time_up_to_a_day_ahead_is_accepted_for_clock_skew() -> None:
    ahead = now_ms() + 23 * HOUR_MS
    assert parse(time=str(ahead)).time == str(ahead)
    assert parse(time=datetime.now(UTC) + timedelta(hours=23)).time.isdigit()


def test_time_range_bounds_are_exact() -> None:
    now = 1_700_000_000_000
    assert time_out_of_range(EARLIEST_TIME_MS, now) is None
    assert time_out_of_range(now + MAX_TIME_AHEAD_MS, now) is None
    assert "before" in (time_out_of_range(EARLIEST_TIME_MS - 1, now) or "")
    assert "2023-11-14T22:13:20Z" in (time_out_of_range(now + MAX_TIME_AHEAD_MS + 1, now) or "")


def test_time_as_a_huge_int_is_a_form_error_not_a_crash() -> None:
    assert "13-digit" in errors_of(time=10**5000)["time"]
    assert "13-digit" in errors_of(time=-1681184764000)["time"]


def test_unknown_field_names_are_capped_in_number_and_length() -> None:
    extra = {f"x{i:03d}" + "y" * 200: "1" for i in range(50)}
    with pytest.raises(InvalidRecord) as info:
        BackfillRecord.parse({**GOOD, **extra})
    errors = info.value.errors
    assert len(errors) == MAX_UNKNOWN_NAMED + 1
    assert all(len(name) <= 70 for name in errors)
    assert errors["..."] == f"{50 - MAX_UNKNOWN_NAMED} more unknown fields"
    assert len(str(info.value)) < 2000


@pytest.mark.parametrize("value", ["", "has space", "x" * 65, "caf\u00e9", "tab\there"])
def test_app_id_must_be_printable_ascii_without_spaces(value: str) -> None:
    assert "app_id" in errors_of(app_id=value)


def test_every_bad_field_is_named_at_once() -> None:
    with pytest.raises(InvalidRecord) as info:
        BackfillRecord.parse({"app_id": "", "number": "x", "time": 1.5, "colour": "red"})
    assert set(info.value.errors) == {"app_id", "number", "time", "colour"}
    assert "colour: unknown field" in str(info.value)


def test_fingerprint_depends_on_all_four_fields() -> None:
    base = parse().fingerprint()
    assert parse().fingerprint() == base
    for field, other in [("app_id", "app-2"), ("msgid", "m-2"), ("number", "8613512345679")]:
        assert parse(**{field: other}).fingerprint() != base
    assert parse(time="1681184764001").fingerprint() != base
    assert parse(msgid=None).fingerprint() != base


def test_mask_number_keeps_the_last_four_digits() -> None:
    assert mask_number("8613512345678") == "*********5678"
    assert mask_number("123") == "123"
