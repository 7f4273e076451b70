"""Settings are checked at start-up: every bad value names its variable, exit 2, no traceback.

The validators are pure and tested from the environment; a few real subprocesses prove
that the worker and the CLI commands turn a bad value into exit 2. The metrics port is
bound before Celery starts: a taken port is exit 2, a free one serves /metrics.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from tests.helpers import backfill
from worker.app import celery_config
from worker.local.processes import LocalRedis, WorkerProcess, free_port
from worker.operate.errors import ConfigError
from worker.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
Spawn = Callable[..., WorkerProcess]
PASSWORD = "hunter2-never-shown"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ``BACKFILL_*`` variable from the session: each test sets its own."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


def load(env: pytest.MonkeyPatch, **values: str) -> Settings:
    for name, value in values.items():
        env.setenv(name, value)
    return load_settings()


BAD = [
    ("BACKFILL_REDIS_URL", "redis://h:notaport/0"),
    ("BACKFILL_REDIS_URL", "redis://h:6379/zz"),
    ("BACKFILL_REDIS_URL", "redis://h:6379/16"),
    ("BACKFILL_REDIS_URL", "redis://h:6379/-1"),
    ("BACKFILL_REDIS_URL", "redis://h:0/0"),
    ("BACKFILL_REDIS_URL", "redis://h:70000/0"),
    ("BACKFILL_REDIS_URL", "redis:///0"),
    ("BACKFILL_REDIS_URL", "redis://-h-/0"),
    ("BACKFILL_REDIS_URL", "redis://h/0#x"),
    ("BACKFILL_REDIS_URL", "redis://h/0?socket_timeout=1"),
    ("BACKFILL_REDIS_URL", "rediss://h/0?unknown=1"),
    ("BACKFILL_REDIS_URL", "unix:///run/redis.sock"),
    ("BACKFILL_REDIS_URL", "http://h:6379/0"),
    ("BACKFILL_REDIS_URL", " redis://h/0"),
    ("BACKFILL_REDIS_URL", ""),
    ("BACKFILL_REDIS_URL", "sentinel://a:26379;"),
    ("BACKFILL_REDIS_URL", "sentinel://a:26379;redis://b:6379/0"),
    ("BACKFILL_REDIS_URL", "sentinel://a:26379/1;sentinel://b:26379/2"),
    ("BACKFILL_REDIS_URL", "sentinel://a:port;sentinel://b:26379/0"),
    ("BACKFILL_BASE_URL", "ftp://x/sms"),
    ("BACKFILL_BASE_URL", "https://"),
    ("BACKFILL_BASE_URL", "https://user:pass@h/sms"),
    ("BACKFILL_BASE_URL", "https://h/sms?x=1"),
    ("BACKFILL_BASE_URL", "https://h/sms#f"),
    ("BACKFILL_BASE_URL", "https://h:notaport/sms"),
    ("BACKFILL_BASE_URL", "https://h:0/sms"),
    ("BACKFILL_BASE_URL", "https://h/s ms"),
    ("BACKFILL_BACKOFF_CAP_S", "inf"),
    ("BACKFILL_BACKOFF_CAP_S", "1e308"),
    ("BACKFILL_BACKOFF_CAP_S", "-1"),
    ("BACKFILL_BACKOFF_BASE_S", "1e308"),
    ("BACKFILL_BACKOFF_BASE_S", "nan"),
    ("BACKFILL_BACKOFF_BASE_S", "3601"),
    ("BACKFILL_PAUSE_S", "1e300"),
    ("BACKFILL_PAUSE_S", "0"),
    ("BACKFILL_SHUTDOWN_TIMEOUT_S", "inf"),
    ("BACKFILL_SHUTDOWN_TIMEOUT_S", "3601"),
    ("BACKFILL_CONNECT_TIMEOUT_S", "0"),
    ("BACKFILL_CONNECT_TIMEOUT_S", "301"),
    ("BACKFILL_READ_TIMEOUT_S", "-inf"),
    ("BACKFILL_READ_TIMEOUT_S", "301"),
    ("BACKFILL_KEEP_DELIVERED_S", "-1"),
    ("BACKFILL_KEEP_DELIVERED_S", "86401"),
    ("BACKFILL_KEEP_DELIVERED_S", "1.5"),
    ("BACKFILL_VISIBILITY_TIMEOUT_S", "604801"),
    ("BACKFILL_VISIBILITY_TIMEOUT_S", "nan"),
    ("BACKFILL_SCHEDULER_TICK_S", "0"),
    ("BACKFILL_SCHEDULER_TICK_S", "11"),
    ("BACKFILL_RATE_LIMIT", "1e7"),
    ("BACKFILL_RATE_LIMIT", "-1"),
    ("BACKFILL_RATE_BURST", "0"),
    ("BACKFILL_RATE_BURST", "10001"),
    ("BACKFILL_SLOWDOWN_S", "3601"),
    ("BACKFILL_OUTAGE_FAILURES", "1"),
    ("BACKFILL_OUTAGE_FAILURES", "1001"),
    ("BACKFILL_OUTAGE_DELIVERIES", "0"),
    ("BACKFILL_OUTAGE_WINDOW_S", "nan"),
    ("BACKFILL_OUTAGE_WINDOW_S", "3601"),
    ("BACKFILL_OUTAGE_PROBE_CAP_S", "0.5"),
    ("BACKFILL_RAMP_START_PER_S", "-1"),
    ("BACKFILL_RAMP_DOUBLE_S", "0"),
    ("BACKFILL_OUTAGE_RETRIED", "-1"),
    ("BACKFILL_OUTAGE_RETRIED", "1001"),
    ("BACKFILL_OUTAGE_RETRIED", "one"),
    ("BACKFILL_RAMP_SHORT_HOLD_S", "-1"),
    ("BACKFILL_RAMP_SHORT_HOLD_S", "86401"),
    ("BACKFILL_RAMP_SHORT_HOLD_S", "nan"),
    ("BACKFILL_CLOCK_CORRECTION", "sometimes"),
    ("BACKFILL_CLOCK_MAX_OFFSET_S", "0"),
    ("BACKFILL_CLOCK_MAX_OFFSET_S", "86401"),
    ("BACKFILL_CLOCK_MAX_OFFSET_S", "inf"),
    ("BACKFILL_ACCEPT_EVICTION", "perhaps"),
    ("BACKFILL_LOOKUP_INDEX", "maybe"),
    ("BACKFILL_STALL_AFTER_S", "1e300"),
    ("BACKFILL_DEDUPE_TTL_S", "59"),
    ("BACKFILL_DEDUPE_TTL_S", str(90 * 86400 + 1)),
    ("BACKFILL_MAX_ATTEMPTS", "0"),
    ("BACKFILL_MAX_ATTEMPTS", "1.5"),
    ("BACKFILL_CONCURRENCY", "513"),
    ("BACKFILL_QUEUE", "has space"),
    ("BACKFILL_METRICS_PORT", "0"),
    ("BACKFILL_METRICS_PORT", "65536"),
    # what Kubernetes injects for a Service named backfill-metrics
    ("BACKFILL_METRICS_PORT", "tcp://10.0.0.7:9100"),
    ("BACKFILL_METRICS_HOST", "not a host"),
    ("BACKFILL_METRICS_HOST", ""),
    ("BACKFILL_REDIS_MASTER_NAME", ""),
    ("BACKFILL_REDIS_MASTER_NAME", "my master"),
    ("BACKFILL_LOG_LEVEL", "verbose"),
    ("BACKFILL_LOG_FORMAT", "xml"),
    ("BACKFILL_CODES", "-16:fatal"),
    ("BACKFILL_INTAKE_TOKENS", "ops:short"),
]


@pytest.mark.parametrize(("name", "value"), BAD)
def test_a_bad_value_names_its_variable(
    clean_env: pytest.MonkeyPatch, name: str, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(clean_env, **{name: value})
    assert str(caught.value).startswith(f"{name}: ")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BACKFILL_REDIS_URL", f"redis://:{PASSWORD}@h:notaport/0"),
        ("BACKFILL_REDIS_URL", f"sentinel://:{PASSWORD}@a:1/1;sentinel://b:2/2"),
        ("BACKFILL_BASE_URL", f"https://u:{PASSWORD}@h/sms"),
        ("BACKFILL_API_SECRET", f"{PASSWORD}\r"),
        ("BACKFILL_API_KEY", f" {PASSWORD}"),
        ("BACKFILL_INTAKE_TOKENS", f"ops:{PASSWORD}, x:short"),
    ],
)
def test_the_error_never_echoes_a_secret(
    clean_env: pytest.MonkeyPatch, name: str, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(clean_env, **{name: value})
    assert name in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_settings_that_disagree_are_named(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="BACKFILL_BACKOFF_CAP_S must be >= BACKFILL_BACKOFF"):
        load(clean_env, BACKFILL_BACKOFF_BASE_S="60", BACKFILL_BACKOFF_CAP_S="30")
    clean_env.setenv("BACKFILL_BACKOFF_CAP_S", "60")
    # the default attempt lease is 5 + 15 + 10 s, and a drain may hold its message 5 s more
    with pytest.raises(ConfigError, match=r"^BACKFILL_VISIBILITY_TIMEOUT_S must exceed"):
        load(clean_env, BACKFILL_VISIBILITY_TIMEOUT_S="35")
    assert load(clean_env, BACKFILL_VISIBILITY_TIMEOUT_S="35.5").visibility_timeout_s == 35.5
    with pytest.raises(ConfigError, match=r"attempt lease \(40 s\)"):
        load(clean_env, BACKFILL_READ_TIMEOUT_S="25")


def test_every_problem_is_reported_at_once(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as caught:
        load(clean_env, BACKFILL_PAUSE_S="inf", BACKFILL_REDIS_URL="redis://h:x/0")
    assert "BACKFILL_PAUSE_S: " in str(caught.value)
    assert "BACKFILL_REDIS_URL: " in str(caught.value)


def test_outage_deliveries_cannot_exceed_failures(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="BACKFILL_OUTAGE_DELIVERIES must be <="):
        load(clean_env, BACKFILL_OUTAGE_FAILURES="4", BACKFILL_OUTAGE_DELIVERIES="5")


def test_defaults_and_the_documented_limits_are_accepted(clean_env: pytest.MonkeyPatch) -> None:
    defaults = load(clean_env)
    assert defaults.redis_url == "redis://localhost:6379/0"
    assert defaults.metrics_host == "0.0.0.0"
    assert defaults.keep_delivered_s == 900
    assert load(clean_env, BACKFILL_KEEP_DELIVERED_S="0").keep_delivered_s == 0
    assert defaults.lookup_index is True
    assert load(clean_env, BACKFILL_LOOKUP_INDEX="false").lookup_index is False
    assert defaults.outage_rules.failures == 8
    assert defaults.outage_rules.deliveries == 3
    rules = load(clean_env, BACKFILL_OUTAGE_FAILURES="20", BACKFILL_OUTAGE_DELIVERIES="20")
    assert rules.outage_rules.deliveries == 20
    limits = load(
        clean_env,
        BACKFILL_BACKOFF_BASE_S="3600",
        BACKFILL_BACKOFF_CAP_S="604800",
        BACKFILL_CONNECT_TIMEOUT_S="300",
        BACKFILL_READ_TIMEOUT_S="300",
        BACKFILL_PAUSE_S="86400",
        BACKFILL_SHUTDOWN_TIMEOUT_S="3600",
        BACKFILL_KEEP_DELIVERED_S="86400",
        BACKFILL_VISIBILITY_TIMEOUT_S="604800",
        BACKFILL_RATE_LIMIT="1e6",
        BACKFILL_DEDUPE_TTL_S=str(90 * 86400),
        BACKFILL_METRICS_PORT="65535",
        BACKFILL_METRICS_HOST="::1",
    )
    assert (defaults.outage_retried, defaults.ramp_short_hold_s) == (1, 30.0)
    assert (defaults.clock_correction, defaults.clock_max_offset_s) == (True, 30.0)
    assert defaults.accept_eviction is False
    edges = load(
        clean_env,
        BACKFILL_OUTAGE_RETRIED="0",
        BACKFILL_RAMP_SHORT_HOLD_S="86400",
        BACKFILL_CLOCK_CORRECTION="false",
        BACKFILL_CLOCK_MAX_OFFSET_S="86400",
        BACKFILL_ACCEPT_EVICTION="true",
    )
    assert (edges.outage_retried, edges.ramp_short_hold_s) == (0, 86400)
    assert (edges.clock_correction, edges.clock_max_offset_s) == (False, 86400)
    assert edges.accept_eviction is True
    assert limits.retry_window_s() < float("inf")
    assert limits.pause_s == 86400
    assert limits.keep_delivered_s == 86400


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("BACKFILL_REDIS_URL", "redis://:pw@cache.internal:6380/3", None),
        ("BACKFILL_REDIS_URL", "redis://[::1]:6379", None),
        ("BACKFILL_REDIS_URL", "rediss://h:6380/0?ssl_cert_reqs=required", None),
        # kombu reads the database from the first entry, worker.state.store from any
        (
            "BACKFILL_REDIS_URL",
            "sentinel://a:26379;sentinel://b:26380/2",
            "sentinel://a:26379/2;sentinel://b:26380/2",
        ),
        ("BACKFILL_REDIS_URL", "sentinel://s1", "sentinel://s1/0"),
        ("BACKFILL_BASE_URL", "http://127.0.0.1:8099/sms/", "http://127.0.0.1:8099/sms"),
        ("BACKFILL_LOG_LEVEL", "info", "INFO"),
        ("BACKFILL_METRICS_PORT", "", None),
        ("BACKFILL_METRICS_HOST", "metrics.local", None),
    ],
)
def test_good_values_are_accepted(
    clean_env: pytest.MonkeyPatch, name: str, value: str, expected: str | None
) -> None:
    settings = load(clean_env, **{name: value})
    field = name.removeprefix(ENV_PREFIX).lower()
    assert getattr(settings, field) == (value if expected is None and value else expected)


def test_celery_config_is_where_the_broker_is_chosen(clean_env: pytest.MonkeyPatch) -> None:
    plain = celery_config(load(clean_env, BACKFILL_QUEUE="q1"))
    assert plain["broker_transport"] == "worker.deliver.transport:Transport"
    assert plain["broker_transport_options"]["guarded_queues"] == ["q1"]
    assert "master_name" not in plain["broker_transport_options"]
    ha = celery_config(load(clean_env, BACKFILL_REDIS_URL="sentinel://a;sentinel://b"))
    assert ha["broker_transport"] == "worker.deliver.transport:SentinelTransport"
    assert ha["broker_url"] == "sentinel://a/0;sentinel://b/0"
    assert ha["broker_transport_options"]["master_name"] == "mymaster"


# --- real processes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "name", "value"),
    [
        (["worker"], "BACKFILL_PAUSE_S", "1e300"),
        (["worker"], "BACKFILL_REDIS_URL", "redis://h:6379/zz"),
        (["worker"], "BACKFILL_SHUTDOWN_TIMEOUT_S", "inf"),
        (["status", "x"], "BACKFILL_REDIS_URL", "redis://h:notaport/0"),
        (["dead", "list"], "BACKFILL_BACKOFF_CAP_S", "inf"),
        (["health"], "BACKFILL_BASE_URL", "https://u:p@h/sms"),
        (["intake"], "BACKFILL_METRICS_HOST", "not a host"),
        (
            ["enqueue", "--app-id", "a", "--number", "8613512345678", "--time", "1681184764000"],
            "BACKFILL_REDIS_URL",
            "redis://h:0/0",
        ),
    ],
)
def test_commands_exit_2_naming_the_variable(args: list[str], name: str, value: str) -> None:
    result = backfill(*args, env={name: value}, timeout=30)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {name}: " in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def listening_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@contextmanager
def metrics_port_taken(
    settings_env: dict[str, str], redis: LocalRedis
) -> Iterator[tuple[int, dict[str, str]]]:
    """A port something listens on, and a worker environment on ``redis`` that asks for
    its metrics there."""
    port = free_port()
    with listening_socket(port):
        yield (
            port,
            {
                **settings_env,
                "BACKFILL_REDIS_URL": redis.url,
                "BACKFILL_METRICS_PORT": str(port),
                "BACKFILL_METRICS_HOST": "127.0.0.1",
            },
        )


def test_a_taken_metrics_port_stops_the_worker_with_exit_2(
    settings_env: dict[str, str], private_redis: LocalRedis, tmp_path: Path
) -> None:
    with metrics_port_taken(settings_env, private_redis) as (port, env):
        process = WorkerProcess(env, tmp_path / "worker.log").start()
        assert process.process is not None
        code = process.process.wait(30)
    text = process.log_path.read_text()
    assert code == 2
    assert f"error: BACKFILL_METRICS_PORT: port {port} on 127.0.0.1 is in use" in text
    assert "worker.ready" not in text
    assert "Traceback" not in text


def test_a_taken_metrics_port_stops_celery_s_own_worker_command_too(
    settings_env: dict[str, str], private_redis: LocalRedis
) -> None:
    with metrics_port_taken(settings_env, private_redis) as (port, worker_env):
        env = {**os.environ, **worker_env}
        result = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "--without-mingle"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert '"event":"worker.config_error"' in result.stdout
    assert f"BACKFILL_METRICS_PORT: port {port} on 127.0.0.1 is in use" in result.stdout


def test_a_free_metrics_port_serves_metrics(private_redis: LocalRedis, spawn_worker: Spawn) -> None:
    port = free_port()
    process = spawn_worker(
        private_redis.url, BACKFILL_METRICS_PORT=str(port), BACKFILL_METRICS_HOST="127.0.0.1"
    )
    answer = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert answer.status_code == 200
    assert "backfill_queue_depth" in answer.text
    assert "backfill_guarded_messages" in answer.text
    # bound once, before Celery started, and not again when the worker was ready
    events = [line for line in process.log_path.read_text().splitlines() if "metrics." in line]
    assert len([e for e in events if '"metrics.serving"' in e]) == 1
    process.signal(signal.SIGTERM)  # a warm shutdown is a clean stop: exit 0
    assert process.process is not None
    assert process.process.wait(30) == 0
