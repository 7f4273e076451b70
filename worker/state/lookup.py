"""Finding deliveries by msgid and app_id: the read side of enqueue's lookup index.

``lua/enqueue.lua`` enters every new delivery in its app's index, whose entries are
``<msgid>\\0<delivery_id>`` (``\\0<delivery_id>`` without a msgid) in order by name, so one
range finds a msgid. The entries are kept in buckets of at most 128 (``lua/index.lua``):
small sorted sets that Redis keeps in its compact encoding, about 40 bytes an entry instead
of about 130 in one large set; the app's directory ``bf:xd:<app_id>`` lists where each
bucket starts. The apps with an index are listed in ``bf:xa`` for a msgid looked up
without its app_id.

The index is bounded without touching the delivery path: each enqueue run checks two
entries of the app's index per entry it adds (and a few of the next app's, in turn),
from where the previous sweep stopped, and drops those whose delivery is gone (no hash,
no delivered marker). So an entry outlives its delivery by one pass of the sweep at
most, and an app's index holds at most about twice the deliveries it points at; a purge
removes its entries at once. Deliveries enqueued before the index existed are not in it.

``find`` only reads: a page is the deliveries found, each as a short summary (number
masked), and a cursor for the next page (``None`` at the end). With ``callers`` (an
intake token's name) only that caller's deliveries are returned; a page may then be
short, or even empty, with a cursor: each call looks at ``SCAN_BUDGET`` entries at most.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from worker.enqueue.record import PATTERNS
from worker.operate.errors import BackfillError
from worker.operate.redact import cap, mask_number
from worker.state import delivery, keys, reads
from worker.state.reads import Client, read_briefs

F = keys.FIELD  # the delivery hash's field letters

MAX_LIMIT = 1000
SCAN_BUDGET = 2000  # index entries (and apps) one call looks at before it gives a cursor
APP_CHUNK = 100  # apps probed in one round trip by a msgid looked up without its app_id
MAX_CURSOR = 400
PARAMS = ("msgid", "app_id", "limit", "cursor")  # of a URL's query (the intake's GET)
MAX_UNKNOWN_NAMED = 8
_TOKEN = re.compile(PATTERNS["app_id"])  # app_id and msgid, as record.py takes them
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CURSOR = re.compile(r"[A-Za-z0-9_-]+")
_FIELD_RULE = "expected 1 to 64 printable ASCII characters without spaces"


class InvalidQuery(BackfillError, ValueError):
    """A lookup was refused; ``errors`` maps each bad field to the reason."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        detail = "; ".join(f"{field}: {reason}" for field, reason in self.errors.items())
        super().__init__(f"invalid lookup: {detail}")


@dataclass(frozen=True, slots=True)
class Query:
    """A validated lookup: what to match, how many, and where the previous page stopped."""

    msgid: str | None
    app_id: str | None
    limit: int
    start_app: str = ""  # the cursor's app ('' for the first)
    after: str = ""  # the cursor's index entry in that app ('' for its first)


def parse_query(
    msgid: str | None, app_id: str | None, limit: int = 50, cursor: str | None = None
) -> Query:
    """Validate a lookup's inputs (from a CLI or a URL: hostile) or raise InvalidQuery."""
    errors: dict[str, str] = {}
    for name, value in (("msgid", msgid), ("app_id", app_id)):
        if value is not None and not (isinstance(value, str) and _TOKEN.fullmatch(value)):
            errors[name] = _FIELD_RULE
    if msgid is None and app_id is None:
        errors["msgid"] = "required unless app_id is given"
        errors["app_id"] = "required unless msgid is given"
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        errors["limit"] = f"expected a whole number from 1 to {MAX_LIMIT}"
    start_app = after = ""
    if cursor is not None and not errors:
        try:
            start_app, after = _read_cursor(cursor, msgid, app_id)
        except ValueError as exc:
            errors["cursor"] = str(exc)
    if errors:
        raise InvalidQuery(errors)
    return Query(msgid, app_id, limit, start_app, after)


def query_args(pairs: Iterable[tuple[str, str]], max_limit: int) -> dict[str, Any]:
    """``find``'s arguments from a URL's query (each parameter at most once, no others),
    or InvalidQuery naming every bad parameter."""
    given: dict[str, str] = {}
    errors: dict[str, str] = {}
    unknown: set[str] = set()
    for name, value in pairs:
        if name not in PARAMS:
            unknown.add(name)
        elif name in given:
            errors[name] = "given more than once"
        given[name] = value
    for name in sorted(unknown)[:MAX_UNKNOWN_NAMED]:
        errors[cap(name, 64)] = "unknown parameter"
    if len(unknown) > MAX_UNKNOWN_NAMED:
        errors["..."] = f"{len(unknown) - MAX_UNKNOWN_NAMED} more unknown parameters"
    limit = given.get("limit", "50")
    if not re.fullmatch(r"[0-9]{1,4}", limit) or not 1 <= int(limit) <= max_limit:
        errors["limit"] = f"expected a whole number from 1 to {max_limit}"
        limit = "1"
    msgid, app_id, cursor = given.get("msgid"), given.get("app_id"), given.get("cursor")
    try:
        parse_query(msgid, app_id, int(limit), cursor)
    except InvalidQuery as exc:
        errors = {**exc.errors, **errors}
    if errors:
        raise InvalidQuery(errors)
    return {"msgid": msgid, "app_id": app_id, "limit": int(limit), "cursor": cursor}


def find(
    redis_client: Client,
    msgid: str | None,
    app_id: str | None,
    callers: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Deliveries matching ``msgid`` and/or ``app_id``, ``limit`` a page, and the cursor of
    the next page (None at the end); with ``callers``, only that intake caller's."""
    query = parse_query(msgid, app_id, limit, cursor)
    found: list[dict[str, Any]] = []
    budget = SCAN_BUDGET
    for app, first in _probed_apps(redis_client, query):
        budget -= 1
        rows, asked = first, _probe(query)  # what the probe found and asked for
        while rows:
            for member, summary in zip(rows, _summaries(redis_client, app, rows), strict=True):
                if summary is not None and _readable(summary.pop("callers"), callers):
                    found.append(summary)
                    if len(found) == query.limit:
                        return found, _write_cursor(app, member)
            budget -= len(rows)
            if len(rows) < asked:
                break  # this app has no more
            if budget <= 0:
                return found, _write_cursor(app, rows[-1])
            asked = min(query.limit - len(found), budget)
            rows = _entries(redis_client, app, query, rows[-1], asked)
        if budget <= 0:
            return found, _next_app_cursor(redis_client, query, app)
    return found, None


def _probe(query: Query) -> int:
    """How many entries the first read of an app asks for."""
    return min(query.limit, SCAN_BUDGET)


def _range(query: Query, after: str) -> tuple[str, str]:
    """The ZRANGEBYLEX bounds of the query's entries after ``after`` ('' for all)."""
    low, high = "-", "+"
    if query.msgid is not None:
        low, high = f"[{query.msgid}\0", f"({query.msgid}\x01"
    return (f"({after}" if after else low), high


def _entries(client: Client, app: str, query: Query, after: str, want: int) -> list[str]:
    low, high = _range(query, after)
    return reads.index_entries(client, app, low, high, want)


def _probed_apps(client: Client, query: Query) -> Iterator[tuple[str, list[str]]]:
    """Each app to search, in order, with its first entries (probed a chunk at a time)."""
    if query.app_id is not None:
        yield query.app_id, _entries(client, query.app_id, query, query.after, _probe(query))
        return
    low = f"[{query.start_app}" if query.start_app else "-"
    while True:
        names = reads.indexed_apps(client, low, APP_CHUNK)
        if not names:
            return
        ranges = [
            (app, *_range(query, query.after if app == query.start_app else "")) for app in names
        ]
        yield from zip(names, reads.first_entries(client, ranges, _probe(query)), strict=True)
        if len(names) < APP_CHUNK:
            return
        low = f"({names[-1]}"


def _next_app_cursor(client: Client, query: Query, app: str) -> str | None:
    """The cursor that starts at the app after ``app`` (None when ``app`` was the last)."""
    if query.app_id is not None:
        return None
    names = reads.indexed_apps(client, f"({app}", 1)
    return _write_cursor(names[0], "") if names else None


def _summaries(client: Client, app: str, members: Sequence[str]) -> list[dict[str, Any] | None]:
    """Each index entry's delivery as a summary (with its callers), None when it is gone."""
    if not members:
        return []
    ids = [member.partition("\0")[2] for member in members]
    now_ms, found = read_briefs(client, ids, with_time=True)
    assert now_ms is not None
    out: list[dict[str, Any] | None] = []
    for member, delivery_id, brief in zip(members, ids, found, strict=True):
        fields, last, marker = brief
        if any(isinstance(reply, Exception) for reply in brief):
            out.append(None)  # a key of the wrong type: the next claim deals with it
        elif fields:
            history = [] if last is None else [_text(last)]  # the last attempt: its error
            out.append(_summary(delivery_id, _decoded(fields), history, now_ms))
        elif marker:
            msgid = member.partition("\0")[0]
            out.append(_compacted(delivery_id, app, msgid, _text(marker)))
        else:
            out.append(None)  # gone: the sweep will drop the entry
    return out


def _summary(
    delivery_id: str, fields: Mapping[str, str], history: Sequence[str], now_ms: int
) -> dict[str, Any]:
    try:
        doc = delivery.status(delivery_id, fields, history)
    except (ValueError, TypeError, AttributeError):  # a hand-edited attempt document
        doc = delivery.status(delivery_id, fields, [])
    state = doc["state"]
    due = None
    if state == "pending":
        due = doc.get("due_at")
        if _int(fields.get(F["attempts"])) > 0 and _int(fields.get(F["due"])) > now_ms:
            state = "waiting retry"
    return {
        "delivery_id": delivery_id,
        "app_id": doc["app_id"],
        "msgid": doc["msgid"] or None,
        "number": mask_number(doc["number"]) if doc["number"] else None,
        "state": state,
        "attempts": doc["attempts"],
        "created": doc.get("created_at"),
        "due": due,
        "delivered_at": doc.get("delivered_at"),
        "dead_at": doc.get("dead_at"),
        "last_error": doc["last_error"],
        "callers": doc["callers"],
    }


def _compacted(delivery_id: str, app: str, msgid: str, marker: str) -> dict[str, Any] | None:
    """A delivered record compacted to its marker: what the index and the marker know."""
    try:
        doc = delivery.compacted_status(delivery_id, marker)
    except (ValueError, OverflowError, OSError):  # a hand-edited marker
        return None
    return {
        "delivery_id": delivery_id,
        "app_id": app,
        "msgid": msgid or None,
        "number": None,
        "state": "delivered",
        "attempts": None,
        "created": None,
        "due": None,
        "delivered_at": doc["delivered_at"],
        "dead_at": None,
        "last_error": "",
        "callers": doc["callers"],
    }


def _readable(stored: str, caller: str | None) -> bool:
    """Whether ``caller`` may see a delivery with these callers (anyone when None)."""
    return caller is None or (bool(caller) and caller in stored.split(","))


def _write_cursor(app: str, member: str) -> str:
    raw = f"{app}\0{member or chr(0)}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_cursor(text: str, msgid: str | None, app_id: str | None) -> tuple[str, str]:
    """(app, index entry) from a cursor a page gave; ValueError saying what is wrong."""
    problem = "not a cursor a page of this search gave"
    if not isinstance(text, str) or len(text) > MAX_CURSOR or not _CURSOR.fullmatch(text):
        raise ValueError(f"expected up to {MAX_CURSOR} characters of A-Z a-z 0-9 _ -")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise ValueError(problem) from None
    parts = raw.split("\0")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise ValueError(problem)
    app, cursor_msgid, delivery_id = parts
    if cursor_msgid and not _TOKEN.fullmatch(cursor_msgid):
        raise ValueError(problem)
    if delivery_id and not _ID.fullmatch(delivery_id):
        raise ValueError(problem)
    if (app_id is not None and app != app_id) or (
        msgid is not None and delivery_id and cursor_msgid != msgid
    ):
        raise ValueError(problem)
    return app, f"{cursor_msgid}\0{delivery_id}" if delivery_id else ""


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decoded(fields: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(name): _text(value) for name, value in fields.items()}
