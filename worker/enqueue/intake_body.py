"""What the intake accepts as a body, and how it says no (no I/O here).

A body is one record or ``{"records": [...]}`` (1 to 1,000), JSON in UTF-8, at most
1 MiB, arrays and objects nested at most 32 deep. The depth is checked on the raw bytes
before ``json.loads`` runs: the parser recurses once per level, so 100,000 ``[`` would
otherwise end in a RecursionError.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.responses import JSONResponse

from worker.enqueue.record import FIELDS, PATTERNS, BackfillRecord
from worker.operate.errors import InvalidRecord

MAX_BODY = 1024 * 1024
MAX_RECORDS = 1000
MAX_DEPTH = 32
# A JSON string, as the parser reads it (possessive: linear on any input).
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_OPENERS = frozenset(b"[{")

_STRING = {"type": "string"}
RECORD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["app_id", "number", "time"],
    "additionalProperties": False,
    "properties": {
        "app_id": {**_STRING, "pattern": f"^{PATTERNS['app_id']}$"},
        "msgid": {**_STRING, "pattern": f"^{PATTERNS['msgid']}$"},
        "number": {**_STRING, "pattern": f"^{PATTERNS['number']}$"},
        "time": {
            "oneOf": [
                {**_STRING, "pattern": f"^{PATTERNS['time']}$"},
                {"type": "integer", "minimum": 10**12, "maximum": 10**13 - 1},
            ]
        },
    },
}
BODY_SCHEMA: dict[str, Any] = {
    "oneOf": [
        RECORD_SCHEMA,
        {
            "type": "object",
            "required": ["records"],
            "additionalProperties": False,
            "properties": {
                "records": {
                    "type": "array",
                    "items": RECORD_SCHEMA,
                    "minItems": 1,
                    "maxItems": MAX_RECORDS,
                }
            },
        },
    ]
}


class Refused(Exception):
    """A request the intake answers with a 4xx: the status and a one-line reason."""

    def __init__(self, status: int, reason: str, *, close: bool = False, **extra: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.close = close  # the body was not (all) read: close rather than drain it
        self.extra = extra

    def response(self) -> JSONResponse:
        """The JSON answer: ``{"error": reason, ...}``."""
        headers = {"Connection": "close"} if self.close else None
        return JSONResponse(
            {"error": self.reason, **self.extra}, status_code=self.status, headers=headers
        )


def nesting_depth_over(body: bytes, limit: int) -> bool:
    """True when arrays and objects nest deeper than ``limit`` (brackets in strings skipped).

    Exact for the part of the body ``json.loads`` reads before it would stop on an error.
    """
    depth = 0
    for byte in _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKET):
        if byte in _OPENERS:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(body: bytes) -> Any:
    """The parsed body; Refused 400 when it is not JSON or nests deeper than MAX_DEPTH."""
    if nesting_depth_over(body, MAX_DEPTH):
        raise Refused(400, f"body nests arrays/objects deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constants)
    except RecursionError:  # the depth check makes this unreachable; never a 500 if not
        raise Refused(400, f"body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, not UTF-8, NaN, a 5,000-digit number
        raise Refused(400, f"body is not valid JSON: {str(exc)[:120]}") from None


def parse_body(payload: Any) -> tuple[list[BackfillRecord], bool]:
    """Records of a body (one record, or {"records": [...]}) and whether it was a batch.

    Refused 422 lists each bad field by record index; then nothing may be enqueued.
    """
    batch = isinstance(payload, dict) and "records" in payload
    if batch:
        extra = set(payload) - {"records"}
        items = payload["records"]
        if extra or not isinstance(items, list) or not 1 <= len(items) <= MAX_RECORDS:
            reason = f"expected {{'records': [1 to {MAX_RECORDS} record objects]}}"
            raise Refused(
                422, "invalid request", errors=[{"index": None, "fields": {"records": reason}}]
            )
    else:
        items = [payload]
    records: list[BackfillRecord] = []
    errors: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise InvalidRecord({"record": f"expected an object with {', '.join(FIELDS)}"})
            records.append(BackfillRecord.parse(item))
        except InvalidRecord as exc:
            errors.append({"index": index, "fields": exc.errors})
    if errors:
        raise Refused(422, "invalid records; nothing was enqueued", errors=errors)
    return records, batch
