"""The console application: who may ask, what every answer carries, how pages render.

Every request needs a console user (HTTP Basic, ``auth.Guard``); every answer is
uncacheable and may not be framed; a POST must come from the console's own origin
(checked here, before any route runs) and carry its form's CSRF token (``context.posted_form``),
or it is refused with 403 before anything changes. The pages and actions themselves are
in ``routes``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import jinja2
import redis
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response

from worker.console.auth import REALM, Guard, credentials, same_origin
from worker.console.context import Console, Refused, console_of
from worker.console.limits import LoginLimiter
from worker.console.routes import router
from worker.console.times import record_date, when, when_ms
from worker.operate.redact import cap
from worker.state.store import Store

log = structlog.get_logger("worker.console")
HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}
_UNAUTHORIZED = (
    "<!doctype html><title>401</title>"
    "<p>The console needs a user name and password (BACKFILL_CONSOLE_USERS).</p>"
)
_LIMITED = (
    "<!doctype html><title>429</title>"
    "<p>Too many wrong passwords from this address or for this user: wait and retry.</p>"
)
_CROSS_ORIGIN = (
    "<!doctype html><title>403</title><p>cross-origin request refused: nothing was changed</p>"
)


def create_app(
    store: Store, guard: Guard, queue: str = "backfill", limiter: LoginLimiter | None = None
) -> FastAPI:
    """The console over ``store``, for the users ``guard`` knows, failed logins limited
    by ``limiter`` (by default 10 a minute per address and per user name)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)
    app.state.console = Console(store, guard, queue, _templates(), limiter or LoginLimiter())
    app.middleware("http")(_guarded)
    app.add_exception_handler(Refused, _refused)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(redis.RedisError, _unavailable)  # type: ignore[arg-type]
    app.include_router(router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """On the way out, the summary of each login burst still going on."""
    yield
    console: Console = app.state.console
    console.limiter.flush()


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("worker.console", "templates"),
        autoescape=True,  # every value is escaped, whatever the template's name
        undefined=jinja2.StrictUndefined,
    )
    env.filters["age"] = age
    env.filters["when"] = when
    env.filters["when_ms"] = when_ms
    env.filters["record_date"] = record_date
    return env


def age(seconds: float | None) -> str:
    """A duration for people: "42 s", "3 min 20 s", "2 h 5 min", "1 d 4 h"."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    for size, unit, small, small_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "min"),
                                          (60, "min", 1, "s")):  # fmt: skip
        if whole >= size:
            return f"{whole // size} {unit} {whole % size // small} {small_unit}"
    return f"{whole} s"


async def _guarded(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Only a console user passes (failed logins limited), a POST only from the console's
    own origin; every answer gets the security headers."""
    user, response = _login(request)
    path = cap(request.url.path, 200)
    if response is not None:
        pass
    elif user is None:
        response = HTMLResponse(_UNAUTHORIZED, status_code=401, headers={"WWW-Authenticate": REALM})
    elif request.method not in ("GET", "HEAD") and not same_origin(request.headers):
        log.warning("console.refused", user=user, reason="cross-origin request", path=path)
        response = HTMLResponse(_CROSS_ORIGIN, status_code=403)
    else:
        request.state.user = user
        response = await call_next(request)
    response.headers.update(HEADERS)
    return response


def _login(request: Request) -> tuple[str | None, Response | None]:
    """The console user the request proves (None: none), or the 429 of a limited login.

    A browser's first request has no credentials: a 401 asks for them, uncounted."""
    console = console_of(request)
    presented = request.headers.get("authorization")
    if not presented:
        return None, None
    client = request.client.host if request.client else ""
    name = cap((credentials(presented) or ("", ""))[0], 64)
    wait = console.limiter.retry_after(client, name)
    if wait:
        headers = {"Retry-After": str(wait)}
        return None, HTMLResponse(_LIMITED, status_code=429, headers=headers)
    user = console.guard.user(presented)
    if user is None:
        console.limiter.failed(client, name, known=console.guard.knows(name))
    else:
        console.limiter.succeeded(client, user)
    return user, None


async def _refused(request: Request, exc: Refused) -> Response:
    return console_of(request).render(request, "error.html", exc.status, message=exc.message)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = str(exc.detail)
    return console_of(request).render(request, "error.html", exc.status_code, message=message)


async def _unavailable(request: Request, exc: redis.RedisError) -> Response:
    log.warning("console.redis_unavailable", error=f"{type(exc).__name__}: {exc}"[:200])
    message = "Redis is unavailable; retry later"
    page = console_of(request).render(request, "error.html", 503, message=message)
    page.headers["Retry-After"] = "5"
    return page
