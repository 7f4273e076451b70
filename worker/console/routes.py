"""The console's pages (GET) and actions (POST), over ``queries`` and ``actions``.

Pages read through ``queries`` (bounded reads, numbers masked). Actions change state
only through ``actions`` (one audit line per batch, naming the user), after
``posted_form`` has proven the form's CSRF token, and answer with a redirect (303) to a
page that says what was done.
"""

from __future__ import annotations

import re
import time
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from worker.console import actions, queries, watch
from worker.console.chart import chart
from worker.console.context import Console, Refused, console_of, posted_form
from worker.state.dead_letters import DeadEnd
from worker.state.lookup import InvalidQuery

PAGE = 50
_ID = re.compile(r"[\x21-\x7e]{1,128}")
_QUERY = re.compile(r"[\x21-\x7e]{1,128}")
_CURSOR = re.compile(r"[\x21-\x7e]{1,200}")
_GROUP = re.compile(r"[0-9a-f]{16}")
_END = re.compile(r"[0-9]{1,15}")  # a moment of Redis's clock, ms
_REPLAYED = re.compile(r"[A-Za-z0-9_-]{1,128}")  # a delivery id as enqueue makes them
REPLAYED_SHOWN = 20  # the replayed letters a replay's result lists
_KINDS = ("id", "msgid", "app_id")
REFRESH = ("10", "30", "60")  # the auto-refresh periods offered (s)
DONE = {  # what a redirect after an action may say (nothing else is ever shown)
    "replayed": "replayed",
    "purged": "purged",
    "not-dead": "not replayed: the delivery is not dead (any more)",
}
router = APIRouter()


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, refresh: str = "") -> Response:
    """Counts by state, pause or outage, outcomes per minute, the lanes, the oldest pending."""
    console = console_of(request)
    store, now = console.store, time.time()
    pause = store.pause_state()
    now_ms = int(now * 1000)
    return console.render(
        request, "overview.html", figures=store.gauges(console.queue, now),
        pause=(queries.shown_text(pause[0]), pause[1]) if pause else None,
        outage=queries.outage_since(store), workers=len(store.beats()),
        recent=queries.recent(store.redis, now_ms, window_s=store.dedupe_ttl_s),
        oldest=queries.oldest_pending(store.redis, now_ms),
        chart=chart(watch.outcomes(store.redis, now_ms)), lanes=watch.lanes(store.redis, now_ms),
        refresh=_refresh(refresh), refresh_choices=REFRESH, here="/",
    )  # fmt: skip


@router.get("/list", response_class=HTMLResponse)
def by_state(
    request: Request, state: str = "pending", lane: str = "live", page: str = "1",
    refresh: str = "",
) -> Response:  # fmt: skip
    """The deliveries in one state (pending and waiting: of one lane), a page at a time."""
    if state not in watch.STATES or lane not in watch.LANES:
        raise Refused(
            400, "list: state is pending, waiting, dead or delivered; lane is live or bulk"
        )
    if not (page.isascii() and page.isdigit() and 1 <= int(page) <= 1_000_000):
        raise Refused(400, "list: page is a number from 1")
    console = console_of(request)
    client, now_ms = console.store.redis, int(time.time() * 1000)
    found = watch.page_of(client, state, lane, int(page), now_ms)
    here = "/list?" + urlencode({"state": state, "lane": lane, "page": page})
    return console.render(
        request, "list.html", state=state, lane=lane, page=found, states=watch.STATES,
        lanes=watch.LANES, laned=watch.LANED, refresh=_refresh(refresh),
        refresh_choices=REFRESH, here=here,
    )  # fmt: skip


def _refresh(asked: str) -> str:
    """The auto-refresh period asked for, if offered ("" for none)."""
    return asked if asked in REFRESH else ""


@router.get("/deliveries", response_class=HTMLResponse)
def deliveries(request: Request, q: str = "", by: str = "", cursor: str = "") -> Response:
    """Search by delivery_id, msgid or app_id (``by``: just one), a page at a time."""
    console = console_of(request)
    if not q:
        return console.render(request, "deliveries.html", q="", sections=[])
    if not _QUERY.fullmatch(q):
        raise Refused(400, "search: 1 to 128 printable ASCII characters without spaces")
    if (by and by not in _KINDS) or (cursor and not _CURSOR.fullmatch(cursor)):
        raise Refused(400, "search: bad 'by' or 'cursor'")
    sections = []
    for kind in (by,) if by else _KINDS:
        try:
            ids, more = queries.find_ids(console.store, kind, q, cursor or None, PAGE)
        except InvalidQuery as exc:
            if by:  # asked for this kind: say why; else q just cannot be one of these
                raise Refused(400, f"search: {exc}") from None
            continue
        rows = queries.summaries(console.store.redis, ids)
        next_page = urlencode({"q": q, "by": kind, "cursor": more}) if more else ""
        sections.append({"by": kind, "rows": rows, "next": next_page})
    return console.render(request, "deliveries.html", q=q, sections=sections)


@router.get("/deliveries/{delivery_id}", response_class=HTMLResponse)
def one_delivery(request: Request, delivery_id: str, done: str = "") -> Response:
    """One delivery with every attempt it kept."""
    console = console_of(request)
    found = queries.record(console.store, delivery_id) if _ID.fullmatch(delivery_id) else None
    if found is None:
        raise Refused(404, "no such delivery")
    return console.render(request, "delivery.html", d=found, done=DONE.get(done, ""))


@router.post("/deliveries/{delivery_id}/replay")
async def replay_one(request: Request, delivery_id: str) -> Response:
    """Replay one dead letter."""
    await posted_form(request)
    if not _ID.fullmatch(delivery_id):
        raise Refused(404, "no such delivery")
    store, user = console_of(request).store, request.state.user
    replayed = await run_in_threadpool(actions.replay, store, user, [delivery_id])
    done = "replayed" if replayed else "not-dead"
    return _see(f"/deliveries/{quote(delivery_id, safe='')}?" + urlencode({"done": done}))


@router.get("/dead", response_class=HTMLResponse)
def dead(request: Request, done: str = "", n: str = "", later: str = "", ids: str = "") -> Response:
    """The newest dead letters grouped by last error, with replay and purge buttons; after
    a replay of a group or of all, the first letters it replayed, each with its state now."""
    console = console_of(request)
    groups = queries.dead_groups(console.store)
    replayed = _ids(ids) if done == "replayed" else []
    return console.render(
        request, "dead.html", groups=groups, shown=sum(g.count for g in groups),
        total=console.store.counts()["dead"], done=DONE.get(done, ""), n=_count(n),
        later=_count(later), replayed=queries.summaries(console.store.redis, replayed),
    )  # fmt: skip


@router.post("/dead/replay")
async def replay_many(request: Request) -> Response:
    """Replay a group of dead letters, or all: a page asking to confirm, counting up to an
    end it carries in its form, then the replay up to that end."""
    form = await posted_form(request)
    group = _group(form)
    console, user = console_of(request), request.state.user
    if form.get("confirm") != "yes":
        return await _confirm(request, "replay", "", group, form)
    end = await _counted(console, form)
    result = await run_in_threadpool(
        actions.replay_group_until, console.store, user, group, end, REPLAYED_SHOWN
    )
    said = {"done": "replayed", "n": result.done, "later": result.later}
    return _see("/dead?" + urlencode({**said, "ids": ",".join(result.first)}))


@router.post("/dead/purge")
async def purge(request: Request) -> Response:
    """Purge one dead letter, a group or all: a page asking to confirm, then the purge (of
    a group or all: up to the end the page counted to)."""
    form = await posted_form(request)
    console, user = console_of(request), request.state.user
    target = form.get("delivery_id", "")
    if target and not _ID.fullmatch(target):
        raise Refused(400, "purge: bad delivery_id")
    group = "" if target else _group(form)
    if form.get("confirm") != "yes":
        return await _confirm(request, "purge", target, group, form)
    if target:
        count = await run_in_threadpool(actions.purge, console.store, user, [target])
    else:
        end = await _counted(console, form)
        found = await run_in_threadpool(actions.purge_group_until, console.store, user, group, end)
        count = found.done
    return _see("/dead?" + urlencode({"done": "purged", "n": count}))


async def _confirm(
    request: Request, action: str, target: str, group: str, form: dict[str, str]
) -> Response:
    """The page asking to confirm: how many letters now, and the end it counted up to."""
    console = console_of(request)
    if target:
        before, count = "", 1
    else:
        at, end = await run_in_threadpool(actions.counted_end, console.store)
        count = await run_in_threadpool(actions.count_group, console.store, group, end)
        before = str(at)
    return console.render(request, "confirm.html", action=action, target=target,
                          group=form.get("group", ""), count=count, end=before)  # fmt: skip


async def _counted(console: Console, form: dict[str, str]) -> DeadEnd:
    """The end a confirmation page counted up to, from its form's ``end`` (Redis's clock,
    ms): digits only, and a moment already past (Refused 400 otherwise)."""
    text = form.get("end", "")
    if not _END.fullmatch(text):
        raise Refused(400, "expected the end the confirmation page counted to: reload it")
    try:
        _, end = await run_in_threadpool(actions.counted_end, console.store, int(text))
    except ValueError:
        raise Refused(400, "the confirmation's end is still to come: reload the page") from None
    return end


def _count(text: str) -> int:
    """A count from a redirect's query (0 unless plain digits of a sane length)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 10 else 0


def _ids(text: str) -> list[str]:
    """The delivery ids a replay's redirect names (at most REPLAYED_SHOWN; bad ones dropped)."""
    found = [i for i in text.split(",")[:REPLAYED_SHOWN] if _REPLAYED.fullmatch(i)]
    return list(dict.fromkeys(found))


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
