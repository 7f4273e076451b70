"""Bulk enqueue from a file: JSON lines or CSV with a header, validated row by row.

Good rows go to Redis in pipelined batches (one Lua call per row, one round trip per
batch); the workers' dispatchers publish them. Rejected rows are written, with their
line number and reason, to a rejects file. A batch that fails midway is retried whole:
enqueue is idempotent, so rows that did get in come back as duplicates, never twice.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis
import structlog

from worker.errors import InvalidRecord
from worker.record import BackfillRecord
from worker.store import Store

log = structlog.get_logger("worker.bulk")
BATCH = 1000
_RETRIES = 3


@dataclass
class BulkResult:
    """What a bulk enqueue came to."""

    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    rows: int = 0
    seconds: float = 0.0
    rejects_path: Path | None = None
    delivery_ids: list[str] = field(default_factory=list)


def read_rows(stream: IO[str], fmt: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, row) pairs; a row is a dict, or an InvalidRecord for a malformed line."""
    first = stream.readline()
    lines = itertools.chain([first], stream)
    fmt = fmt or ("jsonl" if first.lstrip().startswith("{") else "csv")
    if fmt == "csv":
        reader = csv.DictReader(lines)
        for row in reader:
            yield reader.line_num, {k if k is not None else "extra": v for k, v in row.items()}
        return
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            yield number, InvalidRecord({"row": "not valid JSON"})
            continue
        yield (
            number,
            row if isinstance(row, dict) else InvalidRecord({"row": "expected a JSON object"}),
        )


def format_of(path: str) -> str | None:
    """The format a file name implies (None: look at the first line)."""
    suffix = Path(path).suffix.lower()
    return {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}.get(suffix)


def enqueue_rows(
    store: Store,
    rows: Iterable[tuple[int, Any]],
    rejects: IO[str],
    *,
    progress: Any = None,
    keep_ids: bool = False,
) -> BulkResult:
    """Validate and enqueue rows; write rejects as JSON lines; returns the counts."""
    result = BulkResult()
    started = time.perf_counter()
    batch: list[BackfillRecord] = []
    for number, row in rows:
        result.rows += 1
        try:
            if isinstance(row, InvalidRecord):
                raise row
            batch.append(BackfillRecord.parse(row))
        except InvalidRecord as exc:
            result.rejected += 1
            rejects.write(json.dumps({"line": number, "errors": exc.errors, "row": row_text(row)}))
            rejects.write("\n")
        if len(batch) >= BATCH:
            _flush(store, batch, result, keep_ids)
            if progress is not None:
                progress(result)
    _flush(store, batch, result, keep_ids)
    result.seconds = time.perf_counter() - started
    return result


def row_text(row: Any) -> Any:
    """The row as given, for the rejects file (JSON-safe)."""
    return None if isinstance(row, InvalidRecord) else row


def _flush(store: Store, batch: list[BackfillRecord], result: BulkResult, keep_ids: bool) -> None:
    if not batch:
        return
    for attempt in range(1, _RETRIES + 1):
        try:
            outcomes = store.enqueue_many(batch, source="bulk")
            break
        except (redis.ConnectionError, redis.TimeoutError):
            if attempt == _RETRIES:
                raise
            time.sleep(0.5 * attempt)
    created = sum(1 for _, c in outcomes if c)
    result.accepted += created
    result.duplicates += len(outcomes) - created
    if keep_ids:
        result.delivery_ids.extend(d for d, _ in outcomes)
    batch.clear()


def open_input(path: str) -> IO[str]:
    """The input file, or stdin for ``-`` (UTF-8, universal newlines for CSV)."""
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def rejects_path_for(path: str, explicit: str | None) -> Path:
    """Where rejected rows go: ``--rejects`` or ``<input>.rejects.jsonl`` beside the input."""
    if explicit:
        return Path(explicit)
    if path == "-":
        return Path("stdin.rejects.jsonl")
    return Path(path).with_name(Path(path).name + ".rejects.jsonl")
