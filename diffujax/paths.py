"""Local paths and object-store URLs (``gs://``, ``s3://``, ...): the one place that tells them apart.

Every command that takes a path passes it through ``resolve``: a URL stays as it is (an
``etils.epath.Path``, the file layer orbax uses too; ``gs://`` goes through gcsfs), a local path is
made absolute. Nothing else in diffujax looks at a path's scheme.

Writing a directory "atomically" means two different things:

- local: a temporary directory next to the destination, renamed into place at the end (a reader
  never sees a half-written directory);
- object store: no rename of directories exists, so the directory is written in place and a
  marker object (``COMPLETE``) is written last; readers require the marker.

Libraries that only read or write local files (safetensors, ArrayRecord, the tokenizer libraries,
arrow memory maps) get a local copy of a remote file from ``local_copy`` (cached under
``cache_root()/remote``, keyed by the object's URL, size and generation, ``fingerprint``, so a
resumed run does not download again), a temporary local copy of a remote directory from
``local_view``, and write through ``writing_file``, which renames (local) or uploads (remote) a
finished file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import tempfile
import re
import uuid
import warnings
from typing import Iterator

import fsspec
from etils import epath

from diffujax.processes import hostname, process_alive

COMPLETE = ".complete"  # written last into a finished directory (model checkpoints, exports)
_CHUNK = 8 << 20


def is_remote(path) -> bool:
    """A URL an fsspec / epath backend serves (``gs://bucket/x``), not a local path."""
    scheme, sep, _ = os.fspath(path).partition("://")
    return bool(sep) and scheme not in ("", "file")


def resolve(path) -> epath.Path:
    """The path to use: a URL unchanged, a local path (``~`` and ``file://`` too) absolute."""
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_relative(path) -> bool:
    """A local path given relative to the working directory (which may differ between hosts)."""
    text = os.fspath(path)
    return not is_remote(text) and not os.path.isabs(os.path.expanduser(text))


def cache_root() -> pathlib.Path:
    """``$DIFFUJAX_CACHE`` or ``~/.cache/diffujax``: compiled programs, the default model, copies
    of remote files."""
    return pathlib.Path(os.environ.get("DIFFUJAX_CACHE") or "~/.cache/diffujax").expanduser()


# -- reading and writing single files -------------------------------------------------------------


def copy_file(src, dst) -> None:
    """Stream ``src`` to ``dst`` (either may be remote), ``dst`` replaced if it exists."""
    with resolve(src).open("rb") as fin, resolve(dst).open("wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)


def chmod_as_created(path, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open`` / ``mkdir`` would (0666 / 0777 less the umask):
    ``tempfile.mkdtemp`` and safetensors create theirs private to the owner."""
    umask = os.umask(0)  # reading the umask means setting it: set it back at once
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


@contextlib.contextmanager
def writing_file(dst) -> Iterator[pathlib.Path]:
    """Yield a local file name to write; on success it becomes ``dst`` (local: renamed into place,
    remote: uploaded), on failure it is removed and ``dst`` is untouched."""
    dst = resolve(dst)
    if is_remote(dst):
        with tempfile.TemporaryDirectory(prefix=".diffujax-upload-") as tmp:
            local = pathlib.Path(tmp) / dst.name
            yield local
            copy_file(local, dst)
        return
    local = pathlib.Path(dst.parent) / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield local
        os.replace(local, dst)
    finally:
        if local.exists():
            local.unlink()


def fingerprint(path) -> str:
    """Changes whenever the file's contents may have: size and mtime (ns) locally; size and the
    object's generation / etag / md5 in a bucket (mtimes there have one-second resolution)."""
    path = resolve(path)
    if not is_remote(path):
        st = os.stat(path)
        return f"{path}|{st.st_size}|{st.st_mtime_ns}"
    fs, name = _fs(path)
    info = fs.info(name)
    version = next((info[k] for k in ("generation", "etag", "ETag", "md5Hash", "mtime", "updated")
                    if info.get(k)), "")
    return f"{path}|{info.get('size')}|{version}"


def local_copy(path, names=None) -> pathlib.Path:
    """A local file (or, with ``names``, a local directory holding those of the top-level files
    ``names`` that exist) with the contents of ``path``: ``path`` itself when local; for a URL, a
    copy in the cache that is fetched once and reused while the objects are unchanged."""
    path = resolve(path)
    if not is_remote(path):
        return pathlib.Path(path)
    sources = [path] if names is None else [path / n for n in names if (path / n).is_file()]
    stats = "|".join(fingerprint(p) for p in sources)
    key = hashlib.sha256(f"{path}|{names}|{stats}".encode()).hexdigest()[:20]
    local = cache_root() / "remote" / key / path.name
    for src in sources:
        dst = local if names is None else local / src.name
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            with writing_file(dst) as tmp:
                copy_file(src, tmp)
    if names is not None:
        local.mkdir(parents=True, exist_ok=True)
    return local


@contextlib.contextmanager
def local_view(directory) -> Iterator[epath.Path]:
    """A local directory with the files of ``directory``: ``directory`` itself when local, else a
    temporary copy that is removed afterwards. For readers of whole directories that need local
    files (safetensors)."""
    directory = resolve(directory)
    if not is_remote(directory):
        yield directory
        return
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    with tempfile.TemporaryDirectory(prefix=".diffujax-download-") as tmp:
        root = pathlib.Path(tmp) / directory.name
        root.mkdir()
        copy_tree(directory, root)
        yield epath.Path(root)


# -- listing --------------------------------------------------------------------------------------


def _fs(path):
    return fsspec.core.url_to_fs(os.fspath(path))


def read_range(path, start: int, length: int) -> bytes:
    """Bytes ``start .. start + length`` of ``path`` (for a URL one ranged request; no open
    handle either way: nothing to close, nothing to pickle)."""
    fs, name = _fs(resolve(path))
    return fs.cat_file(name, start=start, end=start + length)


def _sorted_paths(names, like: str) -> list[epath.Path]:
    """fsspec's ``names`` (a bucket's without their scheme) as sorted paths."""
    scheme = f"{like.partition('://')[0]}://" if is_remote(like) else ""
    return [epath.Path(scheme + p) for p in sorted(names)]


def list_files(directory) -> list[epath.Path]:
    """Every file below ``directory`` (recursively), sorted."""
    fs, root = _fs(resolve(directory))
    return _sorted_paths(fs.find(root), os.fspath(directory))


def glob(pattern: str) -> list[epath.Path]:
    """Files matching ``pattern`` (``*``, ``?``, ``[...]``, ``**`` for any depth), sorted."""
    fs, root = _fs(resolve(pattern))
    return _sorted_paths(filter(fs.isfile, fs.glob(root)), pattern)


# -- directories ----------------------------------------------------------------------------------


def is_complete(directory) -> bool:
    return (resolve(directory) / COMPLETE).is_file()


# Scratch directories beside a destination are named ``.NAME.PURPOSE-HOST-PID-RANDOM``, so the
# next run for the same destination can tell those of a killed process from those of a live one.
_SCRATCH = re.compile(r"^\.(?P<name>.+)\.(?P<purpose>tmp|old|export)-(?P<host>[A-Za-z0-9._]*)-"
                      r"(?P<pid>\d+)-[A-Za-z0-9_]+$")


def scratch_prefix(dst: pathlib.Path, purpose: str) -> str:
    host = re.sub(r"[^A-Za-z0-9.]", "_", hostname())
    return f".{dst.name}.{purpose}-{host}-{os.getpid()}-"


def remove_stale_scratch(dst) -> list[pathlib.Path]:
    """Remove the scratch directories that killed processes left beside ``dst`` (same host, owner
    pid gone), with a warning for each; returns them."""
    dst = pathlib.Path(os.fspath(dst)).expanduser().absolute()
    removed = []
    if not dst.parent.is_dir():
        return removed
    this_host = re.sub(r"[^A-Za-z0-9.]", "_", hostname())
    for path in dst.parent.iterdir():
        m = _SCRATCH.match(path.name)
        if not m or m["name"] != dst.name or m["host"] != this_host or not path.is_dir():
            continue
        if process_alive(hostname(), int(m["pid"])) is False:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            warnings.warn(f"removed {path}: a temporary directory left by a killed diffujax"
                          f" (pid {m['pid']}) writing {dst}", RuntimeWarning, stacklevel=3)
    return removed


@contextlib.contextmanager
def atomic_directory(dst, overwrite: bool = False, error=FileExistsError) -> Iterator[epath.Path]:
    """Yield the directory to write ``dst``'s contents into; never a half-written ``dst``.

    Local: a fresh temporary directory next to ``dst``, renamed to ``dst`` on success (replacing
    it only when ``overwrite``) and removed on failure. Remote: ``dst`` itself, emptied first when
    ``overwrite``; on success ``COMPLETE`` is written last (readers require it), on failure the
    partial objects are removed. ``error``: the exception type for an existing ``dst``.
    """
    dst = resolve(dst)
    if is_remote(dst):
        yield from _remote_directory(dst, overwrite, error)
        return
    local = pathlib.Path(dst)
    if local.exists() and not overwrite:
        raise error(f"{dst}: already exists (pass overwrite=True / --overwrite to replace it)")
    local.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(local)  # what a killed earlier attempt for the same dst left
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=scratch_prefix(local, "tmp"), dir=local.parent))
    chmod_as_created(tmp, directory=True)
    try:
        yield epath.Path(tmp)
        if local.exists():
            if not overwrite:  # appeared while we were writing
                raise error(f"{dst}: already exists (created by another process?)")
            old = pathlib.Path(tempfile.mkdtemp(prefix=scratch_prefix(local, "old"),
                                                dir=local.parent))
            os.rename(local, old / "x")
            os.rename(tmp, local)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, local)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remote_directory(dst: epath.Path, overwrite: bool, error):
    if dst.exists():
        if not overwrite:
            what = ("already exists" if is_complete(dst) else
                    f"holds an interrupted write (no {COMPLETE} marker)")
            raise error(f"{dst}: {what} (pass overwrite=True / --overwrite to replace it)")
        dst.rmtree()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        yield dst
        (dst / COMPLETE).write_text("ok\n")
    except BaseException:
        with contextlib.suppress(Exception):
            dst.rmtree()
        raise


# -- files that grow (logs) -----------------------------------------------------------------------


class _ObjectLog:
    """An append-only log kept in an object store, where objects cannot be appended to: the
    content is held in memory and the whole object is rewritten on ``flush`` and ``close`` (the
    writers flush at their own pace: the run's logger at every checkpoint, TensorBoard's every
    30 s). With ``roll_bytes``, a log that has grown past it continues in a new object
    ``NAME.partNNNN`` (TensorBoard reads every event file of a directory in name order), which
    bounds the memory and the bytes rewritten per flush."""

    def __init__(self, path: epath.Path, binary: bool, roll_bytes: int | None):
        self.base, self.binary, self.roll_bytes = path, binary, roll_bytes
        self.part = 0
        self.path = path
        self._data = bytearray(path.read_bytes() if path.is_file() else b"")
        self._dirty = False
        self.closed = False

    def write(self, data) -> int:
        self._data += data if self.binary else data.encode("utf-8")
        self._dirty = True
        return len(data)

    def flush(self) -> None:
        if not self._dirty:
            return
        with self.path.open("wb") as f:
            f.write(bytes(self._data))
        self._dirty = False
        if self.roll_bytes and len(self._data) >= self.roll_bytes:
            self.part += 1
            self.path = self.base.parent / f"{self.base.name}.part{self.part:04d}"
            self._data = bytearray()

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


def open_append(path, *, binary: bool = False, roll_bytes: int | None = None):
    """A file to append records to: a local file opened for appending (line-buffered text), or
    for a URL an in-memory log uploaded whole on ``flush()`` and ``close()``."""
    path = resolve(path)
    if is_remote(path):
        return _ObjectLog(path, binary, roll_bytes)
    return open(path, "ab" if binary else "a", **({} if binary else {"buffering": 1}))


def write_text_atomic(path, text: str) -> None:
    """Replace ``path`` with ``text`` as a whole (a local rename, or one object upload)."""
    with writing_file(path) as tmp:
        tmp.write_text(text)


def copy_tree(src, dst) -> None:
    """Every file below ``src`` to the same relative name below ``dst`` (either may be remote)."""
    src, dst = resolve(src), resolve(dst)
    for f in list_files(src):
        target = dst / os.fspath(f)[len(os.fspath(src)):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_file(f, target)
