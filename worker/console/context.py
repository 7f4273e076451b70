"""What a console route needs of the application: its ``Console`` (store, guard, queue,
templates), ``Refused`` for a request it will not serve, and the POSTed form once its
CSRF token is proven (``posted_form``). ``app`` builds the application around these;
``routes`` uses them, so neither imports the other's way back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import anyio
import jinja2
import structlog
from fastapi import Request
from fastapi.responses import HTMLResponse
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from worker.console.auth import Guard
from worker.console.limits import LoginLimiter
from worker.operate.redact import cap
from worker.state.store import Store

log = structlog.get_logger("worker.console")
FORM_LIMIT = 8 * 1024
FORM_TIMEOUT_S = 10.0


class Refused(Exception):
    """A request the console will not serve, with its status and a fixed message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Console:
    """What the routes need: the store, the guard, the Celery queue, the templates, and
    the count of failed logins."""

    store: Store
    guard: Guard
    queue: str
    templates: jinja2.Environment
    limiter: LoginLimiter

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        """The template ``name`` for the request's user, with a CSRF token for its forms."""
        user = getattr(request.state, "user", "")
        page = self.templates.get_template(name).render(
            user=user, csrf=self.guard.token(user) if user else "", **context
        )
        return HTMLResponse(page, status_code=status)


def console_of(request: Request) -> Console:
    """The Console of the app serving ``request``."""
    console: Console = request.app.state.console
    return console


async def posted_form(request: Request) -> dict[str, str]:
    """The POSTed form, once its CSRF token is proven (Refused 403 otherwise)."""
    form = await read_form(request)
    user = request.state.user
    if not console_of(request).guard.token_valid(user, form.get("csrf", "")):
        log.warning("console.refused", user=user, reason="bad CSRF token",
                    path=cap(request.url.path, 200))  # fmt: skip
        raise Refused(403, "missing or expired form token: reload the page and try again")
    return form


async def read_form(request: Request) -> dict[str, str]:
    """A small url-encoded form (Refused 413/415/400/408); a repeated field keeps its first."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if not media and request.headers.get("content-length", "0") == "0":
        return {}  # no form at all: refused for want of its token
    if media != "application/x-www-form-urlencoded":
        raise Refused(415, "expected a form (application/x-www-form-urlencoded)")
    declared = request.headers.get("content-length", "0")
    if not declared.isascii() or not declared.isdigit() or int(declared) > FORM_LIMIT:
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
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, max_num_fields=16)
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "malformed form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form
