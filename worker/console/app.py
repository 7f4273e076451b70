"""The console's pages and actions: FastAPI routes rendering Jinja2 templates.

Every request needs a console user (HTTP Basic, ``auth.Guard``); every answer is
uncacheable and may not be framed; a POST must come from the console's own origin and
carry its form's CSRF token, or it is refused with 403 before anything changes. Pages
read through ``queries`` (bounded reads, numbers masked); POSTs change state only
through ``actions`` (one audit line per batch, naming the user).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import anyio
import jinja2
import redis
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from worker.console import actions, queries
from worker.console.auth import REALM, Guard, same_origin
from worker.lookup import InvalidQuery
from worker.redact import cap
from worker.store import Store

log = structlog.get_logger("worker.console")
FORM_LIMIT = 8 * 1024
FORM_TIMEOUT_S = 10.0
PAGE = 50
_ID = re.compile(r"[\x21-\x7e]{1,128}")
_QUERY = re.compile(r"[\x21-\x7e]{1,128}")
_CURSOR = re.compile(r"[\x21-\x7e]{1,200}")
_GROUP = re.compile(r"[0-9a-f]{16}")
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
DONE = {  # what a redirect after an action may say (nothing else is ever shown)
    "replayed": "replayed",
    "purged": "purged",
    "not-dead": "not replayed: the delivery is not dead (any more)",
}


class Refused(Exception):
    """A request the console will not serve, with its status and a fixed message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("worker.console", "templates"),
        autoescape=True,  # every value is escaped, whatever the template's name
        undefined=jinja2.StrictUndefined,
    )
    env.filters["age"] = _age
    return env


def _age(seconds: float | None) -> str:
    """A duration for people: "42 s", "3 min 20 s", "2 h 5 min", "1 d 4 h"."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    for size, unit, small, small_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "min"),
                                          (60, "min", 1, "s")):  # fmt: skip
        if whole >= size:
            return f"{whole // size} {unit} {whole % size // small} {small_unit}"
    return f"{whole} s"


def create_app(store: Store, guard: Guard, queue: str = "backfill") -> FastAPI:
    """The console over ``store``, for the users ``guard`` knows."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    templates = _templates()

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        user = getattr(request.state, "user", "")
        page = templates.get_template(name).render(
            user=user, csrf=guard.token(user) if user else "", **context
        )
        return HTMLResponse(page, status_code=status)

    @app.middleware("http")
    async def guarded(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        presented = request.headers.get("authorization")
        user = guard.user(presented)
        if user is None:
            if presented:  # a wrong user or password (a browser's first request has none)
                client = request.client.host if request.client else ""
                log.warning("console.auth_failed", client=client, path=cap(request.url.path, 200))
            response: Response = HTMLResponse(
                "<!doctype html><title>401</title><p>The console needs a user name and "
                "password (BACKFILL_CONSOLE_USERS).</p>",
                status_code=401,
                headers={"WWW-Authenticate": REALM},
            )
        elif request.method not in ("GET", "HEAD") and not same_origin(request.headers):
            log.warning("console.refused", user=user, reason="cross-origin request",
                        path=cap(request.url.path, 200))  # fmt: skip
            response = _page_error(403, "cross-origin request refused: nothing was changed")
        else:
            request.state.user = user
            response = await call_next(request)
        response.headers.update(HEADERS)
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        return render(request, "error.html", exc.status, message=exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return render(request, "error.html", exc.status_code, message=str(exc.detail))

    @app.exception_handler(redis.RedisError)
    async def unavailable(request: Request, exc: redis.RedisError) -> Response:
        log.warning("console.redis_unavailable", error=f"{type(exc).__name__}: {exc}"[:200])
        page = render(request, "error.html", 503, message="Redis is unavailable; retry later")
        page.headers["Retry-After"] = "5"
        return page

    async def posted(request: Request) -> dict[str, str]:
        """The POSTed form, once its CSRF token is proven (Refused 403 otherwise)."""
        form = await read_form(request)
        if not guard.token_valid(request.state.user, form.get("csrf", "")):
            log.warning("console.refused", user=request.state.user, reason="bad CSRF token",
                        path=cap(request.url.path, 200))  # fmt: skip
            raise Refused(403, "missing or expired form token: reload the page and try again")
        return form

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> Response:
        now = time.time()
        figures = store.gauges(queue, now)
        pause = store.pause_state()
        return render(
            request, "overview.html", figures=figures,
            pause=(queries.shown_text(pause[0]), pause[1]) if pause else None,
            outage=queries.outage_since(store.redis), workers=len(store.beats()),
            recent=queries.recent(store.redis, int(now * 1000)),
            oldest=queries.oldest_pending(store.redis, int(now * 1000)),
        )  # fmt: skip

    @app.get("/deliveries", response_class=HTMLResponse)
    def deliveries(request: Request, q: str = "", by: str = "", cursor: str = "") -> Response:
        if not q:
            return render(request, "deliveries.html", q="", sections=[])
        if not _QUERY.fullmatch(q):
            raise Refused(400, "search: 1 to 128 printable ASCII characters without spaces")
        if by not in ("", "id", "msgid", "app_id") or (cursor and not _CURSOR.fullmatch(cursor)):
            raise Refused(400, "search: bad 'by' or 'cursor'")
        sections = []
        for kind in ("id", "msgid", "app_id") if not by else (by,):
            try:
                ids, more = queries.find_ids(store, kind, q, cursor or None, PAGE)
            except InvalidQuery as exc:
                if by:  # asked for this kind: say why; else q just cannot be one of these
                    raise Refused(400, f"search: {exc}") from None
                continue
            rows = queries.summaries(store.redis, ids)
            next_page = urlencode({"q": q, "by": kind, "cursor": more}) if more else ""
            sections.append({"by": kind, "rows": rows, "next": next_page})
        return render(request, "deliveries.html", q=q, sections=sections)

    @app.get("/deliveries/{delivery_id}", response_class=HTMLResponse)
    def one_delivery(request: Request, delivery_id: str, done: str = "") -> Response:
        found = queries.record(store, delivery_id) if _ID.fullmatch(delivery_id) else None
        if found is None:
            raise Refused(404, "no such delivery")
        return render(request, "delivery.html", d=found, done=DONE.get(done, ""))

    @app.post("/deliveries/{delivery_id}/replay")
    async def replay_one(request: Request, delivery_id: str) -> Response:
        await posted(request)
        if not _ID.fullmatch(delivery_id):
            raise Refused(404, "no such delivery")
        user = request.state.user
        replayed = await run_in_threadpool(actions.replay, store, user, [delivery_id])
        done = "replayed" if replayed else "not-dead"
        return _see(f"/deliveries/{quote(delivery_id, safe='')}?" + urlencode({"done": done}))

    @app.get("/dead", response_class=HTMLResponse)
    def dead(request: Request, done: str = "", n: str = "") -> Response:
        groups = queries.dead_groups(store)
        shown = sum(g.count for g in groups)
        return render(
            request, "dead.html", groups=groups, shown=shown, total=store.counts()["dead"],
            done=DONE.get(done, ""), n=int(n) if n.isascii() and n.isdigit() and len(n) < 10 else 0,
        )  # fmt: skip

    @app.post("/dead/replay")
    async def replay_many(request: Request) -> Response:
        form = await posted(request)
        group = _group(form)
        count = await run_in_threadpool(actions.replay_group, store, request.state.user, group)
        return _see("/dead?" + urlencode({"done": "replayed", "n": count}))

    @app.post("/dead/purge")
    async def purge(request: Request) -> Response:
        form = await posted(request)
        user = request.state.user
        target = form.get("delivery_id", "")
        if target and not _ID.fullmatch(target):
            raise Refused(400, "purge: bad delivery_id")
        group = "" if target else _group(form)
        if form.get("confirm") != "yes":
            count = 1 if target else await run_in_threadpool(actions.count_group, store, group)
            return render(request, "confirm.html", target=target, group=form.get("group", ""),
                          count=count)  # fmt: skip
        if target:
            count = await run_in_threadpool(actions.purge, store, user, [target])
        else:
            count = await run_in_threadpool(actions.purge_group, store, user, group)
        return _see("/dead?" + urlencode({"done": "purged", "n": count}))

    return app


def _group(form: dict[str, str]) -> str:
    """The group a form names: an error key, or ``actions.ALL`` for "all"."""
    group = form.get("group", "")
    if group == "all":
        return actions.ALL
    if not _GROUP.fullmatch(group):
        raise Refused(400, "expected a group of dead letters, or all")
    return group


def _see(location: str) -> Response:
    return RedirectResponse(location, status_code=303)


def _page_error(status: int, message: str) -> Response:
    return HTMLResponse(
        f"<!doctype html><title>{status}</title><p>{message}</p>", status_code=status
    )


async def read_form(request: Request) -> dict[str, str]:
    """A small url-encoded form (Refused 413/415/400/408); a repeated field keeps its first."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if not media and request.headers.get("content-length", "0") == "0":
        return {}  # no form at all: refused for want of its token
    if media != "application/x-www-form-urlencoded":
        raise Refused(415, "expected a form (application/x-www-form-urlencoded)")
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > FORM_LIMIT:
        raise Refused(413, f"form over {FORM_LIMIT} bytes")
    body = bytearray()
    try:
        with anyio.fail_after(FORM_TIMEOUT_S):
            async for chunk in request.stream():
                body += chunk
                if len(body) > FORM_LIMIT:
                    raise Refused(413, f"form over {FORM_LIMIT} bytes")
    except TimeoutError:
        raise Refused(408, "form not received in time") from None
    except ClientDisconnect:
        raise Refused(400, "client disconnected") from None
    try:
        pairs = parse_qsl(
            body.decode("ascii"), keep_blank_values=True, strict_parsing=False, max_num_fields=16
        )
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "malformed form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form
