"""Bulk enqueue from a file: JSON lines or CSV with a header, validated row by row.

Good rows go to Redis in batches of 1,000 (one Lua call each), in the bulk lane; the
workers' wakers wake drains for them. Rejected rows are written, with their
line number and reason, to a rejects file made on the first rejected row. A batch that
fails midway is retried whole: enqueue is idempotent, so rows that did get in come back
as duplicates, never twice.

Input is read as bytes and decoded line by line, so a line that is not UTF-8 is named,
and a line over ``MAX_ROW_BYTES`` is skipped in chunks, never held whole. Every record
is one physical line, CSV too: no field holds a line break, so a quote left open rejects
its own line alone and the next line is read as the next row. Each non-blank data line
is counted once, as accepted, a duplicate or rejected.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import os
import stat
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis
import structlog

from worker.enqueue.record import BackfillRecord
from worker.operate.errors import BackfillError, InvalidRecord, RedisFull
from worker.state.store import Store

log = structlog.get_logger("worker.bulk")
BATCH = 1000
MAX_ROW_BYTES = 64 * 1024  # a row is four short fields; anything this long is not one
MAX_REJECT_ROW_CHARS = 1024  # what of a rejected row is copied into the rejects file
_RETRIES = 3
_TOO_LONG = f"row longer than {MAX_ROW_BYTES} bytes"
UNCLOSED = "a quote opened on this line is not closed on it (a field cannot hold a line break)"
_NOTHING = " (the file is checked before its first row: nothing was enqueued)"


class UnreadableInput(BackfillError):
    """The input cannot be read as rows (missing, a directory, not UTF-8): exit 2."""


@dataclass
class BulkResult:
    """What a bulk enqueue came to; ``stopped`` says why it ended before the input did."""

    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    rows: int = 0
    seconds: float = 0.0
    stopped: str | None = None
    full: bool = False  # it stopped because Redis is full (a runtime failure, not bad input)
    delivery_ids: list[str] = field(default_factory=list)


class Rejects:
    """The rejects file, JSON lines of line, errors and row; created on the first one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._out: IO[str] | None = None

    def add(self, line: int, errors: Mapping[str, str], row: Any) -> None:
        """Write one rejected row (its copy capped at ``MAX_REJECT_ROW_CHARS``)."""
        if self._out is None:
            self._out = self.path.open("w", encoding="utf-8")
        entry = {"line": line, "errors": dict(errors), "row": row_text(row)}
        self._out.write(json.dumps(entry) + "\n")  # ASCII: a lone surrogate cannot break it
        self.count += 1

    def close(self) -> None:
        """Close the file if one was made."""
        if self._out is not None:
            self._out.close()

    def __enter__(self) -> Rejects:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def row_text(row: Any) -> Any:
    """The row as given, for the rejects file: as is when short, else its JSON cut short."""
    if isinstance(row, InvalidRecord):
        return None
    try:
        text = json.dumps(row)
    except (RecursionError, TypeError, ValueError):
        return None
    return row if len(text) <= MAX_REJECT_ROW_CHARS else text[:MAX_REJECT_ROW_CHARS] + "..."


class _Lines:
    """Numbered physical lines of a byte stream as text; an over-long line comes as None."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.number = 0
        self.size = 0  # bytes of the last line, without its line ending

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str | None:
        chunk = self._raw.readline(MAX_ROW_BYTES + 2)  # room for the \r\n
        if not chunk:
            raise StopIteration
        self.number += 1
        if self.number == 1:
            chunk = chunk.removeprefix(codecs.BOM_UTF8)
        self.size = len(chunk.rstrip(b"\r\n"))
        if self.size > MAX_ROW_BYTES:
            while chunk and not chunk.endswith(b"\n"):
                chunk = self._raw.readline(MAX_ROW_BYTES)
            return None
        try:
            return chunk.decode("utf-8")
        except UnicodeDecodeError:
            raise UnreadableInput(f"line {self.number} is not valid UTF-8") from None


def read_rows(raw: IO[bytes], fmt: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, row) pairs; a row is a dict, or an InvalidRecord for a malformed line.

    Raises UnreadableInput at a line that is not UTF-8 (rows before it were yielded).
    """
    lines = _Lines(raw)
    first = next(lines, "")
    if first == "":
        return
    fmt = fmt or ("jsonl" if first is None or first.lstrip().startswith("{") else "csv")
    if fmt == "csv":
        yield from _csv_rows(lines, first)
        return
    for text in itertools.chain([first], lines):  # lazy: lines.number is this line's
        if text is None:
            yield lines.number, InvalidRecord({"row": _TOO_LONG})
        elif text.strip():
            yield lines.number, _json_row(text)


def _json_row(text: str) -> dict[str, Any] | InvalidRecord:
    try:
        row = json.loads(text)
    except RecursionError:
        return InvalidRecord({"row": "JSON nested too deeply"})
    except ValueError:
        return InvalidRecord({"row": "not valid JSON"})
    return row if isinstance(row, dict) else InvalidRecord({"row": "expected a JSON object"})


def _csv_values(text: str) -> list[str]:
    """One physical line's CSV values; csv.Error when a quote opened in it is not closed.

    A field never holds a line break: the line is parsed alone, its line ending kept, so
    a quote left open runs into that ending (and no further), which names the line.
    """
    if not text.endswith("\n"):
        text += "\n"
    values = next(csv.reader([text]), [])
    if any("\n" in value or "\r" in value for value in values):
        raise csv.Error(UNCLOSED)
    return values


def _csv_rows(lines: _Lines, first: str | None) -> Iterator[tuple[int, Any]]:
    header: list[str] = []
    text = first
    while not header:  # blank lines before the header are skipped, as rows' are
        if text is None:
            raise UnreadableInput(f"line {lines.number}: unreadable CSV header: {_TOO_LONG}")
        try:
            header = _csv_values(text)
        except csv.Error as exc:
            raise UnreadableInput(f"line {lines.number}: unreadable CSV header: {exc}") from None
        if not header:
            text = next(lines, "")
            if text == "":
                return
    for text in lines:  # lazy: lines.number is this line's
        if text is None:
            yield lines.number, InvalidRecord({"row": _TOO_LONG})
            continue
        try:
            values = _csv_values(text)
        except csv.Error as exc:
            yield lines.number, InvalidRecord({"row": f"not valid CSV: {exc}"})
            continue
        if not values:  # a blank line, as csv.DictReader skips them
            continue
        row: dict[str, Any] = dict(zip(header, values, strict=False))
        row.update(dict.fromkeys(header[len(values) :]))  # short row: missing fields are None
        if len(values) > len(header):
            row["extra"] = values[len(header) :]
        yield lines.number, row


def format_of(path: str) -> str | None:
    """The format a file name implies (None: look at the first line)."""
    suffix = Path(path).suffix.lower()
    return {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}.get(suffix)


def enqueue_rows(
    store: Store,
    rows: Iterable[tuple[int, Any]],
    rejects: Rejects,
    *,
    progress: Any = None,
    keep_ids: bool = False,
) -> BulkResult:
    """Validate and enqueue rows, rejected ones to ``rejects``; returns the counts.

    Input that turns unreadable midway ends the run with ``stopped`` set: the good rows
    before it are enqueued (they stay; enqueue is idempotent, so a rerun is safe).
    """
    result = BulkResult()
    started = time.perf_counter()
    batch: list[BackfillRecord] = []
    try:
        for number, row in rows:
            result.rows += 1
            try:
                if isinstance(row, InvalidRecord):
                    raise row
                batch.append(BackfillRecord.parse(row))
            except InvalidRecord as exc:
                result.rejected += 1
                rejects.add(number, exc.errors, row)
            if len(batch) >= BATCH:
                _flush(store, batch, result, keep_ids)
                if progress is not None:
                    progress(result)
        _flush(store, batch, result, keep_ids)
    except UnreadableInput as exc:
        result.stopped = str(exc)
        _flush_unless_full(store, batch, result, keep_ids)
    except RedisFull as exc:
        # the batch that met it was refused whole: the rows before it are in, no more
        got_in = result.accepted + result.duplicates
        result.stopped, result.full = f"{exc}; {got_in} rows got in before it stopped", True
    result.seconds = time.perf_counter() - started
    return result


def _flush_unless_full(
    store: Store, batch: list[BackfillRecord], result: BulkResult, keep_ids: bool
) -> None:
    try:
        _flush(store, batch, result, keep_ids)
    except RedisFull as exc:
        got_in = result.accepted + result.duplicates
        result.stopped = f"{result.stopped}; then {exc}; {got_in} rows got in"
        result.full = True


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


def open_input(path: str) -> tuple[IO[bytes], bool]:
    """The input as bytes (stdin for ``-``) and whether it can be read twice (a file).

    Raises UnreadableInput naming a missing file, a directory or anything but a file or
    a pipe (``/dev/zero`` would never end).
    """
    if path == "-":
        return sys.stdin.buffer, False
    try:
        raw = open(path, "rb")  # noqa: SIM115 - returned open; the caller closes it
    except FileNotFoundError:
        raise UnreadableInput(f"no such file: {path}") from None
    except IsADirectoryError:
        raise UnreadableInput(f"{path} is a directory") from None
    except OSError as exc:
        raise UnreadableInput(f"cannot read {path}: {exc.strerror}") from None
    mode = os.fstat(raw.fileno()).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raw.close()
        raise UnreadableInput(f"{path} is not a regular file or a pipe")
    return raw, stat.S_ISREG(mode)


def count_lines(raw: IO[bytes]) -> int:
    """Lines in a file, checking it is UTF-8 on the way (UnreadableInput names the line).

    One pass in 1 MiB chunks, so a file is checked before any of its rows is enqueued.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines, last = 0, b"\n"
    while chunk := raw.read(1 << 20):
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            # exc.object is this chunk behind at most 3 held-back bytes, none of them \n
            line = lines + exc.object[: exc.start].count(b"\n") + 1
            raise UnreadableInput(f"line {line} is not valid UTF-8{_NOTHING}") from None
        lines += chunk.count(b"\n")
        last = chunk[-1:]
    ends_open = int(last != b"\n")  # a last line without a line ending still counts
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UnreadableInput(f"line {lines + ends_open} is not valid UTF-8{_NOTHING}") from None
    return lines + ends_open


def rejects_path_for(path: str, explicit: str | None) -> Path:
    """Where rejected rows go: ``--rejects`` or ``<input>.rejects.jsonl`` beside the input."""
    if explicit:
        return Path(explicit)
    if path == "-":
        return Path("stdin.rejects.jsonl")
    return Path(path).with_name(Path(path).name + ".rejects.jsonl")
