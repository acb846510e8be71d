"""libtpu's environment on a machine without a TPU (os and glob only: the CLI calls this before
it imports jax).

With libtpu installed (the TPU compiler that ``diffujax plan`` and the TPU compile tests use), JAX
initialises its TPU plugin in every process. Where no TPU is attached, libtpu cannot learn the
machine's accelerator type and worker hostnames, and prints an ``E0000 ... INVALID_ARGUMENT``
error with an internal stack trace before JAX falls back to the CPU. Giving it a single-host
description silences that; a compile-only client (``jax.experimental.topologies``) needs nothing
more. Where a TPU is attached nothing is set, so a TPU VM's own settings and errors stay as they
are, and a variable the user set is never replaced.
"""

from __future__ import annotations

import glob
import os
from typing import MutableMapping

# What a single host with no TPU may claim: libtpu reads these before anything else.
NO_TPU_DEFAULTS = (("TPU_ACCELERATOR_TYPE", "v5p-8"), ("TPU_WORKER_ID", "0"),
                   ("TPU_WORKER_HOSTNAMES", "localhost"))


def tpu_attached() -> bool:
    """A TPU's device files: /dev/accel* or /dev/vfio/N, depending on the TPU generation."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_libtpu_without_tpu(environ: MutableMapping[str, str] | None = None,
                             attached: bool | None = None) -> list[str]:
    """Default libtpu's host description where no TPU is attached; returns the names set."""
    environ = os.environ if environ is None else environ
    if tpu_attached() if attached is None else attached:
        return []
    added = [name for name, _ in NO_TPU_DEFAULTS if name not in environ]
    for name, value in NO_TPU_DEFAULTS:
        environ.setdefault(name, value)
    return added
