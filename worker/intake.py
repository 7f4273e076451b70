"""``backfill intake``: HTTP enqueue for producers that cannot call Python (PHP, Java, ...).

FastAPI on uvicorn: both well kept and widely deployed, FastAPI publishes the OpenAPI
document, and uvicorn is a production ASGI server. Bodies are read and validated by
hand (the project's own record rules, one place), so the error answers are exactly:
401 bad or missing token, 413 body over 1 MiB, 400 malformed JSON, 422 invalid records
(each bad field per record; nothing of that request is enqueued), 202 accepted.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from worker.errors import InvalidRecord
from worker.producer import enqueue_record, log_enqueued
from worker.record import FIELDS, BackfillRecord, mask_number
from worker.store import Store

MAX_BODY = 1024 * 1024
MAX_RECORDS = 1000
log = structlog.get_logger("worker.intake")

_STRING = {"type": "string"}
RECORD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["app_id", "number", "time"],
    "additionalProperties": False,
    "properties": {
        "app_id": {**_STRING, "pattern": "^[!-~]{1,64}$"},
        "msgid": {**_STRING, "pattern": "^[!-~]{1,64}$"},
        "number": {**_STRING, "pattern": "^\\+?[0-9]{6,20}$"},
        "time": {
            "oneOf": [
                {**_STRING, "pattern": "^[0-9]{13}$"},
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


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def caller_of(request: Request, tokens: Mapping[str, str]) -> str | None:
    """The name of the token the request carries, compared in constant time; None if none."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return None
    found = None
    for name, token in tokens.items():  # no early exit: every token costs the same
        if hmac.compare_digest(presented.encode(), token.encode()):
            found = name
    return found


async def read_limited(request: Request) -> bytes | None:
    """The body, or None once it passes MAX_BODY (declared or actually sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(payload: Any) -> tuple[list[BackfillRecord], bool]:
    """Records of a body (one record, or {"records": [...]}); InvalidRecord lists by index."""
    batch = isinstance(payload, dict) and "records" in payload
    if batch:
        extra = set(payload) - {"records"}
        items = payload["records"]
        if extra or not isinstance(items, list) or not 1 <= len(items) <= MAX_RECORDS:
            raise InvalidRecord(
                {"records": f"expected {{'records': [1 to {MAX_RECORDS} record objects]}}"}
            )
    else:
        items = [payload]
    records, errors = [], []
    for index, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise InvalidRecord({"record": f"expected an object with {', '.join(FIELDS)}"})
            records.append(BackfillRecord.parse(item))
        except InvalidRecord as exc:
            errors.append({"index": index, "fields": exc.errors})
    if errors:
        raise _Rejected(errors)
    return records, batch


class _Rejected(Exception):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("invalid records")
        self.errors = errors


def create_app(store: Store, tokens: Mapping[str, str]) -> FastAPI:
    """The intake application over a Store and the configured {name: token}."""
    app = FastAPI(
        title="postback backfill intake",
        version="1",
        description="Enqueue postback backfill records over HTTP. Bearer token required.",
    )

    @app.post(
        "/v1/backfills",
        status_code=202,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": BODY_SCHEMA}},
            },
            "security": [{"bearer": []}],
        },
        responses={400: {}, 401: {}, 413: {}, 422: {}},
    )
    async def create_backfills(request: Request) -> JSONResponse:
        caller = caller_of(request, tokens)
        if caller is None:
            return _error(401, "missing or unknown bearer token")
        body = await read_limited(request)
        if body is None:
            return _error(413, f"body over {MAX_BODY} bytes")
        try:
            payload = json.loads(body)
        except ValueError:
            return _error(400, "body is not valid JSON")
        try:
            records, batch = parse_body(payload)
        except InvalidRecord as exc:
            return _error(422, "invalid request", errors=[{"index": None, "fields": exc.errors}])
        except _Rejected as exc:
            return _error(422, "invalid records; nothing was enqueued", errors=exc.errors)
        if not batch:
            delivery_id = await run_in_threadpool(
                enqueue_record, records[0], source="intake", caller=caller
            )
            return JSONResponse({"delivery_id": delivery_id}, status_code=202)
        outcomes = await run_in_threadpool(store.enqueue_many, records, source="intake")
        for record, (delivery_id, created) in zip(records, outcomes, strict=True):
            log_enqueued(record, delivery_id, created, source="intake", caller=caller)
        return JSONResponse(
            {
                "delivery_ids": [d for d, _ in outcomes],
                "accepted": sum(1 for _, c in outcomes if c),
                "duplicates": sum(1 for _, c in outcomes if not c),
            },
            status_code=202,
        )

    @app.get("/v1/backfills/{delivery_id}", responses={401: {}, 404: {}})
    async def get_backfill(delivery_id: str, request: Request) -> JSONResponse:
        if caller_of(request, tokens) is None:
            return _error(401, "missing or unknown bearer token")
        status = await run_in_threadpool(store.status, delivery_id)
        if status is None:
            return _error(404, "no such delivery")
        status["number"] = mask_number(status.get("number", ""))
        return JSONResponse(status)

    @app.get("/healthz", responses={503: {}})
    async def healthz() -> JSONResponse:
        try:
            await run_in_threadpool(store.redis.ping)
        except Exception as exc:
            return _error(503, f"redis: {type(exc).__name__}")
        return JSONResponse({"ok": True})

    return app
