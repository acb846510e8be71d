"""Finding and opening data files, local or remote (``gs://...``), plain or compressed.

- ``expand``: files, directories (every data file below, hidden and ``_``-prefixed names such as
  Spark's ``_SUCCESS`` left out) and glob patterns, in a stable order.
- Compressed files (``.gz``, ``.zst``, ``.bz2``, ``.xz``) cannot be read at a byte offset, and the
  text sources index documents by offset: they are decompressed once into the cache
  (``paths.cache_root()/decompressed``, keyed by ``paths.fingerprint``) and read
  from there.
- Byte ranges of plain files are read with ``paths.read_range``: a remote file costs one ranged
  request per read and no open handle (nothing to close, nothing to pickle for grain workers).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import pathlib
import shutil
from typing import Callable, Sequence

import zstandard
from etils import epath

from diffujax import paths


def _zstd(raw):  # every frame: ``zstd`` writes several for concatenated inputs
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)


# Readers of a compressed stream, by suffix.
_DECOMPRESSORS = {".gz": lambda raw: gzip.GzipFile(fileobj=raw), ".bz2": bz2.BZ2File,
                  ".xz": lzma.LZMAFile, ".zst": _zstd, ".zstd": _zstd}
COMPRESSED = tuple(_DECOMPRESSORS)


def compression(path) -> str | None:
    name = os.fspath(path).lower()
    return next((s for s in COMPRESSED if name.endswith(s)), None)


def strip_compression(name: str) -> str:
    suffix = compression(name)
    return name[: -len(suffix)] if suffix else name


def expand(inputs, keep: Callable[[str], bool] | None = None
           ) -> tuple[list[epath.Path], list[str]]:
    """``(files, ignored)`` named by ``inputs`` (a path or a list: files, directories, globs).

    Files and glob matches are taken as given; in a directory, files for which ``keep(name)`` is
    false (another format) are returned in ``ignored``. Anything that names nothing raises
    ``FileNotFoundError``."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[epath.Path] = []
    ignored: list[str] = []
    for item in inputs:
        text = os.fspath(item)
        if any(c in text for c in "*?["):
            matches = paths.glob(text)
            if not matches:
                raise FileNotFoundError(f"no file matches the pattern {text!r}")
            files.extend(matches)
            continue
        path = paths.resolve(text)
        if path.is_dir():
            found = []
            for p in paths.list_files(path):
                relative = os.fspath(p)[len(os.fspath(path)):].lstrip("/")
                if any(part.startswith((".", "_")) for part in relative.split("/")):
                    continue  # hidden, or Spark's _SUCCESS and the like
                (found if keep is None or keep(p.name) else ignored).append(p)
            if not found:
                raise FileNotFoundError(f"directory {path} contains no data files"
                                        + (f" (ignored: {[os.fspath(p) for p in ignored[:5]]})"
                                           if ignored else ""))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input file {text} does not exist")
    return files, [os.fspath(p) for p in ignored]


def has_suffix(*suffixes: str) -> Callable[[str], bool]:
    """``keep`` for ``expand``: the name (compression suffix removed) ends with one of these."""
    return lambda name: strip_compression(name.lower()).endswith(suffixes)


# -- compressed files -------------------------------------------------------------------------------


def decompressed(path) -> pathlib.Path:
    """A local, decompressed copy of the compressed file ``path`` (made once, then reused)."""
    path = paths.resolve(path)
    key = hashlib.sha256(paths.fingerprint(path).encode()).hexdigest()[:20]
    local = paths.cache_root() / "decompressed" / key / strip_compression(path.name)
    if local.is_file():
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    suffix = compression(path.name)
    try:
        with paths.writing_file(local) as tmp, path.open("rb") as raw, \
                _DECOMPRESSORS[suffix](raw) as stream, open(tmp, "wb") as out:
            shutil.copyfileobj(stream, out, 8 << 20)
    except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as e:
        raise OSError(f"{path}: cannot decompress ({suffix[1:]}): {e}") from None
    return local


def readable(path) -> str:
    """What to open for byte-range reads of the data in ``path``: the path itself, or the
    decompressed copy of a compressed file."""
    return os.fspath(decompressed(path)) if compression(path) else os.fspath(paths.resolve(path))


def local_files(files: Sequence) -> list[str]:
    """Local names for ``files`` (remote ones copied into the cache): for readers that only open
    local files (ArrayRecord, arrow memory maps)."""
    return [os.fspath(paths.local_copy(f)) for f in files]
