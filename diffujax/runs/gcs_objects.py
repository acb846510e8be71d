"""Objects in a GCS bucket read, written and deleted under generation preconditions: the storage
of the run lease (``lock.LeaseLock``).

GCS gives every version of an object a generation number; a write or delete with
``if_generation_match=N`` happens only while the object is at generation N (0: only if there is
none), else the server refuses it (412). fsspec's interface has no such call beyond "create only",
so these go through google-cloud-storage's client, whose object calls take the precondition as a
documented argument. The client authenticates with application default credentials (the VM's
service account on a TPU VM) and needs no project for object calls; with
``STORAGE_EMULATOR_HOST`` set (the tests' emulator) it talks to that server, anonymously.
"""

from __future__ import annotations

import functools
import os

import fsspec
from google.api_core.exceptions import NotFound, PreconditionFailed
from google.cloud import storage

SCHEMES = ("gs", "gcs")  # the URL schemes gcsfs (and so ``paths``) serves from GCS


def supports_generations(url) -> bool:
    """Whether ``url`` is on a store whose writes can be conditioned on generations (gs://)."""
    scheme, sep, _ = os.fspath(url).partition("://")
    return bool(sep) and scheme in SCHEMES


@functools.cache
def _client(pid: int) -> storage.Client:
    # One client per process: it may be shared by threads (the lease's heartbeat), not across a
    # fork. project=None: object calls name their bucket, so no project is looked up.
    return storage.Client(project=None)


def _blob(url) -> storage.Blob:
    scheme, _, rest = os.fspath(url).partition("://")
    bucket, _, name = rest.partition("/")
    if scheme not in SCHEMES or not bucket or not name:
        raise ValueError(f"{url}: generation preconditions need a gs://BUCKET/OBJECT URL")
    return _client(os.getpid()).bucket(bucket).blob(name)


def _forget_cached_listing(url) -> None:
    """gcsfs (behind ``paths`` and epath) caches directory listings; drop the ones this write or
    delete made stale."""
    fs, name = fsspec.core.url_to_fs(os.fspath(url))
    fs.invalidate_cache(name)


def read_object(url) -> tuple[bytes, int] | None:
    """The contents of the object ``url`` and their generation, or None if there is no object."""
    blob = _blob(url)
    while True:
        current = blob.bucket.get_blob(blob.name)
        if current is None:
            return None
        try:  # the contents of that generation, not of one written since
            return blob.download_as_bytes(if_generation_match=current.generation), \
                current.generation
        except (NotFound, PreconditionFailed):
            continue  # replaced or deleted between the two requests: look again


def write_object(url, data: bytes, if_generation: int) -> int:
    """Write ``data`` as the object ``url`` only if it is at generation ``if_generation`` (0: only
    if it does not exist); returns the new generation. FileExistsError if the object has moved
    on."""
    blob = _blob(url)
    try:
        blob.upload_from_string(data, content_type="application/octet-stream",
                                if_generation_match=if_generation)
    except PreconditionFailed as e:
        raise FileExistsError(f"{url}: not at generation {if_generation}") from e
    _forget_cached_listing(url)
    return blob.generation


def delete_object(url, if_generation: int) -> bool:
    """Delete the object ``url`` only if it is at generation ``if_generation``; False if it is
    gone or has moved on (then it is left alone)."""
    try:
        _blob(url).delete(if_generation_match=if_generation)
    except (NotFound, PreconditionFailed):
        return False
    _forget_cached_listing(url)
    return True
