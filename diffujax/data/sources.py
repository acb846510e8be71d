"""grain random-access sources: text files, jsonl, parquet, ArrayRecord, arrow, TFDS,
pretokenized.

Inputs are files, directories (every data file below them) or glob patterns, local or remote
(``gs://bucket/corpus/*.jsonl.zst``; see ``diffujax.data.files``). ``arrow`` reads Hugging Face
``datasets`` saved with ``save_to_disk`` (a ``Dataset`` or one split of a ``DatasetDict``) and
plain ``.arrow`` files.

Every source has ``__len__`` and ``__getitem__`` (what ``grain.MapDataset.source`` needs), pickles
without open handles (grain workers are spawned processes), and yields one *document* per index:
a ``str`` when it reads one text field, a ``dict[str, str]`` (e.g. ``{"prompt": ..., "answer":
...}`` for SFT) when it reads several.

Bad data is never dropped silently. Text and jsonl files are scanned once when the source is
built: empty files / blank lines are skipped and counted in ``source.report``; invalid UTF-8,
invalid JSON or a missing field raise ``DataError`` naming the file, the line and the byte offset
(``errors="skip"`` skips such documents instead, and counts and locates them in the report).
The other formats are read lazily: a bad record raises ``DataError`` naming file/record at read
time, or with ``errors="skip"`` becomes ``None``, which the pipeline drops and counts.

Text file modes (``TextSource(mode=...)``): ``"file"`` (default), one document per file (document
boundaries in text corpora are usually file boundaries: never split by accident); ``"paragraph"``,
documents separated by blank lines; ``"lines"``, one document per non-blank line.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import json
import logging
import os
import threading
from typing import Sequence

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffujax import paths
from diffujax.data.files import expand, has_suffix, local_files, readable

log = logging.getLogger(__name__)

_MAX_EXAMPLES = 5  # locations kept per skip reason
# The names of each format's files (compression suffixes aside): how a format is guessed, and
# which files of a directory a source of that format reads.
_SUFFIXES = {"jsonl": (".jsonl", ".ndjson", ".json"), "parquet": (".parquet", ".pq"),
             "array_record": (".array_record", ".arrayrecord"), "arrow": (".arrow",)}


class DataError(ValueError):
    """Input data that cannot be used; the message says where (file, line, byte offset, record)."""


class EncodingError(DataError):
    """Text that is not valid UTF-8."""


@dataclasses.dataclass
class SourceReport:
    """What a source read and what it skipped, with a few locations per reason."""

    name: str
    files: int = 0
    documents: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        locs = self.examples.setdefault(reason, [])
        if len(locs) < _MAX_EXAMPLES:
            locs.append(where)

    def summary(self) -> str:
        text = f"{self.name}: {self.documents} documents from {self.files} files"
        for reason, n in sorted(self.skipped.items()):
            text += f"; skipped {n} {reason} (e.g. {', '.join(self.examples[reason])})"
        return text


def _decode(data: bytes, path, base_offset: int, base_line: int) -> str:
    """UTF-8 decode, or a DataError naming the byte offset and line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = base_line + data.count(b"\n", 0, e.start)
        raise EncodingError(
            f"{path}: invalid UTF-8 at byte offset {base_offset + e.start} (line {line}): "
            f"{e.reason} (byte {data[e.start:e.start + 1]!r})"
        ) from None


# What a scan passes over without anything being wrong.
ORDINARY_SKIPS = frozenset({"empty files", "blank lines", "empty documents"})


class _Source:
    """Shared bits: error policy, the report, and the record fields a document is made of."""

    def __init__(self, name: str, errors: str, field: str | Sequence[str] | None = "text"):
        if errors not in ("strict", "skip"):
            raise ValueError(f"errors must be 'strict' or 'skip', got {errors!r}")
        self.errors = errors
        self.report = SourceReport(name)
        self.single = isinstance(field, str) or field is None
        self.fields = (field,) if self.single else tuple(field)

    def _fields(self, record, where: str):
        """The document in ``record``: its text field, or a dict of its text fields (bytes read
        as UTF-8); a ``DataError`` naming ``where`` when one is missing or not text."""
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        out = {}
        for name in self.fields:
            value = record.get(name)
            if isinstance(value, bytes):
                value = _decode(value, where if name is None else f"{where} field {name!r}", 0, 1)
            if not isinstance(value, str):
                got = "missing" if name not in record else f"a {type(value).__name__}"
                raise DataError(f"{where}: field {name!r} is {got}, expected a string (fields"
                                f" present: {sorted(record)})")
            out[name] = value
        return out[self.fields[0]] if self.single else out

    def _bad(self, reason: str, err: DataError, where: str):
        """Raise (strict) or record and return None (skip)."""
        if self.errors == "strict":
            raise err
        self.report.skip(reason, where)
        return None

    def _list(self, paths_, fmt: str | None = None) -> list[str]:
        """The files of ``paths_``; in directories, only the ``fmt`` files (others are counted
        in the report)."""
        found, ignored = expand(paths_, has_suffix(*_SUFFIXES[fmt]) if fmt else None)
        for path in ignored:
            self.report.skip("files of another format", path)
        self.report.files = len(found)
        return [os.fspath(p) for p in found]

    def _finish_scan(self):
        # Empty files and blank lines are ordinary (an empty __init__.py): said in the report,
        # which the run prints. Skipped bad data, or files passed over, warrant a warning.
        worth_a_warning = set(self.report.skipped) - ORDINARY_SKIPS
        (log.warning if worth_a_warning else log.debug)("%s", self.report.summary())
        if self.report.documents == 0:
            raise DataError(f"no documents: {self.report.summary()}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.report.name}, {len(self)} documents)"


class _IndexedFiles(_Source):
    """A source over byte ranges of files, found by a scan at construction. ``paths`` name the
    files (in messages); ``_data`` is what is read (a compressed file's decompressed copy)."""

    fmt: str | None = None  # in directories, read only the files of this format

    def __init__(self, inputs, errors: str, name: str, field="text"):
        super().__init__(name, errors, field)
        self.paths = self._list(inputs, self.fmt)
        self._data = [readable(p) for p in self.paths]
        rows = [(i, *doc) for i, path in enumerate(self.paths)
                for doc in self._scan(path, self._data[i])]
        self._index = np.asarray(rows, np.int64).reshape(-1, 4)  # file, start, end, first line
        self.report.documents = len(self._index)
        self._finish_scan()

    def __len__(self) -> int:
        return len(self._index)

    def _read(self, index: int) -> tuple[str, str, int]:
        f, start, end, line = map(int, self._index[int(index)])
        data = paths.read_range(self._data[f], start, end - start)
        return data.decode("utf-8"), self.paths[f], line  # validated by the scan

    def _scan(self, path: str, data: str):
        """``(start, end, first line)`` of each document of the file named ``path``, read from
        ``data`` line by line, so a huge file is never held in memory; each line is checked
        (``_check``: UTF-8 per line, as a multi-byte character never spans a newline, gives
        exact offsets). ``mode`` draws the boundaries (module doc)."""
        doc, n = None, 0  # doc: [start offset, end offset, first line, first skip or None]
        with paths.resolve(data).open("rb") as f:
            for offset, n, line in _lines_with_offsets(f):
                blank = not line.strip()
                if doc is not None and (self.mode == "lines" or blank and self.mode != "file"):
                    yield from self._emit(path, doc)
                    doc = None
                if blank:  # file mode: inner blank lines belong to the document
                    if self.mode == "lines":
                        self.report.skip("blank lines", f"{path}:{n}")
                    continue
                reason = self._check(line, path, offset, n)
                skip = None if reason is None else (reason, f"{path}:{n}")
                if doc is None:
                    doc = [offset, offset + len(line), n, skip]
                else:
                    doc[1], doc[3] = offset + len(line), doc[3] or skip
        if doc is not None:
            yield from self._emit(path, doc)
        elif n == 0 or self.mode == "file":
            self.report.skip("empty files", path)

    def _emit(self, path, doc):
        start, end, n, skip = doc
        if skip is None:
            yield start, end, n
        else:
            self.report.skip(*skip)

    def _reject(self, reason: str, err: DataError) -> str:
        """Raise ``err`` (strict), or skip the document for ``reason``."""
        if self.errors == "strict":
            raise err
        return reason


def _lines_with_offsets(f):
    """(byte offset, 1-based line number, line bytes without the newline)."""
    offset = 0
    for n, raw in enumerate(f, 1):
        yield offset, n, raw.rstrip(b"\r\n")
        offset += len(raw)


class TextSource(_IndexedFiles):
    """Plain UTF-8 text files; ``mode``: ``"file"``, ``"paragraph"`` or ``"lines"`` (module doc)."""

    def __init__(self, paths, mode: str = "file", errors: str = "strict"):
        if mode not in ("file", "paragraph", "lines"):
            raise ValueError(f"mode must be 'file', 'paragraph' or 'lines', got {mode!r}")
        self.mode = mode
        super().__init__(paths, errors, name=f"text[{mode}]")

    def __getitem__(self, index) -> str:
        return self._read(index)[0]

    def _check(self, line, path, offset, n) -> str | None:
        try:
            _decode(line, path, offset, n)
        except EncodingError as e:
            return self._reject("non-UTF-8 documents", e)
        return None


class JsonlSource(_IndexedFiles):
    """JSON lines. ``field="text"`` yields that string; ``field=("prompt", "answer")`` yields a
    dict of those strings. Every line is parsed once at construction to find bad records early."""

    fmt, mode = "jsonl", "lines"  # one document per line

    def __init__(self, paths, field: str | Sequence[str] = "text", errors: str = "strict"):
        name = f"jsonl[{field if isinstance(field, str) else ','.join(field)}]"
        super().__init__(paths, errors, name, field)

    def __getitem__(self, index):
        text, path, line = self._read(index)
        return self._fields(json.loads(text), f"{path}:{line}")

    def _check(self, line, path, offset, n) -> str | None:
        where = f"{path}:{n}"
        try:
            doc = self._fields(json.loads(_decode(line, path, offset, n)), where)
        except json.JSONDecodeError as e:
            return self._reject("invalid records", DataError(f"{where}: invalid JSON: {e}"))
        except DataError as e:
            bad_text = isinstance(e, EncodingError)
            return self._reject("non-UTF-8 lines" if bad_text else "invalid records", e)
        if not any(v.strip() for v in ([doc] if self.single else doc.values())):
            return "empty documents"
        return None


class _LazyRecords(_Source):
    """Record sources read lazily (parquet, ArrayRecord, TFDS, arrow): a record's decoding into a
    document, and the index of those made of parts (files, row groups)."""

    def __len__(self) -> int:
        return self.report.documents

    def _count_parts(self, counts: list[int]) -> None:
        """Index the parts, which hold ``counts`` records in order; the scan is done."""
        self._ends = np.cumsum(counts, dtype=np.int64).tolist()
        self.report.documents = self._ends[-1] if self._ends else 0
        self._finish_scan()

    def _locate(self, index: int) -> tuple[int, int]:
        """``(part, row in it)`` of record ``index``."""
        part = bisect.bisect_right(self._ends, index)
        return part, index - (self._ends[part - 1] if part else 0)

    def _document(self, record, where: str):
        """The document of ``record``; a bad one raises or, with ``errors="skip"``, is None."""
        try:
            return self._fields(record, where)
        except DataError as e:
            return self._bad("bad records", e, where)


class _TableParts(_LazyRecords):
    """Columns read a part at a time (``_read_part``: a parquet row group, an arrow file),
    ``_CACHE`` decoded parts kept per process (None: all)."""

    _CACHE: int | None = None

    def _start_cache(self):
        self._cache: dict = {}
        self._lock = threading.Lock()  # grain reads with several threads

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _part(self, g: int):
        with self._lock:
            table = self._cache.get(g)
            if table is None:
                table = self._read_part(g)
                if self._CACHE is not None and len(self._cache) >= self._CACHE:
                    self._cache.pop(next(iter(self._cache)))  # oldest first
                self._cache[g] = table
            return table

    def __getitem__(self, index):
        g, row = self._locate(int(index))
        table = self._part(g)
        record = {c: table.column(c)[row].as_py() for c in self.fields}
        return self._document(record, f"{self._part_name(g)} row {row}")


class ParquetSource(_TableParts):
    """Parquet files, a text ``column`` (or several, giving dicts). Reads one row group per
    access and keeps a few decoded row groups per process; shuffled reads of a large parquet
    corpus are slow, pre-tokenise it instead (``diffujax.data.pretokenize``)."""

    _CACHE = 4

    def __init__(self, inputs, column: str | Sequence[str] = "text", errors: str = "strict"):
        super().__init__(f"parquet[{column}]", errors, column)
        self.paths = self._list(inputs, "parquet")
        self._groups: list[tuple[int, int]] = []  # (file index, row group)
        counts = []
        for i, path in enumerate(self.paths):
            try:
                with paths.resolve(path).open("rb") as f:
                    meta = pq.ParquetFile(f).metadata
            except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
                raise DataError(f"{path}: not a readable parquet file ({e})") from None
            names = meta.schema.names
            missing = [c for c in self.fields if c not in names]
            if missing:
                raise DataError(f"{path}: no column {missing} (columns: {names})")
            if meta.num_rows == 0:
                self.report.skip("empty files", path)
            for g in range(meta.num_row_groups):
                if meta.row_group(g).num_rows:
                    self._groups.append((i, g))
                    counts.append(meta.row_group(g).num_rows)
        self._start_cache()
        self._count_parts(counts)

    def _read_part(self, g: int):
        fi, rg = self._groups[g]
        with paths.resolve(self.paths[fi]).open("rb") as f:
            return pq.ParquetFile(f).read_row_group(rg, columns=list(self.fields))

    def _part_name(self, g: int) -> str:
        fi, rg = self._groups[g]
        return f"{self.paths[fi]} row group {rg}"


class ArrowSource(_TableParts):
    """Arrow IPC files (stream or file format), read through memory maps: a Hugging Face
    ``datasets`` directory saved with ``save_to_disk`` (``split`` picks one of a ``DatasetDict``)
    or ``.arrow`` files. ``field`` names the text column (several give dicts)."""

    def __init__(self, inputs, field: str | Sequence[str] = "text", split: str = "train",
                 errors: str = "strict"):
        super().__init__(f"arrow[{field}]", errors, field)
        self.paths = []
        for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
            self.paths += self._files(item, split)
        self.report.files = len(self.paths)
        self._local = local_files(self.paths)
        self._start_cache()
        counts = []
        for f, path in enumerate(self.paths):
            table = self._part(f)
            missing = [c for c in self.fields if c not in table.schema.names]
            if missing:
                raise DataError(f"{path}: no column {missing} (columns: {table.schema.names})")
            counts.append(table.num_rows)
            if not table.num_rows:
                self.report.skip("empty files", path)
        self._count_parts(counts)

    def _files(self, item, split: str) -> list[str]:
        """The arrow files of one input, in the order ``datasets`` records them."""
        root = paths.resolve(item)
        if (root / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
            splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
            if split not in splits:
                raise DataError(f"{root}: no split {split!r} (splits: {splits})")
            root = root / split
        if (root / "state.json").is_file():  # Dataset.save_to_disk
            state = json.loads((root / "state.json").read_text())
            names = [d["filename"] for d in state.get("_data_files", [])]
            if names:
                return [os.fspath(root / n) for n in names]
        return self._list([os.fspath(root)], "arrow")

    def _read_part(self, f: int):
        source = pa.memory_map(self._local[f])
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:  # datasets writes the stream format
            source.seek(0)
            try:
                return pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid as e:
                raise DataError(f"{self.paths[f]}: not an arrow file ({e})") from None

    def _part_name(self, f: int) -> str:
        return self.paths[f]


class ArrayRecordSource(_LazyRecords):
    """ArrayRecord files whose records are UTF-8 text (``field=None``) or JSON objects (``field``
    names the text field, or several fields for dicts)."""

    def __init__(self, paths, field: str | Sequence[str] | None = None, errors: str = "strict"):
        # array_record is a Linux-only dependency (pyproject marker): imported where it is read
        from array_record.python.array_record_module import ArrayRecordReader

        super().__init__(f"array_record[{field or 'text'}]", errors, field)
        self.paths = self._list(paths, "array_record")
        local = local_files(self.paths)  # the reader opens local files only
        counts = []
        for path, name in zip(local, self.paths):
            reader = ArrayRecordReader(path)
            counts.append(reader.num_records())
            reader.close()
            if counts[-1] == 0:
                self.report.skip("empty files", name)
        self._count_parts(counts)
        self._records = grain.sources.ArrayRecordDataSource(local)

    def __getitem__(self, index):
        f, row = self._locate(int(index))
        where = f"{self.paths[f]} record {row}"
        raw = self._records[int(index)]
        if self.fields == (None,):
            return self._document({None: raw}, where)
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._bad("bad records", DataError(f"{where}: bad JSON record: {e}"), where)
        return self._document(record, where)


class TfdsSource(_LazyRecords):
    """A prepared TFDS dataset in ArrayRecord format, read with ``tfds.data_source`` (random
    access, no TensorFlow needed). Never downloads: ``data_dir`` must hold the prepared data."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 field: str | Sequence[str] = "text", errors: str = "strict"):
        super().__init__(f"tfds[{name}/{split}]", errors, field)
        self.name, self.split, self.data_dir = name, split, data_dir
        self._ds = self._open()
        features = self._ds.dataset_info.features
        missing = [f for f in self.fields if f not in features.keys()]
        if missing:
            raise DataError(f"TFDS {name}/{split} has no feature {missing} (features:"
                            f" {list(features)})")
        self.report.documents = len(self._ds)
        self._finish_scan()

    def _open(self):
        import tensorflow_datasets as tfds  # heavy (seconds, may pull TensorFlow): only for tfds

        try:
            return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                    download=False)
        except Exception as e:  # tfds raises several types; keep its message and add ours
            raise DataError(
                f"cannot open TFDS dataset {self.name!r} split {self.split!r} in data_dir "
                f"{self.data_dir!r} (it must be prepared there in array_record format): {e}"
            ) from e

    # Pickle the arguments, not tfds' reader: a worker re-opens the prepared files itself
    # (the builder class that wrote them need not be importable there).
    def __getstate__(self):
        return {**self.__dict__, "_ds": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._ds = self._open()

    def __getitem__(self, index):
        index = int(index)
        return self._document(self._ds[index], f"{self.report.name} example {index}")


# ``diffujax.data.pretokenize`` writes this format; PretokenizedSource reads it.
PRETOKENIZED_FORMAT = "diffujax-pretokenized"
PRETOKENIZED_VERSION = 1


class PretokenizedSource:
    """Reads a ``pretokenize`` output directory: a grain source of int32 token arrays (blocks of
    ``seq_len``, or documents), with ``layout``, ``seq_len`` and ``special`` from its metadata."""

    def __init__(self, directory):
        self.directory = paths.resolve(directory)
        meta_path = self.directory / "metadata.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: not a pretokenize output directory "
                                    "(or the run did not finish)")
        self.meta = json.loads(meta_path.read_text())
        if (self.meta.get("format"), self.meta.get("version")) != (PRETOKENIZED_FORMAT,
                                                                  PRETOKENIZED_VERSION):
            raise DataError(f"{meta_path}: unknown format {self.meta.get('format')!r} "
                            f"version {self.meta.get('version')!r}")
        shards = [self.directory / s for s in self.meta["shards"]]
        missing = [os.fspath(p) for p in shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"pretokenized shards missing: {missing}")
        self.layout = self.meta["layout"]
        self.seq_len = self.meta["seq_len"]
        self.special = self.meta["special"]
        self.vocab_size = self.meta["tokenizer"]["vocab_size"]
        self._dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.report = SourceReport(f"pretokenized[{self.directory}]", files=len(shards),
                                   documents=self.meta["counts"]["records"])
        # The ArrayRecord reader opens local files: shards in a bucket are copied to the cache.
        self._records = grain.sources.ArrayRecordDataSource(local_files(shards))
        if len(self._records) != self.meta["counts"]["records"]:
            raise DataError(f"{self.directory}: {len(self._records)} records on disk, metadata "
                            f"says {self.meta['counts']['records']}")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index) -> np.ndarray:
        ids = np.frombuffer(self._records[int(index)], self._dtype).astype(np.int32)
        if self.layout == "blocks" and ids.size != self.seq_len:
            raise DataError(f"{self.directory} record {int(index)}: {ids.size} tokens, "
                            f"expected {self.seq_len}")
        return ids

    def __repr__(self) -> str:
        return f"PretokenizedSource({str(self.directory)!r}, {self.layout}, {len(self)} records)"


FORMATS = ("text", "jsonl", "parquet", "array_record", "arrow", "tfds", "pretokenized")


def _format_of(name: str) -> str:
    return next((fmt for fmt, sfx in _SUFFIXES.items() if has_suffix(*sfx)(name)), "text")


def guess_format(path: str) -> str:
    """``pretokenized`` for a pretokenize output dir, ``arrow`` for a ``datasets`` directory; else
    by suffix (of a file, or of the data files in a directory); plain text otherwise."""
    p = paths.resolve(path)
    if p.is_dir():
        if (p / "metadata.json").is_file():
            return "pretokenized"
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return "arrow"
        found = {_format_of(f.name) for f in expand([os.fspath(p)])[0]}
        typed = sorted(found - {"text"})
        if len(typed) > 1:
            raise DataError(f"{p} holds files of several formats ({typed}); name the files (a "
                            "glob) or set the source's format")
        return typed[0] if typed else "text"
    return _format_of(p.name)


def make_source(
    fmt: str,
    inputs,
    *,
    field: str | Sequence[str] | None = "text",
    mode: str = "file",
    errors: str = "strict",
    split: str = "train",
    data_dir: str | None = None,
):
    """Build a source from a format name (``FORMATS`` or ``"auto"``) and inputs. For ``tfds``,
    ``inputs`` is the dataset name (``name`` or ``name:split``)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(x) for x in inputs]
    if fmt == "auto":
        fmt = guess_format(inputs[0])
    if fmt == "text":
        return TextSource(inputs, mode=mode, errors=errors)
    if fmt == "jsonl":
        return JsonlSource(inputs, field=field or "text", errors=errors)
    if fmt == "parquet":
        return ParquetSource(inputs, column=field or "text", errors=errors)
    if fmt == "array_record":
        return ArrayRecordSource(inputs, field=field, errors=errors)
    if fmt == "arrow":
        return ArrowSource(inputs, field=field or "text", split=split, errors=errors)
    if fmt == "tfds":
        name, _, sp = inputs[0].partition(":")
        return TfdsSource(name, sp or split, data_dir=data_dir, field=field or "text",
                          errors=errors)
    if fmt == "pretokenized":
        return PretokenizedSource(inputs[0])
    raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS} or 'auto'")
