"""The HTTP intake over real HTTP (uvicorn subprocess) and a real Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import read_log, unique, wait_for
from tests.test_cli import backfill, snapshot
from worker.local import WorkerProcess, free_port

TOKEN = "intake-token-php-shop-0123456789"
OTHER = "intake-token-java-crm-9876543210"
TOKENS = f"php-shop:{TOKEN},java-crm:{OTHER}"


class Intake:
    def __init__(self, url: str, log_path: Path) -> None:
        self.url = url
        self.log_path = log_path
        self.session = requests.Session()

    def post(self, body: Any = None, token: str | None = TOKEN, raw: bytes | None = None,
             **headers: str) -> requests.Response:  # fmt: skip
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
        return self.session.post(f"{self.url}/v1/backfills", data=data, headers=headers, timeout=30)

    def get(self, path: str, token: str | None = TOKEN) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.session.get(f"{self.url}{path}", headers=headers, timeout=10)


@pytest.fixture(scope="module")
def intake(
    settings_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Intake]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("intake") / "intake.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "intake", "--port", str(port)],
            env={**settings_env, **_env(), "BACKFILL_INTAKE_TOKENS": TOKENS},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = Intake(f"http://127.0.0.1:{port}", log_path)
    try:
        wait_for(lambda: _healthy(client), 20, 0.1)
        yield client
    finally:
        client.session.close()
        process.terminate()
        process.wait(10)


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _healthy(client: Intake) -> bool:
    try:
        return client.get("/healthz", token=None).status_code == 200
    except requests.ConnectionError:
        return False


def rec(**changes: Any) -> dict[str, Any]:
    return {"app_id": "php-app", "msgid": unique(), "number": "+8613512345678",
            "time": "1681184764000", **changes}  # fmt: skip


@pytest.mark.parametrize("token", [None, "wrong-token-0000000000000", TOKEN + "x", ""])
def test_missing_or_wrong_token_is_401_and_nothing_is_enqueued(
    intake: Intake, r: redis.Redis, token: str | None
) -> None:
    before = snapshot(r, "backfill")
    answer = intake.post(rec(), token=token)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert snapshot(r, "backfill") == before
    assert intake.get("/v1/backfills/x", token=token).status_code == 401


def test_malformed_json_is_400(intake: Intake, r: redis.Redis) -> None:
    before = snapshot(r, "backfill")
    assert intake.post(raw=b'{"app_id": ').status_code == 400
    assert snapshot(r, "backfill") == before


def test_body_over_one_mib_is_413(intake: Intake, r: redis.Redis) -> None:
    before = snapshot(r, "backfill")
    big = json.dumps({"records": [rec(msgid="x" * 60) for _ in range(20_000)]}).encode()
    assert len(big) > 1024 * 1024
    assert intake.post(raw=big).status_code == 413
    assert snapshot(r, "backfill") == before


def test_invalid_records_are_422_listing_each_field_and_nothing_is_enqueued(
    intake: Intake, r: redis.Redis
) -> None:
    before = snapshot(r, "backfill")
    body = {"records": [rec(), rec(number="12"), rec(), rec(time="1681184764", colour="red")]}
    answer = intake.post(body)
    assert answer.status_code == 422
    errors = answer.json()["errors"]
    assert [e["index"] for e in errors] == [1, 3]
    assert set(errors[0]["fields"]) == {"number"}
    assert set(errors[1]["fields"]) == {"time", "colour"}
    assert snapshot(r, "backfill") == before
    assert intake.post({"records": []}).status_code == 422
    assert intake.post({"records": [rec()] * 1001}).status_code == 422
    assert intake.post([rec()]).status_code == 422
    assert snapshot(r, "backfill") == before


def test_one_record_is_accepted_delivered_and_audited_with_the_token_name(
    intake: Intake, r: redis.Redis, worker: WorkerProcess
) -> None:
    answer = intake.post(rec())
    assert answer.status_code == 202
    delivery_id = answer.json()["delivery_id"]

    def delivered() -> dict[str, Any] | None:
        status: dict[str, Any] = intake.get(f"/v1/backfills/{delivery_id}").json()
        return status if status["state"] == "delivered" else None

    status = wait_for(delivered, 20, 0.1)
    assert status["number"] == "*********5678"
    assert len(status["attempts_made"]) == 1
    assert intake.get("/v1/backfills/no-such-id").status_code == 404
    events = wait_for(
        lambda: [e for e in read_log(intake.log_path) if e.get("delivery_id") == delivery_id]
    )
    assert events[0]["event"] == "postback.enqueued"
    assert events[0]["source"] == "intake"
    assert events[0]["caller"] == "php-shop"
    assert TOKEN not in intake.log_path.read_text()


def test_a_batch_of_a_thousand_is_accepted_and_repeats_are_duplicates(
    intake: Intake, r: redis.Redis
) -> None:
    records = [rec() for _ in range(1000)]
    answer = intake.post({"records": records}, token=OTHER)
    assert answer.status_code == 202
    body = answer.json()
    assert body["accepted"] == 1000
    assert len(set(body["delivery_ids"])) == 1000
    again = intake.post({"records": records[:10]}).json()
    assert again["duplicates"] == 10
    assert again["delivery_ids"] == body["delivery_ids"][:10]


def test_openapi_document_is_published(intake: Intake) -> None:
    document = intake.get("/openapi.json", token=None).json()
    assert "/v1/backfills" in document["paths"]
    assert "requestBody" in document["paths"]["/v1/backfills"]["post"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"records": st.lists(json_values, max_size=3)}),
    st.builds(lambda extra: {**rec(), **extra}, st.dictionaries(st.sampled_from(
        ["app_id", "msgid", "number", "time", "x"]), json_values, max_size=2)),
)  # fmt: skip


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_fuzzed_bodies_never_500_and_rejections_write_nothing(
    intake: Intake, r: redis.Redis, body: Any
) -> None:
    before = snapshot(r, "backfill")
    answer = intake.post(body)
    assert answer.status_code in (202, 400, 422), answer.text
    if answer.status_code != 202:
        assert snapshot(r, "backfill") == before


def test_health_command(settings_env: dict[str, str], worker: WorkerProcess) -> None:
    ok = backfill("health")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "healthy" in ok.stdout
    down = backfill("health", env={"BACKFILL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert down.returncode == 1
    assert "Redis" in down.stdout


def test_health_for_one_node(settings_env: dict[str, str], worker: WorkerProcess) -> None:
    from worker.app import app

    names = [name for reply in app.control.ping(timeout=2.0) for name in reply]
    assert names, "the session worker replies to a ping"
    mine = backfill("health", "--node", names[0])
    assert mine.returncode == 0, mine.stdout + mine.stderr
    assert names[0] in mine.stdout
    other = backfill("health", "--node", "celery@no-such-host", "--timeout", "0.5")
    assert other.returncode == 1  # another worker's reply does not count for this node
    assert "celery@no-such-host did not reply" in other.stdout
