"""The monitoring we ship: the Grafana dashboard and the Prometheus alerts read only metrics a
real worker serves, the rules pass ``promtool check rules`` and their own unit tests
(``promtool test rules``), and those unit tests notice a changed rule."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import unique, wait_for
from tests.helpers import open_store
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess, free_port
from worker.local.stub import ProviderStub

OPS = Path(__file__).resolve().parent.parent / "ops"
ALERTS = OPS / "prometheus" / "alerts.yml"
ALERTS_TEST = OPS / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = OPS / "prometheus" / "prometheus.yml"
DASHBOARD = OPS / "grafana" / "backfill.json"
# What the dashboard must show (issue 13): outcomes, latency, depth, retries, dead letters
# (stored and rate), paused, outage, the most overdue delivery, workers up.
DASHBOARD_MUST_READ = {
    "backfill_attempts_total",
    "backfill_attempt_duration_seconds_bucket",
    "backfill_pending",
    "backfill_queue_depth",
    "backfill_waiting_retries",
    "backfill_dead_letters",
    "backfill_dead_lettered_total",
    "backfill_paused",
    "backfill_outage",
    "backfill_overdue_seconds",
    "up",
}
# A selector: a metric name and its label matchers ("up" is Prometheus's own, per target).
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
PROJECT_NAME = re.compile(r"\bbackfill_[a-z0-9_]+")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run Debian's promtool (package ``prometheus``; .ci/run installs it)."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found: apt-get install prometheus (see .ci/run)")
    return subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def selectors(expr: str) -> list[tuple[str, str]]:
    """Every ``name{matchers}`` in a PromQL expression; a project name outside one fails."""
    found = SELECTOR.findall(expr)
    bare = set(PROJECT_NAME.findall(SELECTOR.sub("", expr)))
    assert not bare, f"metric without a job matcher in {expr!r}: {sorted(bare)}"
    assert found, f"no metric selector in {expr!r}"
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def served_names(
    tmp_path_factory: pytest.TempPathFactory,
    settings_env: dict[str, str],
    stub: ProviderStub,
    module_redis: LocalRedis,
) -> set[str]:
    """The metric names a real worker serves on /metrics after delivering and burying."""
    workdir = tmp_path_factory.mktemp("monitoring")
    port = free_port()
    server = module_redis
    env = {**settings_env, "BACKFILL_REDIS_URL": server.url}
    process = WorkerProcess({**env, "BACKFILL_METRICS_PORT": str(port)}, workdir / "w.log")
    process.start()
    try:
        process.wait_ready()
        tag = unique("monitoring")
        stub.set_plan({f"{tag}-dead": ["status:-9"]})
        store = open_store(server.url)
        for msgid in (f"{tag}-ok", f"{tag}-dead"):
            store.enqueue(BackfillRecord("mon", "8613512345678", "1681184764000", msgid=msgid))
        url = f"http://127.0.0.1:{port}/metrics"

        def scraped() -> str | None:
            text = requests.get(url, timeout=5).text
            return text if "backfill_dead_lettered_total 1.0" in text else None

        text: str = wait_for(scraped, 20)
    finally:
        process.stop()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()}
    # a labelled family has no series before its first event, but its TYPE line is served
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ")
            suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
            names |= {family + suffix for suffix in suffixes}
    return {name for name in names if name.startswith("backfill_")}


def test_a_real_worker_serves_the_fleet_gauges_and_counters(served_names: set[str]) -> None:
    assert DASHBOARD_MUST_READ - {"up"} <= served_names


def test_every_dashboard_query_reads_served_metrics_of_the_chosen_job(
    served_names: set[str],
) -> None:
    read = set()
    for expr in dashboard_exprs():
        for name, matchers in selectors(expr):
            assert 'job="$job"' in matchers, f"{expr!r} ignores the dashboard's job variable"
            assert name in served_names | {"up"}, f"{name} is not served by a worker ({expr!r})"
            read.add(name)
    assert read >= DASHBOARD_MUST_READ, f"not on the dashboard: {DASHBOARD_MUST_READ - read}"


def test_every_alert_reads_served_metrics_of_the_backfill_job(served_names: set[str]) -> None:
    for rule in alert_rules():
        for name, matchers in selectors(rule["expr"]):
            assert 'job="backfill"' in matchers, f"{rule['alert']}: {name} without the job"
            assert name in served_names | {"up"}, f"{rule['alert']}: {name} is not served"


def test_the_dashboard_imports_anywhere_and_its_queries_parse(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in panel["targets"])
    # promtool parses PromQL: each query as a recording rule, Grafana's variables filled in
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(dashboard_exprs())
    ]
    filled = yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    filled = filled.replace("$job", "backfill").replace("$__rate_interval", "1m")
    (tmp_path / "dashboard.yml").write_text(filled)
    checked = promtool("check", "rules", str(tmp_path / "dashboard.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_rules_and_the_example_config_pass_promtool_check() -> None:
    rules = promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout
    config = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert config.returncode == 0, config.stdout + config.stderr


def test_the_rules_unit_tests_pass() -> None:
    tested = promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_tested_firing_and_quiet_and_says_what_to_do() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names >= {
        "BackfillDeadLettersGrowing",
        "BackfillPaused",
        "BackfillProviderOutage",
        "BackfillNotDelivering",
        "BackfillLiveDeliveriesOverdue",
        "BackfillNoWorkerScraped",
        "BackfillRedisFull",
    }
    assert names - firing == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"\d+m", rule["for"]), rule["alert"]


# A change to a rule that its unit tests must notice: (what, replaced by).
MUTATIONS = [
    ('absent(up{job="backfill"} == 1)', 'absent(up{job="backfill"})'),
    ('lane="live"}) > 300', 'lane="live"}) > 900'),
    ('lane="bulk"}) > 21600', 'lane="bulk"}) > 43200'),
    ('outcome=~"delivered|duplicate"', 'outcome="delivered"'),
    ("or max by (job) (backfill_outage", "or max by (job) (backfill_paused"),
    ("[15m])) > 0", "[15m])) > 5"),
    ("for: 1m", "for: 3m"),
    ('(backfill_redis_full{job="backfill"}) == 1', '(backfill_redis_full{job="backfill"}) > 1'),
]


@pytest.mark.parametrize(("before", "after"), MUTATIONS, ids=[m[1] for m in MUTATIONS])
def test_the_unit_tests_notice_a_changed_rule(tmp_path: Path, before: str, after: str) -> None:
    rules = ALERTS.read_text()
    assert rules.count(before) == 1, f"alerts.yml changed: update this mutation ({before!r})"
    (tmp_path / "alerts.yml").write_text(rules.replace(before, after))
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    assert promtool("check", "rules", "alerts.yml", cwd=tmp_path).returncode == 0
    tested = promtool("test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    assert tested.returncode != 0, f"the unit tests missed {before!r} -> {after!r}"


def test_the_overdue_gauge_is_how_long_each_lanes_oldest_due_delivery_waited(
    private_redis: LocalRedis,
) -> None:
    store = open_store(private_redis.url)
    assert store.gauges("backfill", time.time())["overdue_live_s"] == 0.0
    later = [BackfillRecord("mon", "8613512345678", "1681184764000", msgid=unique("later"))]
    store.enqueue_many(later, due_in_s=3600)
    store.enqueue(BackfillRecord("mon", "8613512345678", "1681184764000", msgid=unique("later")),
                  due_in_s=3600)  # fmt: skip
    figures = store.gauges("backfill", time.time())
    assert (figures["overdue_live_s"], figures["overdue_bulk_s"]) == (0.0, 0.0)  # not due
    enqueued = time.time()
    store.enqueue(BackfillRecord("mon", "8613512345678", "1681184764000", msgid=unique("live")))
    store.enqueue_many(
        [BackfillRecord("mon", "8613512345678", "1681184764000", msgid=unique("bulk"))]
    )
    figures = store.gauges("backfill", enqueued + 90)  # as if scraped 90 s later
    assert 89 <= figures["overdue_live_s"] <= 91
    assert 89 <= figures["overdue_bulk_s"] <= 91
    assert figures["pending"] == 4
    assert figures["waiting_retries"] == 2
