"""``backfill intake``: HTTP enqueue for producers that cannot call Python (PHP, Java, ...).

FastAPI on uvicorn: both well kept and widely deployed, FastAPI publishes the OpenAPI
document, and uvicorn is a production ASGI server. Bodies are read and validated by
hand (the project's own record rules, one place), so the answers are exactly:
202 accepted; 401 bad or missing token; 415 not ``application/json``; 413 body over
1 MiB; 408 body not received in time; 400 not JSON or nested too deep; 422 invalid
records (each bad field per record; nothing of that request is enqueued); 503 Redis
unavailable or full (with Retry-After; a full one is named). A token reads only the
deliveries it enqueued (404 for any other id, as for an unknown one), and a lookup by
msgid or app_id (``GET /v1/backfills?msgid=``, ``worker.state.lookup``) finds only those.

Every request is hostile until parsed: the event loop only checks the token and reads
the body (bounded in size and time); decoding, validation and the enqueue run off the
loop: a single record in a small thread pool, a batch (over 16 KiB) in a spawned process
of its own, whose parsing never holds the loop's interpreter lock. A body process ends
when the intake does, however it ends (``worker.enqueue.orphans``). So ``/healthz`` (an
async PING on its own connection) answers from the event loop however busy they are.
The HTTP server's own limits (header deadline, connections) are in
``worker.enqueue.intake_server``.
"""

from __future__ import annotations

import asyncio
import hmac
import multiprocessing
import os
import re
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from worker.enqueue.intake_body import BODY_SCHEMA, MAX_BODY, Refused, decode, parse_body
from worker.enqueue.intake_health import RedisCheck
from worker.enqueue.intake_server import RETRY_AFTER_S, Limits, intake_store
from worker.enqueue.producer import enqueue_record, log_enqueued
from worker.operate.errors import RedisFull
from worker.operate.redact import mask_number
from worker.state.lookup import InvalidQuery, find, query_args
from worker.state.store import Store

LOOKUP_LIMIT = 100  # deliveries per page of GET /v1/backfills?msgid=...
_CONTENT_LENGTH = re.compile(r"[0-9]{1,12}")
_UTF8 = ("utf-8", "utf8")
log = structlog.get_logger("worker.intake")
_LIMITS = Limits()  # the defaults


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    # a refused POST's body is never read: closing spares draining it
    headers = {"WWW-Authenticate": "Bearer", "Connection": "close"} if status == 401 else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _refused(exc: Refused, caller: str | None) -> Response:
    log.info("intake.refused", status=exc.status, error=exc.reason, caller=caller)
    return exc.response()


def _unavailable(exc: redis.RedisError | RedisFull) -> JSONResponse:
    if isinstance(exc, RedisFull | redis.exceptions.OutOfMemoryError):
        log.warning("intake.redis_full", error=str(exc)[:300])
        message = "Redis is full: nothing of this request was stored; retry later"
    else:
        log.warning("intake.redis_unavailable", error=f"{type(exc).__name__}: {exc}"[:200])
        message = "Redis is unavailable; retry later"
    return JSONResponse(
        {"error": message},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


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


def require_json(request: Request) -> None:
    """Refuse (415) a body that is not ``application/json`` (a UTF-8 charset is allowed)."""
    media, _, params = request.headers.get("content-type", "").partition(";")
    if media.strip().lower() != "application/json":
        raise Refused(415, "Content-Type must be application/json", close=True)
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip(' "').lower() not in _UTF8:
            raise Refused(415, "Content-Type charset must be utf-8", close=True)


async def read_limited(request: Request, timeout_s: float) -> bytes:
    """The body; Refused 413 past MAX_BODY (declared or sent), 408 past ``timeout_s``."""
    declared = request.headers.get("content-length")
    if declared is not None and (
        not _CONTENT_LENGTH.fullmatch(declared) or int(declared) > MAX_BODY
    ):
        raise Refused(413, f"body over {MAX_BODY} bytes", close=True)
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY:
                    raise Refused(413, f"body over {MAX_BODY} bytes", close=True)
                chunks.append(chunk)
    except TimeoutError:
        raise Refused(408, f"body not received within {timeout_s:g} s", close=True) from None
    except ClientDisconnect:
        raise Refused(400, "client disconnected before the end of the body") from None
    return b"".join(chunks)


def accept(body: bytes, caller: str, store: Store) -> Response:
    """Decode, validate and enqueue one request's body (in the pool); Redis errors propagate
    but a full Redis, which refused the whole request: that is its 503."""
    try:
        records, batch = parse_body(decode(body))
    except Refused as exc:
        return _refused(exc, caller)
    try:
        if not batch:
            delivery_id = enqueue_record(records[0], source="intake", caller=caller, store=store)
            return JSONResponse({"delivery_id": delivery_id}, status_code=202)
        outcomes = store.enqueue_many(records, source="intake", caller=caller)
    except RedisFull as exc:
        return _unavailable(exc)
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


# A body this large (a batch) is decoded, validated and enqueued in a process of its own,
# so its parsing never holds the event loop's interpreter lock; smaller ones (single
# records) stay in a thread, where the hop to a process would cost more than it saves.
PROCESS_OVER = 16 * 1024
_store: Store | None = None  # a body process's own (see _start_body_process)


def _start_body_process(tokens: list[str], parent: int = 0) -> None:
    """In a body process: end with the intake (``parent``), then its settings, logging,
    redaction and fail-fast store."""
    global _store  # noqa: PLW0603 - one store per process, built once, like runtime's
    from worker.enqueue.orphans import end_with_parent

    if parent:
        end_with_parent(parent)
    from worker.operate.audit import configure_logging, redactor
    from worker.runtime import get_settings

    settings = get_settings()
    for token in tokens:
        redactor.add_secret(token)
    configure_logging(settings.log_format, settings.log_level)
    _store = intake_store(settings)


def _accept_here(body: bytes, caller: str) -> tuple[int, bytes, dict[str, str]]:
    """``accept`` in a body process; the answer as plain data for the event loop."""
    assert _store is not None
    response = accept(body, caller, _store)
    extra = {
        name.decode(): value.decode()
        for name, value in response.raw_headers
        if name.lower() not in (b"content-length", b"content-type")
    }
    return response.status_code, bytes(response.body), extra


def _ready() -> bool:
    return _store is not None


def create_app(
    store: Store, tokens: Mapping[str, str], health: aioredis.Redis, limits: Limits = _LIMITS
) -> FastAPI:
    """The intake over a fail-fast Store, the {name: token} map and a /healthz client."""
    pool = ThreadPoolExecutor(limits.threads, thread_name_prefix="intake")
    # spawned, not forked: a fork of a threaded server could inherit a held lock
    batches = ProcessPoolExecutor(
        limits.threads,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_body_process,
        initargs=(list(tokens.values()), os.getpid()),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()  # start the body processes before serving
        await asyncio.gather(
            *(loop.run_in_executor(batches, _ready) for _ in range(limits.threads))
        )
        yield
        pool.shutdown(wait=False, cancel_futures=True)
        batches.shutdown(wait=False, cancel_futures=True)
        await health.aclose()

    app = FastAPI(
        title="postback backfill intake",
        version="1",
        description="Enqueue postback backfill records over HTTP. Bearer token required.",
        lifespan=lifespan,
    )
    _enqueue_route(app, store, tokens, limits, pool, batches)
    _read_routes(app, store, tokens)
    _health_route(app, RedisCheck(health))
    return app


def _enqueue_route(
    app: FastAPI,
    store: Store,
    tokens: Mapping[str, str],
    limits: Limits,
    pool: ThreadPoolExecutor,
    batches: ProcessPoolExecutor,
) -> None:
    """POST /v1/backfills: small bodies in a thread, larger ones in a body process."""

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
        responses={400: {}, 401: {}, 408: {}, 413: {}, 415: {}, 422: {}, 503: {}},
    )
    async def create_backfills(request: Request) -> Response:
        caller = caller_of(request, tokens)
        if caller is None:
            log.info("intake.refused", status=401, error="missing or unknown bearer token")
            return _error(401, "missing or unknown bearer token")
        try:
            require_json(request)
            body = await read_limited(request, limits.body_timeout_s)
            loop = asyncio.get_running_loop()
            if len(body) <= PROCESS_OVER:
                return await loop.run_in_executor(pool, accept, body, caller, store)
            answer = await loop.run_in_executor(batches, _accept_here, body, caller)
            status, content, extra = answer
            return Response(content, status, extra, media_type="application/json")
        except Refused as exc:
            return _refused(exc, caller)
        except redis.RedisError as exc:
            return _unavailable(exc)


def _read_routes(app: FastAPI, store: Store, tokens: Mapping[str, str]) -> None:
    """GET /v1/backfills (lookup by msgid, app_id) and GET /v1/backfills/{id}: the
    caller's deliveries only."""

    @app.get("/v1/backfills", responses={400: {}, 401: {}, 503: {}})
    async def find_backfills(request: Request) -> Response:
        """The caller's deliveries by ``msgid`` and/or ``app_id`` (``limit``, ``cursor``)."""
        caller = caller_of(request, tokens)
        if caller is None:
            return _error(401, "missing or unknown bearer token")
        try:
            args = query_args(request.query_params.multi_items(), LOOKUP_LIMIT)
            rows, cursor = await run_in_threadpool(find, store.redis, callers=caller, **args)
        except InvalidQuery as exc:
            log.info("intake.refused", status=400, error="invalid query", caller=caller)
            return _error(400, str(exc), fields=exc.errors)
        except redis.RedisError as exc:
            return _unavailable(exc)
        return JSONResponse({"deliveries": rows, "next_cursor": cursor})

    @app.get("/v1/backfills/{delivery_id}", responses={401: {}, 404: {}, 503: {}})
    async def get_backfill(delivery_id: str, request: Request) -> Response:
        caller = caller_of(request, tokens)
        if caller is None:
            return _error(401, "missing or unknown bearer token")
        status = None
        try:
            if len(delivery_id) <= 64:  # a longer one is none of ours; spare Redis the key
                status = await run_in_threadpool(store.status, delivery_id)
        except redis.RedisError as exc:
            return _unavailable(exc)
        # another caller's delivery answers exactly like an unknown one: ids cannot be probed
        if status is None or caller not in status.pop("callers", "").split(","):
            return _error(404, "no such delivery")
        status["number"] = mask_number(status.get("number", ""))
        return JSONResponse(status)


def _health_route(app: FastAPI, redis_check: RedisCheck) -> None:
    """GET /healthz: Redis answers within HEALTH_TIMEOUT_S (else 503)."""

    @app.get("/healthz", responses={503: {}})
    async def healthz() -> Response:
        problem = await redis_check.problem()
        if problem:
            return _error(503, f"redis: {problem}")
        return JSONResponse({"ok": True})
