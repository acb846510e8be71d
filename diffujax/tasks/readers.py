"""Task files in the formats the tasks are distributed in, read as plain records.

Lambada: the plain-text test file (one passage a line). HellaSwag, WinoGrande, SIQA, PIQA,
HumanEval-infilling, GSM8K: JSON lines as the Hugging Face datasets / the benchmarks' own
releases export them (``.gz`` is read too; a single JSON array is accepted as well, the layout
of the reference's ``gsm_test.json``). ROCStories: the cloze-test CSV with its header row.
Every problem is reported as one line naming the file, the line and what is wrong.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import pathlib
import zlib


class TaskDataError(ValueError):
    """A task file that cannot be read as its task's format."""


def _open_text(path: str):
    p = pathlib.Path(path)
    if not p.is_file():
        raise TaskDataError(f"{path}: no such task file")
    raw = p.read_bytes()
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise TaskDataError(f"{path}: not a complete gzip file (truncated or damaged: {e})"
                                ) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_lines(path: str) -> list[str]:
    """Non-empty lines, stripped (Lambada's plain-text format)."""
    lines = [s for s in (line.strip() for line in _open_text(path).splitlines()) if s]
    if not lines:
        raise TaskDataError(f"{path}: no non-empty lines")
    return lines


def read_records(path: str) -> list[dict]:
    """JSON lines (or one JSON array of objects)."""
    text = _open_text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}: not a JSON array ({e.msg} at line {e.lineno})") from None
        where = [f"{path}: item {i}" for i in range(len(records))]
    else:
        records, where = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{number}: not JSON ({e.msg})") from None
            where.append(f"{path}:{number}")
    for record, place in zip(records, where):
        if not isinstance(record, dict):
            raise TaskDataError(f"{place}: expected a JSON object, got {type(record).__name__}")
    if not records:
        raise TaskDataError(f"{path}: no records")
    return [dict(r, _where=w) for r, w in zip(records, where)]


def read_csv(path: str) -> list[dict]:
    """CSV with a header row, as dicts (ROCStories)."""
    reader = csv.DictReader(io.StringIO(_open_text(path)))
    rows = [dict(row, _where=f"{path}:{n}") for n, row in enumerate(reader, start=2)]
    if not rows:
        raise TaskDataError(f"{path}: no data rows under the header")
    return rows


def nonempty(record: dict, name: str, what: str) -> str:
    """``record[name]``, a string with more than white space (``what`` says why)."""
    value = field(record, name)
    if not value.strip():
        raise TaskDataError(f"{record.get('_where', '?')}: field {name!r} is empty: {what}")
    return value


def field(record: dict, name: str, kind=str):
    """``record[name]`` checked to be of ``kind`` (one clear line otherwise)."""
    if name not in record:
        keys = sorted(k for k in record if k != "_where")
        raise TaskDataError(f"{record.get('_where', '?')}: missing field {name!r} (has {keys})")
    value = record[name]
    if kind is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TaskDataError(f"{record.get('_where', '?')}: field {name!r} must be"
                            f" {kind.__name__}, got {value!r:.60}")
    return value
