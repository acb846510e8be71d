"""Where a run writes: ``output_dir`` as a local path or a bucket URL, checked before anything is
written.

A multi-host run writes checkpoints from every process into one directory, so that directory must
be the same place for all of them: a bucket (``gs://...``) or a filesystem every host mounts. A
relative path (each host resolves it against its own working directory) is refused, and a local
path is probed: process 0 writes a marker file, the others must see it.
"""

from __future__ import annotations

import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

from diffujax import paths


def resolve_output_dir(raw) -> "paths.epath.Path":
    """``output_dir`` to write to (``paths.resolve``), refused when a multi-host run could not
    share it."""
    if not raw:
        raise ValueError("output_dir is not set (add output_dir=PATH or"
                         " output_dir=gs://BUCKET/RUN)")
    if any(ord(c) < 32 or ord(c) == 127 for c in str(raw)):
        raise ValueError(f"output_dir={str(raw)!r}: contains a control character (a newline, a"
                         " tab...); such a value is a typo far more often than a wish")
    if jax.process_count() > 1 and paths.is_relative(raw):
        raise ValueError(f"output_dir={raw}: a relative path on a {jax.process_count()}-process run"
                         " (each host would resolve it against its own working directory); use a"
                         " bucket (gs://BUCKET/RUN) or an absolute path on a filesystem every host"
                         " mounts")
    out = paths.resolve(raw)
    if jax.process_count() > 1 and not paths.is_remote(out):
        _require_shared(out)
    return out


def _require_shared(out) -> None:
    """Process 0 writes a probe file into ``out``; every process must see it (a collective)."""
    token = multihost_utils.broadcast_one_to_all(np.frombuffer(uuid.uuid4().bytes, np.uint8))
    probe = out / f".diffujax-shared-{bytes(np.asarray(token)).hex()[:16]}"
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("shared\n")
    multihost_utils.sync_global_devices("diffujax_output_dir_probe")
    seen = multihost_utils.process_allgather(np.int32(probe.exists()))
    multihost_utils.sync_global_devices("diffujax_output_dir_probed")
    if jax.process_index() == 0:
        probe.unlink()
    missing = [i for i, ok in enumerate(np.asarray(seen).ravel()) if not ok]
    if missing:
        raise ValueError(f"output_dir={out} is local to each host (processes {missing} do not see"
                         " what process 0 wrote there); use a bucket (gs://BUCKET/RUN) or a"
                         " filesystem every host mounts")
