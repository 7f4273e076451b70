"""``backfill enqueue --file``: JSON lines and CSV, good, bad and duplicate rows."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import unique, wait_for
from tests.helpers import backfill, snapshot
from worker.enqueue.bulk import UNCLOSED, UnreadableInput, count_lines, read_rows
from worker.enqueue.record import FIELDS, BackfillRecord
from worker.local.processes import WorkerProcess
from worker.operate.errors import InvalidRecord
from worker.runtime import get_store
from worker.state.delivery import delivery_id


def row(**changes: str) -> dict[str, str]:
    return {"app_id": "bulk", "msgid": unique(), "number": "8613512345678",
            "time": "1681184764000", **changes}  # fmt: skip


def id_of(fields: dict[str, str]) -> str:
    """The delivery_id the row's record gets (derived from the record itself)."""
    return delivery_id(BackfillRecord.parse({**fields, "msgid": fields.get("msgid") or None}))


def stored(fields: dict[str, str]) -> bool:
    """Whether the row's record was enqueued (pending, or already delivered or dead)."""
    return get_store().states([id_of(fields)])[0] is not None


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
    ids = [id_of(x) for x in good]
    assert all(store.states(ids))
    wait_for(lambda: store.states(ids) == ["delivered"] * 5, 30)


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
    assert all(stored(x) for x in rows)  # the one without a msgid too


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


def test_binary_file_is_a_one_line_error_naming_the_line_and_enqueues_nothing(
    tmp_path: Path, settings_env: dict[str, str], r: redis.Redis
) -> None:
    before = snapshot(r)
    source = tmp_path / "in.jsonl"
    good = (json.dumps(row()) + "\n").encode()
    source.write_bytes(good + good.replace(b"bulk", b"bulk2") + b'{"app_id": "\xff\xfe"}\n' + good)
    result = backfill("enqueue", "--file", str(source))
    assert result.returncode == 2, result.stderr
    assert "error: --file: line 3 is not valid UTF-8" in result.stderr
    assert "nothing was enqueued" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "in.jsonl.rejects.jsonl").exists()
    assert snapshot(r) == before


def test_random_bytes_file_is_refused_without_a_traceback(
    tmp_path: Path, settings_env: dict[str, str], r: redis.Redis
) -> None:
    source = tmp_path / "blob.bin"
    source.write_bytes(bytes(range(256)) * 64)  # \x80 comes on line 2, after the first \n
    result = backfill("enqueue", "--file", str(source))
    assert result.returncode == 2
    assert "error: --file: line 2 is not valid UTF-8" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.rejects.jsonl"))


def test_bad_utf8_on_stdin_keeps_the_rows_before_it_and_says_so(
    tmp_path: Path, settings_env: dict[str, str], r: redis.Redis
) -> None:
    first, after = row(), row()
    body = (json.dumps(first) + "\n").encode() + b"\xc3\x28\n" + (json.dumps(after) + "\n").encode()
    rejects = tmp_path / "stdin.rejects.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "worker", "enqueue", "--file", "-", "--rejects", str(rejects)],
        input=body,
        env=dict(os.environ),
        capture_output=True,
        timeout=60,
        check=False,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "error: --file: line 2 is not valid UTF-8" in stderr
    assert "idempotent" in stderr
    assert "Traceback" not in stderr
    assert b"accepted 1  duplicates 0  rejected 0" in result.stdout
    assert stored(first)
    assert not stored(after)
    assert not rejects.exists()


def test_byte_order_mark_is_not_part_of_the_first_column(
    tmp_path: Path, settings_env: dict[str, str], r: redis.Redis
) -> None:
    csv_row, json_row = row(), row()
    csv_file = tmp_path / "excel.csv"
    csv_file.write_bytes(
        b"\xef\xbb\xbfapp_id,msgid,number,time\r\n"
        + (",".join(csv_row[f] for f in FIELDS) + "\r\n").encode()
    )
    json_file = tmp_path / "export.txt"  # no telling suffix: the format is sniffed
    json_file.write_bytes(b"\xef\xbb\xbf" + json.dumps(json_row).encode() + b"\r\n")
    for source, record in ((csv_file, csv_row), (json_file, json_row)):
        result = backfill("enqueue", "--file", str(source))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "accepted 1  duplicates 0  rejected 0" in result.stdout
        assert stored(record)


def test_directory_missing_file_and_device_are_named(
    tmp_path: Path, settings_env: dict[str, str], r: redis.Redis
) -> None:
    cases = [
        (str(tmp_path), f"error: --file: {tmp_path} is a directory"),
        (str(tmp_path / "nope.csv"), f"error: --file: no such file: {tmp_path / 'nope.csv'}"),
        ("/dev/zero", "error: --file: /dev/zero is not a regular file or a pipe"),
    ]
    for path, message in cases:
        result = backfill("enqueue", "--file", path, "--rejects", str(tmp_path / "rej.jsonl"))
        assert result.returncode == 2, path
        assert message in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "rej.jsonl").exists()


def test_over_long_rows_are_rejected_and_their_copies_capped(
    tmp_path: Path, settings_env: dict[str, str], r: redis.Redis
) -> None:
    good = [row() for _ in range(3)]
    nested = '{"app_id": ' + "[" * 30_000 + "]" * 30_000 + "}"  # under 64 KiB, too deep
    lines = [
        json.dumps(good[0]),
        json.dumps(row(msgid="x" * (8 * 1024 * 1024))),  # line 2: 8 MiB
        json.dumps(good[1]),
        json.dumps(row(msgid="y" * 60_000)),  # line 4: fits, but a bad msgid
        nested,  # line 5
        '{"app_id": ' + "[" * 400 + "]" * 400 + "}",  # line 6: parses, not a string
        json.dumps(good[2]),
        json.dumps(row(app_id="\ud800")),  # line 8: a lone surrogate, as JSON may escape it
    ]
    source = tmp_path / "big.jsonl"
    source.write_text("\n".join(lines) + "\n")
    result = backfill("enqueue", "--file", str(source))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "accepted 3  duplicates 0  rejected 5" in result.stdout
    rejects_file = tmp_path / "big.jsonl.rejects.jsonl"
    assert rejects_file.stat().st_size < 8 * 1024
    rejects = [json.loads(x) for x in rejects_file.read_text().splitlines()]
    assert [x["line"] for x in rejects] == [2, 4, 5, 6, 8]
    assert rejects[0]["errors"] == {"row": "row longer than 65536 bytes"}
    assert "msgid" in rejects[1]["errors"]
    assert rejects[1]["row"].endswith("...")
    assert rejects[2]["errors"] == {"row": "JSON nested too deeply"}
    assert "app_id" in rejects[3]["errors"]
    assert rejects[4]["row"]["app_id"] == "\ud800"
    for record in good:
        assert stored(record)


def test_csv_row_over_the_cap_is_rejected_and_the_next_rows_read(
    tmp_path: Path, settings_env: dict[str, str], r: redis.Redis
) -> None:
    good = [row(), row()]
    fields = FIELDS
    source = tmp_path / "in.csv"
    source.write_text(
        ",".join(fields) + "\n"
        + ",".join(good[0][f] for f in fields) + "\n"
        + "bulk," + "z" * 70_000 + ",8613512345678,1681184764000\n"  # line 3
        + ",".join(good[1][f] for f in fields) + "\n"
    )  # fmt: skip
    result = backfill("enqueue", "--file", str(source))
    assert result.returncode == 2, result.stderr
    assert "accepted 2  duplicates 0  rejected 1" in result.stdout
    rejects = json.loads((tmp_path / "in.csv.rejects.jsonl").read_text())
    assert rejects["line"] == 3
    assert rejects["errors"] == {"row": "row longer than 65536 bytes"}


def test_rejects_file_of_an_earlier_run_never_looks_current(
    tmp_path: Path, settings_env: dict[str, str], r: redis.Redis
) -> None:
    source = tmp_path / "in.jsonl"
    rejects = tmp_path / "in.jsonl.rejects.jsonl"
    rejects.write_text('{"line": 99, "errors": {"time": "old"}, "row": null}\n')
    source.write_text(json.dumps(row()) + "\n" + json.dumps(row(number="1")) + "\n")
    result = backfill("enqueue", "--file", str(source))
    assert result.returncode == 2
    assert [json.loads(x)["line"] for x in rejects.read_text().splitlines()] == [2]
    source.write_text(json.dumps(row()) + "\n")
    result = backfill("enqueue", "--file", str(source))
    assert result.returncode == 0, result.stderr
    assert f"removed the rejects file of an earlier run: {rejects}" in result.stderr
    assert not rejects.exists()


def test_rejects_path_that_cannot_be_written_or_is_the_input_is_refused_first(
    tmp_path: Path, settings_env: dict[str, str], r: redis.Redis
) -> None:
    before = snapshot(r)
    source = tmp_path / "in.jsonl"
    text = json.dumps(row()) + "\n" + json.dumps(row(number="1")) + "\n"
    source.write_text(text)
    for rejects in (str(tmp_path), str(tmp_path / "no" / "dir.jsonl"), str(source)):
        result = backfill("enqueue", "--file", str(source), "--rejects", rejects)
        assert result.returncode == 2, rejects
        assert "error: --rejects:" in result.stderr
    assert source.read_text() == text
    assert snapshot(r) == before


def rows_of(data: bytes, fmt: str | None = None) -> list[tuple[int, Any]]:
    return list(read_rows(io.BytesIO(data), fmt))


def test_csv_line_numbers_count_physical_lines_and_blank_lines() -> None:
    data = b'\napp_id,msgid,number,time\n\na,"two\nlines",8613512345678,1681184764000\nb,c\n'
    found = rows_of(data)
    assert [n for n, _ in found] == [4, 5, 6]
    assert isinstance(found[0][1], InvalidRecord)  # a field cannot hold a line break
    assert found[0][1].errors == {"row": f"not valid CSV: {UNCLOSED}"}
    assert found[1][1] == {"app_id": "lines\"", "msgid": "8613512345678", "number": "1681184764000",
                           "time": None}  # fmt: skip
    assert found[2][1] == {"app_id": "b", "msgid": "c", "number": None, "time": None}


def test_unclosed_csv_quote_rejects_its_line_alone() -> None:
    header = b"app_id,msgid,number,time\n"
    good = b"b,m,8613512345678,1681184764000\n"
    found = rows_of(header + b'a,"never closed\n' + b"x" * 1000 + b"\n" + good + b'c,"open')
    assert [n for n, _ in found] == [2, 3, 4, 5]
    assert isinstance(found[0][1], InvalidRecord)
    assert found[1][1]["app_id"] == "x" * 1000
    assert found[2][1]["app_id"] == "b"
    assert isinstance(found[3][1], InvalidRecord)  # the last line, without a line ending
    with pytest.raises(UnreadableInput, match="line 1: unreadable CSV header"):
        rows_of(b'app_id,"msgid,number,time\n' + good)


def test_csv_with_a_stray_quote_on_line_2_counts_every_line(
    tmp_path: Path, settings_env: dict[str, str], r: redis.Redis
) -> None:
    """The issue's file: 10,001 rows, an unclosed quote on line 2, the others read as rows."""
    rows = [row(app_id="strayq") for _ in range(10_001)]
    lines = [",".join(FIELDS)] + [",".join(x[f] for f in FIELDS) for x in rows]
    lines[1] = lines[1].replace(",", ',"', 1)  # line 2: strayq,"m-...,number,time
    source = tmp_path / "stray.csv"
    source.write_text("\n".join(lines) + "\n")
    result = backfill("enqueue", "--file", str(source), timeout=300)
    assert result.returncode == 2, result.stderr
    assert "accepted 10000  duplicates 0  rejected 1  (10001 rows" in result.stdout
    rejects = [
        json.loads(x) for x in (tmp_path / "stray.csv.rejects.jsonl").read_text().splitlines()
    ]
    assert [(x["line"], x["errors"]) for x in rejects] == [
        (2, {"row": f"not valid CSV: {UNCLOSED}"})
    ]
    assert not stored(rows[0])
    assert all(stored(x) for x in (rows[1], rows[2], rows[-1]))


def test_count_lines_finds_bad_bytes_across_chunk_boundaries() -> None:
    head = b"a" * ((1 << 20) - 1) + "\u00e9".encode()  # a two-byte character split by the chunk
    assert count_lines(io.BytesIO(head + b"\nok\nlast")) == 3
    with pytest.raises(UnreadableInput, match="line 3 is not valid UTF-8"):
        count_lines(io.BytesIO(head + b"\nok\n" + b"x" * (1 << 20) + b"\xff\n"))
    with pytest.raises(UnreadableInput, match="line 2 is not valid UTF-8"):
        count_lines(io.BytesIO(b"ok\n\xe2\x82"))  # cut off in the middle of a character
