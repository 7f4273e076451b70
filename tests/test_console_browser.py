"""The web console in a real browser: headless Chromium (Selenium) against a real
``backfill console`` process, a real worker, the stub and a Redis of the test's own.

Debian's ``chromium`` and ``chromium-driver`` packages provide the browser (CI installs
them, see .ci/run); without them the test is skipped, saying so.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.conftest import unique, wait_for
from tests.helpers import open_store, serving
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess, free_port
from worker.local.stub import ProviderStub
from worker.state.store import Store

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
USER, PASSWORD = "operator", "a-long-console-password"
NUMBER = "8613512345678"

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
    "chromium-driver; CI installs them)",
)


@pytest.fixture
def console_url(
    settings_env: dict[str, str], private_redis: LocalRedis, tmp_path: Path
) -> Iterator[tuple[str, Path]]:
    """A real ``backfill console`` on the test's Redis: its URL and its log file."""
    port = free_port()
    log_path = tmp_path / "console.log"
    env = {
        **os.environ,
        **settings_env,
        "BACKFILL_REDIS_URL": private_redis.url,
        "BACKFILL_CONSOLE_USERS": f"{USER}:{PASSWORD}",
    }
    url = f"http://127.0.0.1:{port}"
    with serving(["console", "--port", str(port)], env, log_path, lambda: _listening(url)):
        yield url, log_path


def _listening(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
    except requests.ConnectionError:
        return False
    return True


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium that sends the console user's Basic credentials with every request."""
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,1000"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    credentials = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {credentials}"}}
    )
    yield driver
    driver.quit()


def shows(browser: webdriver.Chrome, by: str, selector: str, text: str) -> None:
    """Wait until the element's text contains ``text`` (a click's page may still be loading)."""

    def found() -> bool:
        try:
            return text in browser.find_element(by, selector).text
        except (NoSuchElementException, StaleElementReferenceException):
            return False

    wait_for(found, 10, 0.05)


def search_and_open(browser: webdriver.Chrome, msgid: str, delivery_id: str) -> None:
    """Search a msgid with the header's search box and open the delivery it finds."""
    search = browser.find_element(By.NAME, "q")
    search.send_keys(msgid)
    search.submit()
    wait_for(lambda: "/deliveries?" in browser.current_url, 10)
    shows(browser, By.TAG_NAME, "h2", "By delivery_id")
    link = browser.find_element(By.LINK_TEXT, delivery_id)
    assert NUMBER not in browser.page_source
    link.click()
    wait_for(lambda: browser.current_url.endswith(f"/deliveries/{delivery_id}"), 10)
    shows(browser, By.ID, "state", "dead")


def purge_the_first_dead_letter(browser: webdriver.Chrome, url: str) -> None:
    """Purge the first letter the dead-letter page lists: a confirmation page comes first."""
    browser.get(url + "/dead")
    assert "status -24: injected" in browser.find_element(By.CSS_SELECTOR, "section h2").text
    browser.find_element(By.CSS_SELECTOR, "section button.danger").click()
    shows(browser, By.TAG_NAME, "h1", "Purge for good?")
    browser.find_element(By.ID, "confirm").click()
    wait_for(lambda: "done=purged" in browser.current_url, 10)


@pytest.fixture
def served(private_redis: LocalRedis, spawn_worker: Callable[..., WorkerProcess]) -> Store:
    """A worker on this test's own Redis (the console's), and a Store there."""
    spawn_worker(private_redis.url)
    return open_store(private_redis.url)


def test_an_operator_finds_a_msgid_reads_its_attempts_and_replays_it_to_delivered(
    browser: webdriver.Chrome, console_url: tuple[str, Path], served: Store, stub: ProviderStub
) -> None:
    url, console_log = console_url
    store = served
    msgid, other = unique("browser"), unique("browser")
    stub.set_plan({msgid: ["503", "status:-24", "ok"], other: ["status:-24"]})
    ids = [
        store.enqueue(BackfillRecord.parse({"app_id": "app-browser", "msgid": m,
                                            "number": NUMBER, "time": "1681184764000"}))[0]
        for m in (msgid, other)
    ]  # fmt: skip
    wait_for(lambda: store.states(ids) == ["dead", "dead"], 20)
    delivery_id = ids[0]

    browser.get(url + "/")  # logged in: the overview, with the dead letters counted
    shows(browser, By.TAG_NAME, "h1", "Overview")
    counts = browser.find_element(By.ID, "counts").text
    assert re.search(r"dead 2\b", counts), counts

    search_and_open(browser, msgid, delivery_id)
    attempts = browser.find_elements(By.CSS_SELECTOR, "#attempts tr.attempt")
    outcomes = [row.find_element(By.CLASS_NAME, "outcome").text for row in attempts]
    assert outcomes == ["retry", "dead"]
    assert "503" in attempts[0].text
    assert "-24" in attempts[1].text
    assert "*********5678" in browser.page_source
    assert NUMBER not in browser.page_source

    browser.find_element(By.ID, "replay").click()  # a form POST with its CSRF token
    wait_for(lambda: "done=replayed" in browser.current_url, 10)
    shows(browser, By.ID, "done", "replayed")

    def delivered() -> bool:
        browser.refresh()
        return browser.find_element(By.ID, "state").text == "delivered"

    wait_for(delivered, 20, 0.3)
    rows = browser.find_elements(By.CSS_SELECTOR, "#attempts tr.attempt")
    assert rows[-1].find_element(By.CLASS_NAME, "outcome").text == "delivered"
    assert store.states(ids) == ["delivered", "dead"]

    purge_the_first_dead_letter(browser, url)  # the other letter
    assert store.states([ids[1]]) == [None]

    lines = [json.loads(line) for line in console_log.read_text().splitlines()
             if line.startswith("{")]  # fmt: skip
    replays = [e for e in lines if e.get("event") == "console.replay"]
    purges = [e for e in lines if e.get("event") == "console.purge"]
    assert [(e["user"], e["delivery_ids"]) for e in replays] == [(USER, [delivery_id])]
    assert [(e["user"], e["delivery_ids"]) for e in purges] == [(USER, [ids[1]])]
    assert PASSWORD not in console_log.read_text()


ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "console"  # git-ignored


def keep_screenshot(browser: webdriver.Chrome, name: str) -> Path:
    """The whole page as tests/artifacts/console/<name>.png, after checking that it uses
    the window's width and never scrolls sideways."""
    width = browser.execute_script("return window.innerWidth")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width, name
    main = browser.find_element(By.TAG_NAME, "main").size["width"]
    assert main >= 0.95 * width, (name, main, width)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(max(height + 140, 700), 4000))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    browser.save_screenshot(str(path))
    browser.set_window_size(1280, 1000)
    return path


def visit_the_lists(browser: webdriver.Chrome, url: str) -> list[Path]:
    """Each state's list (waiting: of the bulk lane), kept as screenshots."""
    shots = []
    for state in ("pending", "waiting", "dead", "delivered"):
        lane = "bulk" if state == "waiting" else "live"
        browser.get(f"{url}/list?state={state}&lane={lane}")
        shows(browser, By.TAG_NAME, "h1", "Deliveries:")
        assert NUMBER not in browser.page_source
        shots.append(keep_screenshot(browser, f"list-{state}"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.deliveries tr")) == 3  # + header

    return shots


def test_every_page_renders_and_is_kept_as_a_screenshot(
    browser: webdriver.Chrome, console_url: tuple[str, Path], served: Store, stub: ProviderStub
) -> None:
    url, _ = console_url
    store = served
    plans = {unique("ok"): ["ok"], unique("late"): ["503", "ok"], unique("bad"): ["status:-24"],
             unique("bad"): ["status:-24"], unique("gone"): ["status:-9"]}  # fmt: skip
    stub.set_plan(plans)
    ids = [store.enqueue(BackfillRecord.parse({"app_id": "app-browser", "msgid": msgid,
                                               "number": NUMBER, "time": "1681184764000"}))[0]
           for msgid in plans]  # fmt: skip
    wait_for(lambda: store.states(ids) == ["delivered"] * 2 + ["dead"] * 3, 30)
    store.redis.set("bf:paused", "held for the screenshots", px=600_000)
    store.enqueue_many([BackfillRecord.parse({"app_id": "app-bulk", "msgid": unique("b"),
                                              "number": NUMBER, "time": "1681184764000"})
                        for _ in range(3)], due_in_s=600)  # fmt: skip
    shots = []

    browser.get(url + "/")
    shows(browser, By.TAG_NAME, "h1", "Overview")
    assert browser.find_element(By.ID, "total-delivered").text == "2"
    assert browser.find_element(By.ID, "total-dead").text == "3"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart g.bar")) == 60
    assert browser.find_element(By.ID, "chart").size["width"] > 1000
    shots.append(keep_screenshot(browser, "overview"))
    browser.find_element(By.LINK_TEXT, "30 s").click()  # auto-refresh on
    wait_for(lambda: "refresh=30" in browser.current_url, 10)
    assert browser.find_elements(By.CSS_SELECTOR, 'meta[http-equiv="refresh"][content="30"]')
    shots.append(keep_screenshot(browser, "overview-refreshing"))

    shots += visit_the_lists(browser, url)
    search_and_open(browser, list(plans)[2], ids[2])
    assert browser.find_element(By.ID, "time").text == "2023-04-11 03:46:04 UTC"
    shots.append(keep_screenshot(browser, "delivery"))
    browser.get(url + "/deliveries?q=app-browser")
    shows(browser, By.TAG_NAME, "main", "By app_id")
    shots.append(keep_screenshot(browser, "search"))

    browser.get(url + "/dead")
    shows(browser, By.TAG_NAME, "h1", "Dead letters")
    shots.append(keep_screenshot(browser, "dead"))
    browser.find_element(By.XPATH, "//button[starts-with(text(), 'Replay all')]").click()
    shows(browser, By.TAG_NAME, "h1", "Replay?")
    assert "every dead letter again: 3 now" in browser.find_element(By.ID, "what").text
    assert store.states(ids[2:]) == ["dead"] * 3  # asked, not done
    shots.append(keep_screenshot(browser, "confirm-replay"))
    browser.find_element(By.ID, "confirm").click()
    wait_for(lambda: "done=replayed" in browser.current_url, 10)
    shows(browser, By.ID, "done", "3 replayed")
    listed = browser.find_elements(By.CSS_SELECTOR, "#replayed table.deliveries td code")
    assert sorted(code.text for code in listed) == sorted(ids[2:])  # what it replayed
    shots.append(keep_screenshot(browser, "replayed"))
    browser.find_element(By.LINK_TEXT, ids[3]).click()  # each links to its delivery
    wait_for(lambda: browser.current_url.endswith(f"/deliveries/{ids[3]}"), 10)
    shows(browser, By.ID, "state", "pending")
    shots.append(keep_screenshot(browser, "replayed-delivery"))

    browser.get(url + "/deliveries/no-such-delivery")
    shows(browser, By.ID, "error", "no such delivery")
    shots.append(keep_screenshot(browser, "error"))
    assert all(path.stat().st_size > 10_000 for path in shots)
