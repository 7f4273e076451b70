"""The HTTP intake as tests drive it: a real ``backfill intake`` subprocess and a client
(helpers, no fixtures: those are in the test modules)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from tests.conftest import unique
from tests.helpers import serving
from worker.local.processes import free_port

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


@contextmanager
def running_intake(
    env: dict[str, str],
    log_path: Path,
    *args: str,
    tokens: str = TOKENS,
    client_class: type[Intake] = Intake,
) -> Iterator[Intake]:
    """A real ``backfill intake`` subprocess (uvicorn) that knows ``tokens``, and a
    ``client_class`` on it; stopped on exit."""
    port = free_port()
    env = {**os.environ, **env, "BACKFILL_INTAKE_TOKENS": tokens}
    client = client_class(f"http://127.0.0.1:{port}", log_path)
    with serving(["intake", "--port", str(port), *args], env, log_path, lambda: healthy(client)):
        try:
            yield client
        finally:
            client.session.close()


def healthy(client: Intake) -> bool:
    """``/healthz`` answers 200."""
    try:
        return client.get("/healthz", token=None).status_code == 200
    except requests.ConnectionError:
        return False


def rec(**changes: Any) -> dict[str, Any]:
    return {"app_id": "php-app", "msgid": unique(), "number": "+8613512345678",
            "time": "1681184764000", **changes}  # fmt: skip
