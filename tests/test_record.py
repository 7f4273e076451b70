"""The record and its validation (SPEC section 2), without Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.errors import InvalidRecord
from worker.record import BackfillRecord, mask_number

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
