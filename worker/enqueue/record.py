"""The backfill record and its validation (SPEC section 2). No I/O here.

A record is validated once, when it is enqueued; after that it crosses Redis and
the queue only as a plain mapping of strings (``to_fields`` / ``from_fields``).
"""

from __future__ import annotations

import hashlib
import re
import time as clock
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.operate.errors import InvalidRecord

FIELDS = ("app_id", "msgid", "number", "time")
_TOKEN = re.compile(r"[\x21-\x7e]{1,64}")
_NUMBER = re.compile(r"\+?([0-9]{6,20})")
_EPOCH_MS = re.compile(r"[0-9]{13}")
# The string forms each field accepts, whole (the intake's JSON schema says the same).
PATTERNS = {
    "app_id": _TOKEN.pattern,
    "msgid": _TOKEN.pattern,
    "number": _NUMBER.pattern,
    "time": _EPOCH_MS.pattern,
}
# A verification older than the provider's records or in the future is a producer's bug
# (seconds for milliseconds, a zero default, a bad clock), not a code to report.
EARLIEST_TIME_MS = 1_262_304_000_000  # 2010-01-01T00:00:00Z
MAX_TIME_AHEAD_MS = 24 * 3600 * 1000  # clock skew allowed between the producer and us
MAX_UNKNOWN_NAMED = 8  # unknown field names listed in an error; the rest are counted
_NAME_CAP = 64
_TIME_FORMS = (
    "expected epoch milliseconds as a 13-digit string (e.g. '1681184764000'), "
    "an int of epoch milliseconds, or a timezone-aware datetime"
)


@dataclass(frozen=True, slots=True)
class BackfillRecord:
    """One verified code to report: who (app), which message, which number, when."""

    app_id: str
    number: str
    time: str
    msgid: str | None = None

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> BackfillRecord:
        """Validate raw input (any types) and return a record, or raise InvalidRecord."""
        errors: dict[str, str] = {}
        unknown = sorted(str(name) for name in set(data) - set(FIELDS))
        for name in unknown[:MAX_UNKNOWN_NAMED]:
            shown = name if len(name) <= _NAME_CAP else name[:_NAME_CAP] + "..."
            errors[shown] = "unknown field"
        if len(unknown) > MAX_UNKNOWN_NAMED:
            errors["..."] = f"{len(unknown) - MAX_UNKNOWN_NAMED} more unknown fields"
        app_id = _token(data.get("app_id"), "app_id", required=True, errors=errors)
        msgid = _token(data.get("msgid"), "msgid", required=False, errors=errors)
        number = _number(data.get("number"), errors)
        time = _time(data.get("time"), errors)
        if errors:
            raise InvalidRecord(errors)
        assert app_id is not None
        assert number is not None
        assert time is not None
        return cls(app_id=app_id, msgid=msgid, number=number, time=time)

    def fingerprint(self) -> str:
        """A stable digest of the four fields: the key of idempotent enqueue."""
        joined = "\x1f".join((self.app_id, self.msgid or "", self.number, self.time))
        return hashlib.sha256(joined.encode()).hexdigest()

    def to_fields(self) -> dict[str, str]:
        """The record as flat strings, as stored in Redis (no msgid: empty string)."""
        return {
            "app_id": self.app_id,
            "msgid": self.msgid or "",
            "number": self.number,
            "time": self.time,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> BackfillRecord:
        """Rebuild a record that was validated before it was stored."""
        return cls(
            app_id=fields["app_id"],
            msgid=fields.get("msgid") or None,
            number=fields["number"],
            time=fields["time"],
        )

    def provider_body(self) -> dict[str, str]:
        """The provider's JSON body: appId, msgid (left out when absent), number, time."""
        body = {"appId": self.app_id, "number": self.number, "time": self.time}
        if self.msgid is not None:
            body["msgid"] = self.msgid
        return body


def _token(value: object, field: str, *, required: bool, errors: dict[str, str]) -> str | None:
    if value is None or (value == "" and not required):
        if required:
            errors[field] = "required"
        return None
    if not isinstance(value, str):
        errors[field] = f"expected a string, got {type(value).__name__}"
        return None
    if not _TOKEN.fullmatch(value):
        errors[field] = "expected 1 to 64 printable ASCII characters without spaces"
        return None
    return value


def _number(value: object, errors: dict[str, str]) -> str | None:
    if value is None or value == "":
        errors["number"] = "required"
        return None
    if not isinstance(value, str):
        errors["number"] = f"expected a string of digits, got {type(value).__name__}"
        return None
    match = _NUMBER.fullmatch(value)
    if match is None:
        errors["number"] = "expected 6 to 20 digits with the country prefix (a leading + is ok)"
        return None
    return match.group(1)


def _time(value: object, errors: dict[str, str]) -> str | None:
    if value is None or value == "":
        errors["time"] = "required"
        return None
    if isinstance(value, bool | float):
        errors["time"] = f"{type(value).__name__} not accepted: {_TIME_FORMS}"
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            errors["time"] = f"naive datetime not accepted: {_TIME_FORMS}"
            return None
        try:
            millis = int(value.timestamp() * 1000)
        except (OverflowError, ValueError):  # near datetime.min/max with an offset
            errors["time"] = f"{value.isoformat()} is out of range"
            return None
    elif isinstance(value, int | str):
        # an int too long for str() (Python caps it at 4,300 digits) is no 13-digit value
        text = value if isinstance(value, str) else str(value) if value.bit_length() < 64 else ""
        if not _EPOCH_MS.fullmatch(text):
            hint = " (looks like seconds)" if re.fullmatch(r"[0-9]{10}", text) else ""
            errors["time"] = f"bad value{hint}: {_TIME_FORMS}"
            return None
        millis = int(text)
    else:
        errors["time"] = f"{type(value).__name__} not accepted: {_TIME_FORMS}"
        return None
    problem = time_out_of_range(millis)
    if problem:
        errors["time"] = problem
        return None
    return str(millis)


def time_out_of_range(millis: int, now_ms: int | None = None) -> str | None:
    """Why epoch milliseconds are out of range (before 2010, over 24 h ahead), or None."""
    now_ms = int(clock.time() * 1000) if now_ms is None else now_ms
    if millis < EARLIEST_TIME_MS:
        return f"{_iso(millis)} is before {_iso(EARLIEST_TIME_MS)}, the earliest accepted"
    if millis > now_ms + MAX_TIME_AHEAD_MS:
        return f"{_iso(millis)} is more than 24 h ahead of now ({_iso(now_ms)})"
    return None


def _iso(millis: int) -> str:
    try:
        return datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{millis} ms"
