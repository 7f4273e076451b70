"""Lookup by msgid and app_id: the index enqueue keeps, ``find``, ``backfill find`` and the
intake's ``GET /v1/backfills?msgid=``, against real Redis, a real CLI and a real intake."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis
import requests
from click.testing import CliRunner

from tests import intake_helpers
from tests.conftest import unique, wait_for
from tests.helpers import step_through
from worker import enqueue_backfill
from worker.cli import main
from worker.deliver.policy import AnswerClass, Outcome, Verdict
from worker.deliver.provider import Answer
from worker.deliver.steps import Finish
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis
from worker.state import keys, lookup, reads
from worker.state.connection import connect
from worker.state.delivery import delivery_id as id_of
from worker.state.lookup import InvalidQuery, find, parse_query
from worker.state.store import Store

NUMBER = "8613512345678"
SHOWN = "*********5678"
TIME = "1681184764000"
SHOP, SHOP_TOKEN = "php-shop", "lookup-token-php-shop-0123456789"
CRM, CRM_TOKEN = "java-crm", "lookup-token-java-crm-9876543210"
ANSWERS = {
    Outcome.DELIVERED: Answer(AnswerClass.SUCCESS, http_status=200, api_status="0"),
    Outcome.DEAD: Answer(AnswerClass.BAD_RECORD, http_status=200, api_status="-9",
                         api_reason="invalid number", error="status -9: invalid number"),
    Outcome.RETRY: Answer(AnswerClass.TRANSIENT, http_status=200, api_status="-12",
                          api_reason="busy"),
}  # fmt: skip


# -- a Redis of this module's own, with no worker: the tests move deliveries on themselves


@pytest.fixture
def store_options() -> dict[str, Any]:
    """``store`` compacts a delivered record at once (only its marker stays)."""
    return {"keep_delivered_s": 0}


def rec(app: str = "app-a", msgid: str | None = None, number: str = NUMBER) -> BackfillRecord:
    return BackfillRecord(app, number, TIME, msgid=msgid)


def settle(store: Store, outcome: Outcome) -> list[str]:
    """Claim every due delivery and record ``outcome`` for it through the real step
    script, as a worker does; the ids settled."""
    retry = 3600.0 if outcome == Outcome.RETRY else None
    verdict = Verdict(outcome, retry)
    return step_through(
        store, lambda c: Finish(c, ANSWERS[outcome], verdict), claim=8, max_attempts=16
    )


def entries(client: redis.Redis, app: str) -> set[tuple[str, str]]:
    """The (msgid, delivery_id) pairs in an app's index."""
    members = reads.index_entries(client, app, "-", "+", 10**6)
    return {(member.partition("\0")[0], member.partition("\0")[2]) for member in members}


def every_page(
    client: redis.Redis, msgid: str | None, app_id: str | None, **kwargs: Any
) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        rows, cursor = find(client, msgid, app_id, cursor=cursor, **kwargs)
        pages.append(rows)
        if cursor is None:
            return pages
        assert len(pages) < 200


def expire_markers(store: Store, ids: list[str]) -> None:
    """What the dedupe window's end does to delivered records (their TTL, here at once)."""
    store.redis.delete(*[keys.marker(i) for i in ids])


# -- the index


def test_every_new_delivery_is_indexed_by_app_and_msgid(store: Store) -> None:
    single = rec(msgid="m-single")
    store.enqueue(single)
    batch = [rec("app-a", f"m-{i}", f"861351234{i:04d}") for i in range(1200)]
    batch += [rec("app-b", "m-7"), rec("app-b"), rec("app-b")]  # no msgid; twice in a batch
    outcomes = store.enqueue_many(batch)
    assert sum(created for _, created in outcomes) == 1202

    expected_a = {("m-single", id_of(single))} | {(r.msgid or "", id_of(r)) for r in batch[:1200]}
    assert entries(store.redis, "app-a") == expected_a
    assert entries(store.redis, "app-b") == {("m-7", id_of(batch[-3])), ("", id_of(batch[-2]))}
    assert store.redis.zrange(keys.INDEX_APPS, 0, -1) == ["app-a", "app-b"]


def test_a_repeat_adds_nothing_and_a_revived_dead_letter_keeps_its_one_entry(
    store: Store,
) -> None:
    record = rec(msgid="m-revive")
    delivery_id, _ = store.enqueue(record)
    store.enqueue(record)
    assert settle(store, Outcome.DEAD) == [delivery_id]
    assert [row["state"] for row in find(store.redis, "m-revive", None)[0]] == ["dead"]

    assert store.enqueue(record) == (delivery_id, True)  # brought back, same id
    assert entries(store.redis, "app-a") == {("m-revive", delivery_id)}
    rows, cursor = find(store.redis, "m-revive", "app-a")
    assert ([r["state"] for r in rows], cursor) == (["pending"], None)


def test_find_by_msgid_with_and_without_its_app_id(store: Store) -> None:
    mine = [rec("app-a", "m1", "8613500000001"), rec("app-a", "m1", "8613500000002")]
    other = rec("app-b", "m1")
    near = [rec("app-a", "m10"), rec("app-a", "m"), rec("app-a", "m1-x"), rec("app-a")]
    store.enqueue_many([*mine, other, *near])

    rows, cursor = find(store.redis, "m1", "app-a")
    assert cursor is None
    assert {r["delivery_id"] for r in rows} == {id_of(r) for r in mine}
    assert {r["number"] for r in rows} == {"*********0001", "*********0002"}
    everywhere = {(r["app_id"], r["delivery_id"]) for r in find(store.redis, "m1", None)[0]}
    assert everywhere == {("app-a", id_of(mine[0])), ("app-a", id_of(mine[1])),
                          ("app-b", id_of(other))}  # fmt: skip
    assert find(store.redis, "m1", "app-c") == ([], None)
    assert find(store.redis, "nothing-like-it", None) == ([], None)
    # the record without a msgid is listed with its app, never found by a msgid
    listed = {r["msgid"] for r in find(store.redis, None, "app-a")[0]}
    assert listed == {"m1", "m10", "m", "m1-x", None}


def test_each_state_is_shown_and_a_compacted_delivery_is_still_found(store: Store) -> None:
    pending, retrying, dead, delivered = (rec(msgid=f"m-{n}") for n in range(4))
    for record, outcome in ((delivered, Outcome.DELIVERED), (dead, Outcome.DEAD),
                            (retrying, Outcome.RETRY)):  # fmt: skip
        store.enqueue(record)
        settle(store, outcome)
    store.enqueue(pending, due_in_s=3600)

    rows = {r["msgid"]: r for r in find(store.redis, None, "app-a")[0]}
    assert {m: r["state"] for m, r in rows.items()} == {
        "m-0": "pending", "m-1": "waiting retry", "m-2": "dead", "m-3": "delivered"
    }  # fmt: skip
    assert store.redis.exists(keys.delivery(id_of(delivered))) == 0  # only the marker is left
    compacted = rows["m-3"]
    assert compacted["delivered_at"]
    assert compacted["number"] is None
    assert (compacted["app_id"], compacted["delivery_id"]) == ("app-a", id_of(delivered))
    assert rows["m-1"]["attempts"] == 1
    assert rows["m-1"]["due"]
    assert rows["m-1"]["last_error"]
    assert rows["m-2"]["last_error"] == "status -9: invalid number"
    assert rows["m-2"]["dead_at"]
    assert rows["m-0"]["attempts"] == 0
    assert rows["m-0"]["created"]
    assert all(r["number"] in (SHOWN, None) for r in rows.values())
    assert NUMBER not in json.dumps(rows)


def test_pages_visit_every_delivery_once(store: Store) -> None:
    store.enqueue_many([rec("app-a", f"m-{i:02d}", f"86135000000{i:02d}") for i in range(25)])
    store.enqueue_many([rec(f"app-{n}", "shared", f"86135000001{n:02d}") for n in range(7)])

    pages = every_page(store.redis, None, "app-a", limit=7)
    assert [len(p) for p in pages] == [7, 7, 7, 4]
    assert sorted(r["msgid"] for p in pages for r in p) == [f"m-{i:02d}" for i in range(25)]
    pages = every_page(store.redis, "shared", None, limit=2)
    apps = [r["app_id"] for p in pages for r in p]
    assert apps == [f"app-{n}" for n in range(7)]
    # a cursor belongs to its search
    cursor = find(store.redis, None, "app-a", limit=3)[1]
    with pytest.raises(InvalidQuery) as refused:
        find(store.redis, None, "app-b", cursor=cursor)
    assert set(refused.value.errors) == {"cursor"}


def test_callers_see_only_their_deliveries_a_budget_at_a_time(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = [rec("app-a", "m", f"86135000000{i:02d}") for i in range(30)]
    store.enqueue_many(theirs, caller="crm")
    mine = rec("app-a", "m", "8613599999999")
    store.enqueue_many([mine], caller="shop")
    store.enqueue_many([mine], caller="crm")  # the same record from a second caller
    store.enqueue_many([rec("app-a", "m", "8613588888888")])  # no caller: Python API, CLI

    assert {r["delivery_id"] for r in find(store.redis, "m", None, callers="shop")[0]} == {
        id_of(mine)
    }
    assert len(find(store.redis, "m", "app-a", callers="crm", limit=100)[0]) == 31
    assert len(find(store.redis, "m", "app-a", limit=100)[0]) == 32
    assert find(store.redis, "m", "app-a", callers="")[0] == []
    assert all("callers" not in r for r in find(store.redis, "m", None)[0])

    monkeypatch.setattr(lookup, "SCAN_BUDGET", 5)  # a page may come back short, with a cursor
    pages = every_page(store.redis, "m", None, callers="shop")
    assert len(pages) > 3
    assert [r["delivery_id"] for p in pages for r in p] == [id_of(mine)]


def test_a_purge_takes_the_entries_and_leaves_no_index_keys(store: Store) -> None:
    records = [rec(f"app-{i % 3}", f"m-{i}" if i % 4 else None, f"86135000000{i:02d}")
               for i in range(40)]  # fmt: skip
    store.enqueue_many(records)
    ids = settle(store, Outcome.DEAD)
    assert len(ids) == 40
    assert store.purge(ids[:10]) == 10
    left = {i for app in ("app-0", "app-1", "app-2") for _, i in entries(store.redis, app)}
    assert left == set(ids[10:])

    assert store.purge(ids[10:]) == 30
    # nothing of the deliveries is left; the console's outcomes per minute are figures
    minute = keys.outcomes_in(0).removesuffix("0")
    assert [k for k in store.redis.scan_iter(f"{keys.PREFIX}*") if not k.startswith(minute)] == []
    assert find(store.redis, None, "app-0") == ([], None)


def test_entries_of_gone_deliveries_are_swept_and_live_ones_kept(store: Store) -> None:
    alive = [rec(msgid=f"alive-{i}") for i in range(50)]
    store.enqueue_many(alive, due_in_s=3600)
    gone = [rec(msgid=f"gone-{i}") for i in range(300)]
    store.enqueue_many(gone)
    expire_markers(store, settle(store, Outcome.DELIVERED))  # only the gone ones were due
    assert len(entries(store.redis, "app-a")) == 350
    shown = find(store.redis, None, "app-a", limit=1000)[0]  # what is gone is not shown
    assert {row["msgid"] for row in shown} == {r.msgid for r in alive}

    fresh = [rec(msgid=f"fresh-{i}") for i in range(400)]
    for start in range(0, 400, 20):  # 40 entries checked per batch (and 16 in turn)
        store.enqueue_many(fresh[start : start + 20], due_in_s=3600)
    kept = {msgid for msgid, _ in entries(store.redis, "app-a")}
    assert kept == {r.msgid for r in alive + fresh}


@pytest.mark.parametrize("store_options", [{"dedupe_ttl_s": 1, "keep_delivered_s": 0}])
def test_an_entry_goes_once_its_delivered_marker_expires(store: Store) -> None:
    short = store  # a 1 s window
    short.enqueue_many([rec(msgid=f"m-{i}") for i in range(20)])
    settle(short, Outcome.DELIVERED)
    assert {r["state"] for r in find(short.redis, None, "app-a", limit=100)[0]} == {"delivered"}
    wait_for(lambda: not short.redis.exists(keys.marker(id_of(rec(msgid="m-0")))), 5)
    time.sleep(0.1)  # every marker was set within the same step calls
    assert find(short.redis, None, "app-a", limit=100) == ([], None)
    short.enqueue_many([rec(msgid=f"n-{i}") for i in range(10)])  # sweeps 20 entries
    assert {m[0] for m in entries(short.redis, "app-a")} == {f"n-{i}" for i in range(10)}


def test_an_idle_app_is_swept_in_turn_by_other_apps_enqueues(store: Store) -> None:
    store.enqueue_many([rec("quiet-app", f"m-{i}") for i in range(40)])
    expire_markers(store, settle(store, Outcome.DELIVERED))
    for i in range(12):  # one record at a time, as enqueue_backfill does
        store.enqueue(rec("busy-app", f"b-{i}"), due_in_s=3600)
    assert store.redis.exists(keys.index_directory("quiet-app")) == 0
    assert store.redis.zrange(keys.INDEX_APPS, 0, -1) == ["busy-app"]
    assert store.redis.hexists(keys.INDEX_HAND, "quiet-app") == 0


def test_the_index_stays_within_about_twice_the_live_deliveries(store: Store) -> None:
    sizes = []
    for round_ in range(30):  # each round: 50 new records, delivered, their window over
        store.enqueue_many([rec(msgid=f"r{round_}-{i}") for i in range(50)])
        sizes.append(len(entries(store.redis, "app-a")))
        expire_markers(store, settle(store, Outcome.DELIVERED))
    assert max(sizes) <= 2 * 50 + 50, sizes  # without the sweep: 1,500 at the end


def test_a_corrupt_index_key_never_stops_an_enqueue(store: Store) -> None:
    store.redis.set(keys.index_directory("app-a"), "not a sorted set")
    delivery_id, created = store.enqueue(rec(msgid="m-1"))
    assert created
    assert find(store.redis, "m-1", "app-a") == ([], None)
    assert find(store.redis, None, "app-a") == ([], None)
    store.enqueue(rec("app-b", "m-1"))
    assert [r["app_id"] for r in find(store.redis, "m-1", None)[0]] == ["app-b"]
    assert settle(store, Outcome.DEAD)
    assert store.purge([delivery_id]) == 1

    store.redis.delete(keys.INDEX_APPS)
    store.redis.hset(keys.INDEX_APPS, "x", "y")  # the apps' list itself: nothing indexed
    assert store.enqueue(rec("app-c", "m-2"))[1]
    assert store.redis.exists(keys.index_directory("app-c")) == 0
    assert find(store.redis, "m-2", None) == ([], None)


def test_the_script_refuses_a_nul_in_an_app_id_or_msgid_before_any_write(store: Store) -> None:
    for record in (rec("app\0x", "m"), rec("app-a", "m\0x")):  # built past the validation
        with pytest.raises(redis.ResponseError, match="bad argument"):
            store.enqueue_many([rec(msgid="good"), record])
        assert store.redis.dbsize() == 0


# -- bad input


@pytest.mark.parametrize(
    ("msgid", "app_id", "limit", "cursor", "fields"),
    [
        ("", None, 50, None, {"msgid"}),
        ("x" * 65, None, 50, None, {"msgid"}),
        ("a b", "app", 50, None, {"msgid"}),
        ("caf\u00e9", None, 50, None, {"msgid"}),
        ("m\0", None, 50, None, {"msgid"}),
        ("m\n", None, 50, None, {"msgid"}),
        (None, "", 50, None, {"app_id"}),
        (None, "a" * 65, 50, None, {"app_id"}),
        (None, None, 50, None, {"msgid", "app_id"}),
        ("", "", 0, None, {"msgid", "app_id", "limit"}),
        ("m", None, 0, None, {"limit"}),
        ("m", None, 1001, None, {"limit"}),
        ("m", None, True, None, {"limit"}),
        ("m", None, 50, "", {"cursor"}),
        ("m", None, 50, "!!", {"cursor"}),
        ("m", None, 50, "A" * 401, {"cursor"}),
        ("m", None, 50, "bm90IGEgY3Vyc29y", {"cursor"}),  # base64 of "not a cursor"
        ("m", None, 50, "YXBwAG0AaWQAeA", {"cursor"}),  # app, m, id and a fourth part
    ],
)
def test_a_bad_lookup_names_each_bad_field(
    msgid: Any, app_id: Any, limit: Any, cursor: Any, fields: set[str]
) -> None:
    with pytest.raises(InvalidQuery) as refused:
        parse_query(msgid, app_id, limit, cursor)
    assert set(refused.value.errors) == fields
    assert all(reason for reason in refused.value.errors.values())
    with pytest.raises(InvalidQuery):  # before any Redis call: this client has no server
        find(redis.Redis(port=1), msgid, app_id, limit=limit, cursor=cursor)


def test_a_cursor_of_another_msgid_or_app_is_refused(store: Store) -> None:
    store.enqueue_many([rec("app-a", "m", f"86135000000{i:02d}") for i in range(3)])
    cursor = find(store.redis, "m", "app-a", limit=1)[1]
    assert cursor is not None
    assert find(store.redis, "m", None, limit=1, cursor=cursor)[0]  # same msgid, any app: ok
    for msgid, app_id in (("other", "app-a"), ("m", "app-b")):
        with pytest.raises(InvalidQuery) as refused:
            find(store.redis, msgid, app_id, cursor=cursor)
        assert set(refused.value.errors) == {"cursor"}


# -- the CLI, in this process, on the session's Redis


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, ["find", *args], catch_exceptions=False)


def test_backfill_find_prints_masked_deliveries_a_page_at_a_time(r: redis.Redis) -> None:
    app, msgid = unique("app"), unique()
    ids = [enqueue_backfill(app_id=app, msgid=msgid, number=f"86135123456{i}", time=TIME)
           for i in range(3)]  # fmt: skip
    found = cli("--msgid", msgid)
    assert found.exit_code == 0, found.stderr
    assert {line.split()[0] for line in found.stdout.splitlines()[1:]} == set(ids)
    assert "********4560" in found.stdout
    assert "86135123456" not in found.stdout
    assert "3 shown" in found.stderr

    listed = json.loads(cli("--app-id", app, "--json").stdout)
    assert {row["delivery_id"] for row in listed["deliveries"]} == set(ids)
    assert listed["next_cursor"] is None
    first = cli("--app-id", app, "--limit", "2")
    cursor = first.stderr.split("--cursor ")[1].split()[0]
    rest = cli("--app-id", app, "--limit", "2", "--cursor", cursor)
    assert len(rest.stdout.splitlines()) == 2  # the header and the third delivery
    assert cli("--msgid", unique()).exit_code == 3


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--msgid", ""], "--msgid"),
        (["--msgid", "x" * 65], "--msgid"),
        (["--msgid", "has space"], "--msgid"),
        (["--app-id", "caf\u00e9"], "--app-id"),
        ([], "--msgid"),
        (["--msgid", "m", "--cursor", "%%%"], "--cursor"),
        (["--msgid", "m", "--limit", "0"], "--limit"),
    ],
)
def test_backfill_find_refuses_bad_input_naming_the_field(
    settings_env: dict[str, str], args: list[str], named: str
) -> None:
    refused = cli(*args)
    assert refused.exit_code == 2
    assert named in refused.stderr
    assert "Traceback" not in refused.stderr


# -- the intake, a real subprocess, with the session's worker


class Intake(intake_helpers.Intake):
    def find(self, query: str, token: str | None = SHOP_TOKEN) -> requests.Response:
        return self.get(f"/v1/backfills?{query}", token)

    def post(self, body: Any, token: str | None = SHOP_TOKEN, raw: bytes | None = None,
             **headers: str) -> requests.Response:  # fmt: skip
        return super().post(body, token, raw, **headers)


@pytest.fixture(scope="module")
def intake(
    settings_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Intake]:
    log_path = tmp_path_factory.mktemp("intake") / "intake.log"
    tokens = f"{SHOP}:{SHOP_TOKEN},{CRM}:{CRM_TOKEN}"
    with intake_helpers.running_intake(
        settings_env, log_path, tokens=tokens, client_class=Intake
    ) as up:
        yield cast(Intake, up)


def body(app: str, msgid: str, number: str = NUMBER) -> dict[str, str]:
    return {"app_id": app, "msgid": msgid, "number": number, "time": TIME}


def test_the_intake_finds_only_the_callers_deliveries(intake: Intake, r: redis.Redis) -> None:
    app, msgid = unique("app"), unique()
    shop_only = intake.post(body(app, msgid, "8613500000001")).json()["delivery_id"]
    batch = intake.post({"records": [body(app, msgid, "8613500000002")]}).json()
    shared = batch["delivery_ids"][0]
    assert intake.post(body(app, msgid, "8613500000002"), CRM_TOKEN).status_code == 202
    crm_only = intake.post(body(app, msgid, "8613500000003"), CRM_TOKEN).json()["delivery_id"]
    enqueue_backfill(app_id=app, msgid=msgid, number="8613500000004", time=TIME)  # no caller

    def ids(query: str, token: str) -> set[str]:
        answer = intake.find(query, token)
        assert answer.status_code == 200, answer.text
        assert answer.json()["next_cursor"] is None
        rows = answer.json()["deliveries"]
        assert all("callers" not in row and row["number"].startswith("*****") for row in rows)
        return {row["delivery_id"] for row in rows}

    assert ids(f"msgid={msgid}", SHOP_TOKEN) == {shop_only, shared}
    assert ids(f"msgid={msgid}&app_id={app}", CRM_TOKEN) == {shared, crm_only}
    assert ids(f"app_id={app}", CRM_TOKEN) == {shared, crm_only}
    assert ids(f"msgid={msgid}&app_id=other-app", SHOP_TOKEN) == set()
    assert intake.find(f"msgid={msgid}", token=None).status_code == 401
    assert intake.find(f"msgid={msgid}", token=CRM_TOKEN + "x").status_code == 401

    pages, cursor = [], ""
    while cursor is not None:  # one a page
        answer = intake.find(f"msgid={msgid}&limit=1" + (f"&cursor={cursor}" if cursor else ""))
        pages.append(answer.json()["deliveries"])
        cursor = answer.json()["next_cursor"]
    assert {row["delivery_id"] for page in pages for row in page} == {shop_only, shared}


def test_the_intake_shows_a_delivery_the_worker_delivered(
    intake: Intake, worker: Any, r: redis.Redis
) -> None:
    app, msgid = unique("app"), unique()
    delivery_id = intake.post(body(app, msgid)).json()["delivery_id"]

    def delivered() -> dict[str, Any] | None:
        rows = intake.find(f"msgid={msgid}&app_id={app}").json()["deliveries"]
        return rows[0] if rows and rows[0]["state"] == "delivered" else None

    row = wait_for(delivered, 30)
    assert (row["delivery_id"], row["attempts"], row["number"]) == (delivery_id, 1, SHOWN)
    assert row["delivered_at"]
    assert row["last_error"] == ""


@pytest.mark.parametrize(
    ("query", "fields"),
    [
        ("", {"msgid", "app_id"}),
        ("limit=5", {"msgid", "app_id"}),
        ("msgid=", {"msgid"}),
        ("msgid=" + "x" * 65, {"msgid"}),
        ("msgid=a%20b", {"msgid"}),
        ("msgid=a%00b", {"msgid"}),
        ("msgid=%FF%FE", {"msgid"}),
        ("msgid=caf%C3%A9", {"msgid"}),
        ("app_id=a%0Ab", {"app_id"}),
        ("msgid=a&msgid=b", {"msgid"}),
        ("msgid=a&app_id=b&app_id=b", {"app_id"}),
        ("msgid=a&number=8613512345678", {"number"}),
        ("msgid=a&limit=0", {"limit"}),
        ("msgid=a&limit=101", {"limit"}),
        ("msgid=a&limit=-1", {"limit"}),
        ("msgid=a&limit=1e2", {"limit"}),
        ("msgid=a&cursor=%25%25", {"cursor"}),
        ("msgid=a&cursor=" + "A" * 5000, {"cursor"}),
        ("msgid=" + "x" * 12_000, {"msgid"}),
    ],
)
def test_the_intake_refuses_a_bad_query_with_400_naming_the_fields(
    intake: Intake, query: str, fields: set[str]
) -> None:
    answer = intake.find(query)
    assert answer.status_code == 400, answer.text
    assert set(answer.json()["fields"]) == fields
    assert len(answer.content) < 2000


def test_the_intake_survives_huge_and_repeated_queries(intake: Intake) -> None:
    many = "&".join(f"p{i}=1" for i in range(1000))  # 1,000 unknown parameters
    answer = intake.find(many)
    assert answer.status_code == 400
    named = answer.json()["fields"]  # msgid and app_id missing, 8 named, the rest counted
    assert len(named) == 2 + 8 + 1
    assert "992 more" in named["..."]
    repeated = intake.find("&".join(["msgid=a"] * 1000))
    assert (repeated.status_code, set(repeated.json()["fields"])) == (400, {"msgid"})
    try:  # past h11's 16 KiB: refused before the app sees it, or the connection closed
        huge = intake.find("msgid=" + "x" * 100_000)
        assert 400 <= huge.status_code < 500
    except requests.ConnectionError:
        pass
    assert intake_helpers.healthy(intake)
    assert intake.find(f"msgid={unique()}").json() == {"deliveries": [], "next_cursor": None}


def test_with_the_index_off_enqueue_writes_no_index_and_find_finds_nothing(
    module_redis: LocalRedis,
) -> None:
    client = connect(module_redis.url)
    client.flushdb()
    off = Store(client, dedupe_ttl_s=3600, keep_delivered_s=0, lookup_index=False)
    on = Store(client, dedupe_ttl_s=3600, keep_delivered_s=0)
    ((first, created),) = off.enqueue_many([rec("app-off", "m-off")])
    assert created
    assert not list(client.scan_iter(keys.PREFIX + "x*"))
    assert find(client, "m-off", "app-off")[0] == []
    # the same tree with the index on indexes what it enqueues from then on
    ((second, _),) = on.enqueue_many([rec("app-off", "m-on")])
    assert [row["delivery_id"] for row in find(client, "m-on", "app-off")[0]] == [second]
    assert first != second
    client.flushdb()
    client.close()
