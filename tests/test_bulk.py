"""``backfill enqueue --file``: JSON lines and CSV, good, bad and duplicate rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import redis

from tests.conftest import unique, wait_for
from tests.test_cli import backfill, snapshot
from worker import keys
from worker.local import WorkerProcess
from worker.record import BackfillRecord
from worker.tasks import get_store


def row(**changes: str) -> dict[str, str]:
    return {"app_id": "bulk", "msgid": unique(), "number": "8613512345678",
            "time": "1681184764000", **changes}  # fmt: skip


def test_jsonl_with_good_bad_and_duplicate_rows(
    tmp_path: Path, settings_env: dict[str, str], r: redis.Redis, worker: WorkerProcess
) -> None:
    good = [row() for _ in range(5)]
    lines = [json.dumps(x) for x in good]
    lines.insert(2, json.dumps(row(number="12")))  # line 3
    lines.append(json.dumps(good[0]))  # line 7: the same record again
    lines.append("{not json")  # line 8
    lines.append(json.dumps(row(colour="red")))  # line 9
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    result = backfill("enqueue", "--file", str(source))
    assert result.returncode == 2
    assert "accepted 5  duplicates 1  rejected 3" in result.stdout
    rejects = [
        json.loads(x) for x in (tmp_path / "in.jsonl.rejects.jsonl").read_text().splitlines()
    ]
    assert [x["line"] for x in rejects] == [3, 8, 9]
    assert "number" in rejects[0]["errors"]
    assert "colour" in rejects[2]["errors"]
    store = get_store()
    ids = [r.get(keys.dedupe(BackfillRecord.parse(x).fingerprint())) for x in good]
    assert all(ids)
    wait_for(lambda: store.states(ids) == ["delivered"] * 5, 30)  # type: ignore[arg-type]


def test_csv_all_good_exits_0_and_leaves_no_rejects_file(
    tmp_path: Path, settings_env: dict[str, str], r: redis.Redis
) -> None:
    source = tmp_path / "in.csv"
    rows = [row() for _ in range(3)] + [row(msgid="")]
    source.write_text(
        "app_id,msgid,number,time\n"
        + "".join(f"{x['app_id']},{x['msgid']},{x['number']},{x['time']}\n" for x in rows)
    )
    result = backfill("enqueue", "--file", str(source))
    assert result.returncode == 0, result.stderr
    assert "accepted 4  duplicates 0  rejected 0" in result.stdout
    assert not (tmp_path / "in.csv.rejects.jsonl").exists()
    no_msgid = BackfillRecord.parse({**rows[3], "msgid": None})
    assert r.get(keys.dedupe(no_msgid.fingerprint()))


def test_stdin_and_explicit_rejects_path(
    tmp_path: Path, settings_env: dict[str, str], r: redis.Redis
) -> None:
    rejects = tmp_path / "bad.jsonl"
    body = json.dumps(row()) + "\n" + json.dumps(row(time="soon")) + "\n"
    result = subprocess.run(
        [sys.executable, "-m", "worker", "enqueue", "--file", "-", "--rejects", str(rejects)],
        input=body,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "accepted 1  duplicates 0  rejected 1" in result.stdout
    assert json.loads(rejects.read_text())["line"] == 2


def test_file_and_fields_together_is_a_usage_error(
    tmp_path: Path, settings_env: dict[str, str], r: redis.Redis
) -> None:
    before = snapshot(r)
    source = tmp_path / "x.jsonl"
    source.write_text(json.dumps(row()) + "\n")
    result = backfill("enqueue", "--file", str(source), "--app-id", "a")
    assert result.returncode == 2
    assert snapshot(r) == before
    assert backfill("enqueue", "--file", str(tmp_path / "missing.csv")).returncode == 2
