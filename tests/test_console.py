"""The web console (``backfill console``) over a real Redis with records a real worker made.

The app runs in-process (uvicorn in a thread, over real HTTP) against a Redis of this
module's own and a worker that sends to the stub, so dead letters and attempts are the
worker's own; one test starts the real command as a subprocess. The browser test is
test_console_browser.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import uvicorn
from fastapi import FastAPI
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import API_KEY, API_SECRET, unique, wait_for, worker_settings
from worker.console.app import create_app
from worker.console.auth import Guard, parse_users, same_origin
from worker.console.chart import nice_top
from worker.console.times import record_date, relative, when
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess, free_port
from worker.local.stub import ProviderStub
from worker.operate.audit import configure_logging, redactor
from worker.operate.errors import ConfigError
from worker.state import delivery, keys
from worker.state.dead_letters import redis_ms
from worker.state.store import Store

USERS = {"alice": "correct-horse-battery", "bob": "another-long-password"}
NUMBER = "8613512345678"
SCRIPT = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def console_worker(
    module_redis: LocalRedis, stub: ProviderStub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    env = worker_settings(module_redis.url, stub.url)
    process = WorkerProcess(env, tmp_path_factory.mktemp("console-worker") / "worker.log")
    process.start().wait_ready()
    yield process
    process.stop()


class Console(requests.Session):
    """A session on a console served over real HTTP: ``get("/dead")``, ``post(path, data)``.

    Requests carry alice's credentials unless told otherwise; a POST carries the
    console's own Origin unless told otherwise (a browser's form does)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.auth = ("alice", USERS["alice"])

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("allow_redirects", False)
        return super().request(method, self.url + url, *args, **kwargs)

    def post(self, url: str, data: Any = None, json: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["headers"] = {"Origin": self.url, **kwargs.get("headers", {})}
        return super().post(url, data=data, json=json, **kwargs)


@pytest.fixture
def serve() -> Iterator[Callable[[FastAPI], Console]]:
    """``serve(app)``: the app on uvicorn in a thread of this process; all stop at the end."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: FastAPI) -> Console:
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                access_log=False, lifespan="off")  # fmt: skip
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_for(lambda: server.started, 10, 0.01)
        return Console(f"http://127.0.0.1:{port}")

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def client(store: Store, serve: Callable[[FastAPI], Console]) -> Iterator[Console]:
    with serve(create_app(store, Guard(USERS))) as http:
        yield http


@pytest.fixture
def audit_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    buffer = io.StringIO()
    configure_logging("json", "INFO", stream=buffer)
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    configure_logging("json", "INFO", stream=io.StringIO())


def record(msgid: str | None = None, app_id: str = "app-console") -> BackfillRecord:
    return BackfillRecord.parse(
        {"app_id": app_id, "msgid": msgid or unique(), "number": NUMBER, "time": "1681184764000"}
    )


def sent(stub: ProviderStub, store: Store, steps: list[str], **fields: Any) -> str:
    """Enqueue a record whose answers the stub scripts; its delivery_id (the worker sends it)."""
    rec = record(**fields)
    assert rec.msgid is not None
    stub.set_plan({rec.msgid: steps})
    return store.enqueue(rec)[0]


def dead(stub: ProviderStub, store: Store, steps: list[str] | None = None, **fields: Any) -> str:
    """A dead letter made by the worker: by default a 503, then -24 (record is bad)."""
    delivery_id = sent(stub, store, steps or ["503", "status:-24"], **fields)
    wait_for(lambda: store.states([delivery_id]) == ["dead"], 20)
    return delivery_id


def csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "the page has no form token"
    return found.group(1)


def post(http: Console, path: str, data: dict[str, str], **headers: str) -> Any:
    return http.post(path, data=data, headers=headers)


def confirmed(page: str) -> dict[str, str]:
    """The form a confirmation page's button sends: its hidden fields (token, group or
    delivery, the end it counted to, confirm=yes)."""
    form = page[page.index('<form method="post" action="/dead/') :]
    form = form[: form.index("</form>")]
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', form))


# -- who may ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Basic " + "YWxpY2U6d3Jvbmc=",  # alice:wrong
        "Basic " + "bWFsbG9yeTpjb3JyZWN0LWhvcnNlLWJhdHRlcnk=",  # mallory:<alice's password>
        "Basic not-base64!!",
        "Basic " + "x" * 5000,
        "Bearer correct-horse-battery",
        "Basic YWxpY2Vjb3JyZWN0LWhvcnNlLWJhdHRlcnk=",  # no colon
    ],
)
def test_every_page_needs_a_console_user(
    store: Store, serve: Callable[[FastAPI], Console], authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with serve(create_app(store, Guard(USERS))) as http:
        http.auth = None
        for path in ("/", "/deliveries?q=x", "/dead", "/deliveries/abc", "/nope"):
            answer = http.get(path, headers=headers)
            assert answer.status_code == 401, path
            assert answer.headers["WWW-Authenticate"].startswith('Basic realm="backfill console"')
            assert "correct-horse-battery" not in answer.text
        refused = http.post("/dead/replay", data={"group": "all"}, headers=headers)
        assert refused.status_code == 401


def test_both_users_get_in_and_every_answer_has_the_security_headers(
    client: Console, store: Store
) -> None:
    assert client.get("/", auth=("bob", USERS["bob"])).status_code == 200
    for answer in (client.get("/"), client.get("/nope"), client.get("/", auth=("x", "y"))):
        assert answer.headers["Cache-Control"] == "no-store"
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
        assert "script-src" not in answer.headers["Content-Security-Policy"]  # none at all
    assert client.get("/docs").status_code == 404
    assert client.get("/openapi.json").status_code == 404


def test_console_users_are_parsed_and_bad_ones_refused_naming_the_user() -> None:
    assert parse_users(" alice:correct-horse-battery , bob:pa:ss:word:12345 ") == {
        "alice": "correct-horse-battery",
        "bob": "pa:ss:word:12345",
    }
    for spec, expected in [
        ("", "no users"),
        ("alice:short-pass", "user 'alice': the password must be 12"),
        ("alice:correct-horse-battery,alice:correct-horse-battery", "'alice' is listed twice"),
        ("correct-horse-battery", "entry 1: expected NAME:PASSWORD"),
        ("bad name:correct-horse-battery", "entry 1: a user name is"),
        ("alice:correct-horse\x07battery", "user 'alice': the password has control"),
        ("alice:" + "p" * 300, "user 'alice': the password must be"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_users(spec)
        assert str(caught.value).startswith("BACKFILL_CONSOLE_USERS: ")
        assert expected in str(caught.value)
        assert "horse" not in str(caught.value)
        assert "short-pass" not in str(caught.value)


def test_the_console_command_refuses_bad_users_and_serves_good_ones(
    module_redis: LocalRedis, tmp_path: Path
) -> None:
    env = {**os.environ, "BACKFILL_REDIS_URL": module_redis.url}
    command = [sys.executable, "-m", "worker", "console", "--port"]
    for users, expected in [
        (None, "BACKFILL_CONSOLE_USERS: required"),
        ("alice:tooshort", "BACKFILL_CONSOLE_USERS: user 'alice': the password must be"),
        ("tooshort-password-no-name", "BACKFILL_CONSOLE_USERS: entry 1"),
    ]:
        run_env = {k: v for k, v in env.items() if k != "BACKFILL_CONSOLE_USERS"}
        if users is not None:
            run_env["BACKFILL_CONSOLE_USERS"] = users
        done = subprocess.run(
            [*command, str(free_port())],
            env=run_env, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr
        assert "tooshort" not in done.stderr
        assert "Traceback" not in done.stderr

    port = free_port()
    log_path = tmp_path / "console.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, str(port)],
            env={**env, "BACKFILL_CONSOLE_USERS": "alice:correct-horse-battery"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: _answers(url), 20, 0.1)
        assert requests.get(url, timeout=5).status_code == 401
        page = requests.get(url, auth=("alice", USERS["alice"]), timeout=5)
        assert page.status_code == 200
        assert "Overview" in page.text
    finally:
        process.terminate()
        process.wait(10)
    assert "correct-horse-battery" not in log_path.read_text()


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
    except requests.ConnectionError:
        return False
    return True


# -- what it shows ------------------------------------------------------------------


def test_overview_counts_states_flow_pause_and_the_oldest_pending(
    client: Console, store: Store
) -> None:
    r = store.redis
    r.set(keys.PAUSED, "status -10: balance insufficient", px=600_000)  # nothing is claimed
    oldest = store.enqueue(record())[0]
    store.enqueue_many([record(), record()], lane="l")
    store.enqueue_many([record()], due_in_s=3600)  # waiting (as a retry waits)
    now = int(time.time() * 1000)
    for age_ms in (30_000, 1_800_000, 7_200_000):  # delivered 30 s, 30 min, 2 h ago
        r.set(keys.marker(unique("d")), f"{now - age_ms}|", ex=3600)
        # the step script's 10 s counters (the 2 h old one would have expired: not counted)
        r.incr(keys.delivered_in((now - age_ms) // keys.COUNTED_EVERY_MS))
        # and hourly, for the dedupe window (an hour here: say the third came 40 min ago)
        r.incr(keys.delivered_in_hour((now - min(age_ms, 2_400_000)) // keys.COUNTED_HOUR_MS))
    r.zadd(keys.DEAD, {"gone-1": now, "gone-2": now})
    r.hset(keys.delivery(oldest), "w", now - 90_000)  # created 90 s ago

    page = client.get("/")
    assert page.status_code == 200
    text = _text(page.text)
    assert "pending, due now 3" in text
    assert "waiting retry 1" in text
    assert "dead 2" in text
    assert "delivered (kept for the dedupe window) ≈ 3" in text  # counted by the hour
    assert "delivered in the last minute 1" in text
    assert "delivered in the last hour 2" in text
    assert re.search(r"oldest pending delivery 1 min 3[0-5] s old", text)
    assert oldest in text
    assert "Paused for" in text
    assert "status -10: balance insufficient" in text

    r.delete(keys.PAUSED)
    r.set(keys.OUTAGE, f"{now}|1000")
    page = client.get("/")
    assert re.search(
        r"holds for a provider outage \(since (just now|\d+ s ago) \)", _text(page.text)
    )
    assert f'title="{delivery.iso(now)}"' in page.text  # the exact time on hover
    for unreadable in ("garbage", "9" * 400 + "|1000", "9" * 18 + "|1000"):  # past year 9999
        r.set(keys.OUTAGE, unreadable)
        page = client.get("/")
        assert page.status_code == 200
        assert "holds for a provider outage (since yes)" in _text(page.text)


def _text(html: str) -> str:
    """The page's text with tags dropped and spaces folded (for asserting on figures)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@pytest.mark.usefixtures("console_worker")
def test_delivery_page_shows_every_attempt_with_the_number_masked(
    client: Console, store: Store, stub: ProviderStub
) -> None:
    delivery_id = dead(stub, store, ["503", "status:-24"])
    page = client.get(f"/deliveries/{delivery_id}")
    assert page.status_code == 200
    assert NUMBER not in page.text
    assert "*********5678" in page.text
    rows = re.findall(r'<tr class="attempt">(.*?)</tr>', page.text, re.S)
    assert len(rows) == 2
    # attempt, time, latency ms, HTTP status, provider status, reason, error, outcome, retry
    first, second = ([c.strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
                     for row in rows)  # fmt: skip
    assert [first[i] for i in (0, 3, 4, 6, 7)] == ["1", "503", "", "HTTP 503", "retry"]
    assert [second[i] for i in (0, 3, 4, 5, 7)] == ["2", "200", "-24", "injected", "dead"]
    for cells in (first, second):
        when = r'<time datetime="(20\d\d-\d\d-\d\dT[0-9:.]+Z)" title="\1">'
        assert re.fullmatch(when + r"(just now|\d+ s ago)</time>", cells[1])  # hover: exact
        assert float(cells[2]) >= 0  # latency (ms)
    assert 'id="replay"' in page.text  # dead: it can be replayed from here

    assert client.get("/deliveries/no-such-id").status_code == 404
    assert client.get("/deliveries/" + "x" * 5000).status_code == 404


def test_everything_shown_is_escaped_and_secrets_signs_and_numbers_are_not_shown(
    client: Console, store: Store
) -> None:
    redactor.add_secret(API_SECRET)
    delivery_id = store.enqueue(record(msgid=SCRIPT, app_id="<b>app</b>"))[0]
    sign = "0123456789abcdef0123456789abcdef"
    hostile = f"{SCRIPT} key {API_SECRET} sign {sign} for {NUMBER}"
    doc = delivery.attempt_doc(1, int(time.time() * 1000), "retry", http_status=200,
                               api_status="-99", api_reason=hostile, error=hostile,
                               latency_ms=1.5, retry_in_s=1.0)  # fmt: skip
    store.redis.rpush(keys.attempts(delivery_id), doc)
    store.redis.set(keys.PAUSED, hostile, px=60_000)
    store.redis.zadd(keys.DEAD, {delivery_id: 1})
    store.redis.hset(keys.delivery(delivery_id), "s", "x")

    pages = [
        client.get(f"/deliveries/{delivery_id}").text,
        client.get("/").text,
        client.get("/dead").text,
        client.get("/deliveries", params={"q": SCRIPT}).text,
        client.get("/deliveries", params={"q": "<b>app</b>"}).text,
    ]
    for page in pages:
        assert "<script>" not in page
        assert "<b>" not in page
        assert API_SECRET not in page
        assert sign not in page
        assert NUMBER not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[0]
    assert "[REDACTED]" in pages[0]
    assert "*********5678" in pages[0]
    assert delivery_id in pages[3]
    assert delivery_id in pages[4]


def test_search_by_delivery_id_msgid_and_app_id_a_page_at_a_time(
    client: Console, store: Store
) -> None:
    r = store.redis
    r.set(keys.PAUSED, "held for the test", px=600_000)
    msgid = unique()
    mine = store.enqueue(record(msgid=msgid, app_id="app-search"))[0]
    many = [d for d, _ in store.enqueue_many([record(app_id="app-page") for _ in range(60)])]

    by_id = client.get("/deliveries", params={"q": mine}).text
    assert by_id.count(f'href="/deliveries/{mine}"') == 1
    by_msgid = client.get("/deliveries", params={"q": msgid}).text
    assert f'href="/deliveries/{mine}"' in by_msgid
    assert "*********5678" in by_msgid
    assert NUMBER not in by_msgid

    first = client.get("/deliveries", params={"q": "app-page"}).text
    found = set(re.findall(r'href="/deliveries/([a-z0-9]{16})"', first))
    assert len(found) == 50
    link = re.search(r'href="/deliveries\?([^"]+)" rel="next"', first)
    assert link is not None
    second = client.get("/deliveries?" + link.group(1).replace("&amp;", "&")).text
    found |= set(re.findall(r'href="/deliveries/([a-z0-9]{16})"', second))
    assert found == set(many)
    assert 'rel="next"' not in second

    for bad in ("has space", "x" * 129, "\x00"):
        assert client.get("/deliveries", params={"q": bad}).status_code == 400
    assert client.get("/deliveries", params={"q": "a", "by": "sql"}).status_code == 400
    cursor = {"q": "app-page", "by": "app_id", "cursor": "bm90LWEtY3Vyc29y"}
    assert client.get("/deliveries", params=cursor).status_code == 400
    assert "none" in client.get("/deliveries", params={"q": "nothing-like-it"}).text


# -- what it changes ------------------------------------------------------------------


@pytest.mark.usefixtures("console_worker")
def test_a_cross_site_post_is_refused_and_changes_nothing(
    client: Console, store: Store, stub: ProviderStub
) -> None:
    delivery_id = dead(stub, store)
    token = csrf(client.get(f"/deliveries/{delivery_id}").text)
    path = f"/deliveries/{delivery_id}/replay"
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": client.url + ".evil.example"},
        {"Origin": "", "Referer": "http://evil.example/dead"},
        {"Origin": ""},  # neither: refused (browsers always send Origin on a POST)
    ):
        refused = post(client, path, {"csrf": token}, **headers)
        assert refused.status_code == 403, headers
    assert post(client, path, {}).status_code == 403  # same origin, no token
    assert post(client, path, {"csrf": "1.abc"}).status_code == 403
    bob = csrf(client.get("/dead", auth=("bob", USERS["bob"])).text)
    assert post(client, path, {"csrf": bob}).status_code == 403  # another user's token
    other = Guard(USERS).token("alice")  # another process's key (a restarted console)
    assert post(client, path, {"csrf": other}).status_code == 403
    for route in ("/dead/replay", "/dead/purge"):  # every state-changing route
        assert post(client, route, {"group": "all"}).status_code == 403
        assert post(client, route, {"group": "all", "confirm": "yes"}).status_code == 403
    assert store.states([delivery_id]) == ["dead"]

    via_referer = post(client, path, {"csrf": token}, Origin="", Referer=client.url + "/x")
    assert via_referer.status_code == 303
    assert store.states([delivery_id]) != ["dead"]


def test_same_origin_compares_the_origin_or_referer_with_the_host() -> None:
    assert same_origin({"host": "c.example:5557", "origin": "http://c.example:5557"})
    assert same_origin({"host": "c.example", "origin": "https://c.example"})
    assert same_origin({"host": "c.example:443", "origin": "https://c.example"})
    assert same_origin({"host": "c.example", "referer": "https://c.example/dead?x=1"})
    assert not same_origin({"host": "c.example", "origin": "https://c.example.evil"})
    assert not same_origin({"host": "c.example", "origin": "https://u@c.example"})
    assert not same_origin({"host": "c.example", "origin": "file://c.example"})
    assert not same_origin({"host": "", "origin": ""})
    assert not same_origin({"host": "c.example", "origin": "http://[::1"})


@pytest.mark.usefixtures("console_worker")
def test_replay_from_the_delivery_page_delivers_it_and_is_audited(
    client: Console,
    store: Store,
    stub: ProviderStub,
    audit_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    delivery_id = dead(stub, store, ["status:-24", "ok"])
    token = csrf(client.get(f"/deliveries/{delivery_id}").text)
    answer = post(client, f"/deliveries/{delivery_id}/replay", {"csrf": token})
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/deliveries/{delivery_id}?done=replayed"
    wait_for(lambda: store.states([delivery_id]) == ["delivered"], 20)
    page = client.get(answer.headers["location"]).text
    assert "replayed" in page
    assert re.search(r'<td id="state">delivered</td>', page)
    lines = [e for e in audit_lines() if e["event"] == "console.replay"]
    assert [(e["user"], e["scope"], e["delivery_ids"], e["replayed"]) for e in lines] == [
        ("alice", "delivery", [delivery_id], 1)
    ]
    again = post(client, f"/deliveries/{delivery_id}/replay", {"csrf": token})
    assert again.headers["location"].endswith("done=not-dead")


@pytest.mark.usefixtures("console_worker")
def test_dead_letters_are_grouped_by_last_error_and_a_group_replays_alone(
    client: Console,
    store: Store,
    stub: ProviderStub,
    audit_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    bad = [dead(stub, store, ["status:-24"]) for _ in range(2)]
    time.sleep(0.01)
    blocked_number = dead(stub, store, ["status:-9"])  # the newest: its group comes first
    page = client.get("/dead").text
    groups = re.findall(r'<section class="group" id="group-([0-9a-f]{16})">\s*<h2>(.*?)</h2>',
                        page)  # fmt: skip
    assert [error for _, error in groups] == ["status -9: injected", "status -24: injected"]
    assert "3 dead in all" in page
    assert NUMBER not in page

    stub.set_plan({})  # replays are answered "ok" (the plans ran out)
    form = {"csrf": csrf(page), "group": groups[1][0]}
    asked = post(client, "/dead/replay", form)  # a confirmation page with the count first
    assert "every dead letter with this last error again: 2 now" in _text(asked.text)
    assert store.states(bad) == ["dead", "dead"]
    answer = post(client, "/dead/replay", confirmed(asked.text))
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/dead?done=replayed&n=2&later=0&ids=")
    assert "2 replayed" in client.get(answer.headers["location"]).text
    wait_for(lambda: store.states(bad) == ["delivered", "delivered"], 20)
    assert store.states([blocked_number]) == ["dead"]
    lines = [e for e in audit_lines() if e["event"] == "console.replay"]
    assert [(e["user"], sorted(e["delivery_ids"])) for e in lines] == [("alice", sorted(bad))]
    assert lines[0]["scope"] == f"group {groups[1][0]}"

    assert post(client, "/dead/replay", {"csrf": csrf(page), "group": "x"}).status_code == 400
    for n in ("²", "9" * 50, "-1", "x"):  # a hostile count in the redirect's query
        assert client.get("/dead", params={"done": "replayed", "n": n}).status_code == 200


@pytest.mark.usefixtures("console_worker")
def test_purge_needs_a_confirmation_step(
    client: Console,
    store: Store,
    stub: ProviderStub,
    audit_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    one, two, three = (dead(stub, store, ["status:-24"]) for _ in range(3))
    token = csrf(client.get("/dead").text)

    asked = post(client, "/dead/purge", {"csrf": token, "delivery_id": one})
    assert asked.status_code == 200
    assert 'name="confirm" value="yes"' in asked.text
    assert store.states([one]) == ["dead"]  # nothing yet
    done = post(client, "/dead/purge", {"csrf": token, "delivery_id": one, "confirm": "yes"})
    assert done.status_code == 303
    assert store.states([one]) == [None]

    asked = post(client, "/dead/purge", {"csrf": token, "group": "all"})
    assert "This deletes every dead letter: 2 now." in _text(asked.text)
    assert store.states([two, three]) == ["dead", "dead"]
    done = post(client, "/dead/purge", confirmed(asked.text))
    assert done.headers["location"] == "/dead?done=purged&n=2"
    assert store.counts()["dead"] == 0
    purges = [e for e in audit_lines() if e["event"] == "console.purge"]
    assert [(e["user"], sorted(e["delivery_ids"])) for e in purges] == [
        ("alice", [one]),
        ("alice", sorted([two, three])),
    ]


def test_replay_of_all_asks_first_and_the_confirmation_keeps_csrf_and_same_origin(
    client: Console, store: Store, audit_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    store.redis.set(keys.PAUSED, "held for the test", px=600_000)  # replays stay pending
    ids = [d for d, _ in store.enqueue_many([record() for _ in range(3)])]
    for at, delivery_id in enumerate(ids):
        store.redis.hset(keys.delivery(delivery_id), mapping={"s": "x", "z": 1_000 + at})
        store.redis.zadd(keys.DEAD, {delivery_id: 1_000 + at})
    page = client.get("/dead").text
    assert "Replay all 3…" in page
    asked = post(client, "/dead/replay", {"csrf": csrf(page), "group": "all"})
    assert asked.status_code == 200
    assert "Replay?" in asked.text
    assert "This sends every dead letter again: 3 now." in _text(asked.text)
    assert 'name="confirm" value="yes"' in asked.text
    assert 'action="/dead/replay"' in asked.text
    assert set(store.states(ids)) == {"dead"}  # nothing yet

    form = confirmed(asked.text)
    assert set(form) == {"csrf", "group", "end", "confirm"}
    assert post(client, "/dead/replay", {**form, "csrf": "1.abc"}).status_code == 403
    cross = post(client, "/dead/replay", form, Origin="http://evil.example")
    assert cross.status_code == 403
    assert set(store.states(ids)) == {"dead"}
    done = post(client, "/dead/replay", form)
    assert done.headers["location"].startswith("/dead?done=replayed&n=3&later=0&ids=")
    assert set(store.states(ids)) == {"pending"}
    assert [e["scope"] for e in audit_lines() if e["event"] == "console.replay"] == ["all"]


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        ("group=all&csrf=x" + "&a=b" * 3000, "application/x-www-form-urlencoded", 413),
        ('{"group": "all"}', "application/json", 415),
        ("group=all", "multipart/form-data; boundary=x", 415),
        ("group=%ff%fe\xff", "application/x-www-form-urlencoded", 400),
    ],
)
def test_malformed_forms_are_refused(
    client: Console, body: str, content_type: str, status: int
) -> None:
    answer = client.post(
        "/dead/replay",
        data=body.encode("latin-1"),
        headers={"Content-Type": content_type},
    )
    assert answer.status_code == status


def test_redis_down_is_a_503_page(serve: Callable[[FastAPI], Console]) -> None:
    down = Store(
        redis.Redis(port=free_port(), decode_responses=True, retry=Retry(NoBackoff(), 0)),
        dedupe_ttl_s=60,
    )
    with serve(create_app(down, Guard(USERS))) as http:
        answer = http.get("/")
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "5"
    assert "Redis is unavailable" in answer.text
    assert API_KEY not in answer.text


def test_a_large_group_is_counted_whole_listed_in_part_and_replayed_whole(
    client: Console, store: Store, audit_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    r = store.redis
    r.set(keys.PAUSED, "held for the test", px=600_000)  # replays stay pending
    ids = [d for d, _ in store.enqueue_many([record() for _ in range(60)])]
    doc = delivery.attempt_doc(1, int(time.time() * 1000), "dead", http_status=200,
                               api_status="-21", api_reason="validation", error=None,
                               latency_ms=2.0, retry_in_s=None)  # fmt: skip
    pipe = r.pipeline()
    for i, delivery_id in enumerate(ids):  # dead as the step script leaves a dead letter
        pipe.hset(keys.delivery(delivery_id), mapping={"s": "x", "z": 1_000 + i})
        pipe.rpush(keys.attempts(delivery_id), doc)
        pipe.zadd(keys.DEAD, {delivery_id: 1_000 + i})
    pipe.execute()

    page = client.get("/dead").text
    assert "60 (the newest 50 listed)" in _text(page)
    assert len(re.findall(r'class="replay"', page)) == 50
    assert ids[-1] in page  # newest first
    assert ids[0] not in page

    asked = post(client, "/dead/replay", {"csrf": csrf(page), "group": "all"})
    assert "This sends every dead letter again: 60 now." in _text(asked.text)
    assert set(store.states(ids)) == {"dead"}
    answer = post(client, "/dead/replay", confirmed(asked.text))
    assert answer.headers["location"].startswith("/dead?done=replayed&n=60&later=0&ids=")
    assert set(store.states(ids)) == {"pending"}
    lines = [e for e in audit_lines() if e["event"] == "console.replay"]
    assert [(e["scope"], sorted(e["delivery_ids"])) for e in lines] == [("all", sorted(ids))]


def died(store: Store, count: int, api_status: str = "-21") -> list[str]:
    """Dead letters as the step script leaves them, each dying now by Redis's clock."""
    r = store.redis
    ids = [d for d, _ in store.enqueue_many([record() for _ in range(count)])]
    doc = delivery.attempt_doc(1, int(time.time() * 1000), "dead", http_status=200,
                               api_status=api_status, api_reason="validation", error=None,
                               latency_ms=2.0, retry_in_s=None)  # fmt: skip
    for delivery_id in ids:
        now = redis_ms(r)
        r.hset(keys.delivery(delivery_id), mapping={"s": "x", "z": now})
        r.rpush(keys.attempts(delivery_id), doc)
        r.zadd(keys.DEAD, {delivery_id: now})
    return ids


def test_a_confirmed_replay_stops_at_the_end_its_page_counted_and_says_how_many(
    client: Console, store: Store, audit_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    store.redis.set(keys.PAUSED, "held for the test", px=600_000)  # replays stay pending
    counted = died(store, 5)
    other = died(store, 1, api_status="-9")  # another group: never in this group's scope
    page = client.get("/dead").text
    groups = dict(re.findall(r'id="group-([0-9a-f]{16})">\s*<h2>(.*?)</h2>', page))
    (group,) = [key for key, error in groups.items() if "-21" in error]
    asked = post(client, "/dead/replay", {"csrf": csrf(page), "group": group})
    assert "this last error again: 5 now" in _text(asked.text)
    time.sleep(0.01)
    later = died(store, 2)  # the same error, dead after the page counted
    store.replay([counted[0]])  # replayed by someone else meanwhile, and dead again
    store.redis.hset(keys.delivery(counted[0]), mapping={"s": "x", "z": redis_ms(store.redis)})
    store.redis.zadd(keys.DEAD, {counted[0]: redis_ms(store.redis)})

    answer = post(client, "/dead/replay", confirmed(asked.text))
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/dead?done=replayed&n=4&later=3&ids=")
    assert store.states(counted[1:]) == ["pending"] * 4
    assert store.states([counted[0], *later, *other]) == ["dead"] * 4
    result = _text(client.get(answer.headers["location"]).text)
    assert "4 replayed: they wait in the bulk lane, due now; 3 that died after the " \
        "confirmation page counted were left alone." in result  # fmt: skip
    lines = [e for e in audit_lines() if e["event"] == "console.replay"]
    assert [sorted(e["delivery_ids"]) for e in lines] == [sorted(counted[1:])]

    asked = post(client, "/dead/replay", {"csrf": csrf(page), "group": "all"})
    assert "every dead letter again: 4 now" in _text(asked.text)
    form = confirmed(asked.text)
    for end in ("", "12a", " 1", "-1", "1e3", "9" * 16, str(redis_ms(store.redis) + 60_000)):
        assert post(client, "/dead/replay", {**form, "end": end}).status_code == 400, end
    del form["end"]
    assert post(client, "/dead/replay", form).status_code == 400
    assert store.counts()["dead"] == 4  # nothing replayed by a form without its end


def test_a_replay_s_result_links_to_the_letters_it_replayed(client: Console, store: Store) -> None:
    store.redis.set(keys.PAUSED, "held for the test", px=600_000)  # replays stay pending
    ids = died(store, 25)
    page = client.get("/dead").text
    asked = post(client, "/dead/replay", {"csrf": csrf(page), "group": "all"})
    answer = post(client, "/dead/replay", confirmed(asked.text))
    location = answer.headers["location"]
    result = client.get(location).text
    section = result[result.index('<section id="replayed">') :]
    section = section[: section.index("</section>")]
    linked = re.findall(r'<a href="/deliveries/([^"]+)"><code>', section)
    assert len(linked) == 20
    assert set(linked) <= set(ids)
    assert section.count("<td>pending</td>") == 20  # each row says where the letter is now
    assert "Replayed: the first 20 of 25, and where each is now" in _text(section)
    assert 'id="replayed-rest"' in section
    one = client.get(f"/deliveries/{linked[0]}")
    assert one.status_code == 200
    assert '<td id="state">pending</td>' in one.text

    hostile = client.get("/dead", params={"done": "replayed", "n": "2",
                                          "ids": f"{SCRIPT},../x,{ids[0]},{ids[0]}"})  # fmt: skip
    assert hostile.status_code == 200
    assert SCRIPT not in hostile.text
    section = hostile.text[hostile.text.index('<section id="replayed">') :]
    assert re.findall(r'<a href="/deliveries/([^"]+)"><code>', section.split("</section>")[0]) \
        == [ids[0]]  # fmt: skip
    assert 'id="replayed"' not in client.get("/dead", params={"ids": ids[0]}).text


# -- watching -----------------------------------------------------------------------


@pytest.mark.usefixtures("console_worker")
def test_the_overview_charts_outcomes_per_minute_and_shows_the_lanes(
    client: Console, store: Store, stub: ProviderStub
) -> None:
    delivered = [sent(stub, store, ["ok"]), sent(stub, store, ["503", "ok"])]
    died = dead(stub, store, ["status:-24"])
    wait_for(lambda: store.states(delivered) == ["delivered", "delivered"], 20)
    minute = int(time.time() * 1000) // 60_000
    counted: dict[str, int] = {}
    for m in (minute - 1, minute):  # the attempts may straddle a minute
        for verdict, n in store.redis.hgetall(keys.outcomes_in(m)).items():
            counted[verdict] = counted.get(verdict, 0) + int(n)
    assert counted == {"delivered": 2, "retry": 1, "dead": 1}
    assert sorted(store.redis.lrange(keys.DONE, 0, -1)) == sorted(delivered)

    store.redis.set(keys.PAUSED, "held for the test", px=600_000)  # pending stays pending
    first = store.enqueue(record())[0]
    store.enqueue_many([record(), record()], due_in_s=3600)  # bulk, waiting
    page = client.get("/").text
    for outcome, n in (("delivered", 2), ("retry", 1), ("dead", 1), ("other", 0)):
        assert re.search(rf'id="total-{outcome}">{n}<', page), outcome
    assert page.count('class="delivered"') in (1, 2)  # one bar per minute with deliveries
    assert page.count('<g class="bar">') == 60
    text = _text(page)
    assert "live 1 1 0" in text  # depth, due now, waiting
    assert "bulk 2 0 2" in text
    assert first[:16] in page
    assert "due just now" in text or "ago" in text
    assert died not in page


def test_deliveries_are_listed_by_state_a_page_at_a_time(client: Console, store: Store) -> None:
    r = store.redis
    r.set(keys.PAUSED, "held for the test", px=600_000)
    due = [d for d, _ in store.enqueue_many([record() for _ in range(60)])]
    later = [d for d, _ in store.enqueue_many([record() for _ in range(3)], due_in_s=3600)]
    gone = [d for d, _ in store.enqueue_many([record(), record()], lane="l")]
    now = int(time.time() * 1000)
    for delivery_id in gone:  # one dead, one delivered
        r.zrem(keys.LIVE, delivery_id)
    r.hset(keys.delivery(gone[0]), mapping={"s": "x", "z": now})
    r.zadd(keys.DEAD, {gone[0]: now})
    r.delete(keys.delivery(gone[1]))
    r.set(keys.marker(gone[1]), f"{now}|", ex=3600)
    r.lpush(keys.DONE, gone[1])

    first = client.get("/list", params={"state": "pending", "lane": "bulk"})
    assert first.status_code == 200
    assert "60 pending, due now in the bulk lane" in _text(first.text)
    assert first.text.count('<tr>\n<td><a href="/deliveries/') == 50
    assert 'rel="next"' in first.text
    second = client.get("/list", params={"state": "pending", "lane": "bulk", "page": "2"})
    shown = re.findall(r'<td><a href="/deliveries/[^"]+"><code>([^<]+)</code>', second.text)
    assert len(shown) == 10
    assert set(shown) < set(due)
    assert 'rel="next"' not in second.text
    assert "2023-04-11 03:46:04 UTC" in second.text  # the record's time as a date

    waiting = client.get("/list", params={"state": "waiting", "lane": "bulk"}).text
    assert sorted(re.findall(r"<code>([^<]+)</code>", waiting)) == sorted(later)
    assert "due in 59 min" in _text(waiting) or "due in 1 h" in _text(waiting)
    dead_list = client.get("/list", params={"state": "dead"}).text
    assert re.findall(r"<code>([^<]+)</code>", dead_list) == [gone[0]]
    done = client.get("/list", params={"state": "delivered"}).text
    assert re.findall(r"<code>([^<]+)</code>", done) == [gone[1]]
    assert "none on this page" in _text(client.get("/list?state=pending&lane=live").text)
    for bad in ("state=nope", "lane=nope", "page=0", "page=x", "page=" + "9" * 30):
        assert client.get("/list?" + bad).status_code == 400, bad


def test_times_are_relative_with_the_exact_time_on_hover_and_auto_refresh_is_optional(
    client: Console, store: Store
) -> None:
    store.redis.set(keys.PAUSED, "held for the test", px=600_000)
    delivery_id = store.enqueue(record())[0]
    page = client.get(f"/deliveries/{delivery_id}").text
    shown_time = (r'<td id="time"><time datetime="2023-04-11T03:46:04\+00:00" '
                  r'title="1681184764000 \(epoch ms\)">2023-04-11 03:46:04 UTC</time>')  # fmt: skip
    assert re.search(shown_time, page)
    created = re.search(r"<th>created_at</th><td>(.*?)</td>", page)
    assert created
    assert re.fullmatch(r'<time datetime="([^"]+)" title="\1">(just now|\d+ s ago)</time>',
                        created.group(1))  # fmt: skip

    assert 'http-equiv="refresh"' not in client.get("/").text
    refreshing = client.get("/", params={"refresh": "30"}).text
    assert '<meta http-equiv="refresh" content="30">' in refreshing
    assert 'id="refresh-off"' in refreshing
    assert 'http-equiv="refresh"' not in client.get("/", params={"refresh": "1"}).text
    listed = client.get("/list", params={"state": "dead", "refresh": "10"}).text
    assert '<meta http-equiv="refresh" content="10">' in listed


def test_relative_times_and_the_chart_scale() -> None:
    assert [relative(s) for s in (0, -5, -200, -7300, 90_000, -200_000)] == [
        "just now", "5 s ago", "3 min ago", "2 h ago", "in 1 d", "2 d ago"
    ]  # fmt: skip
    assert [nice_top(v) for v in (0, 1, 3, 7, 10, 11, 999, 1001)] == [
        1,
        1,
        5,
        10,
        10,
        20,
        1000,
        2000,
    ]
    assert str(record_date("not-ms")) == "not-ms"
    assert str(when("<b>")) == "&lt;b&gt;"
