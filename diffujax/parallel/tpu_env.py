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


# libtpu flags that make XLA's collectives asynchronous, overlapped with compute: the weight
# all-gathers of FSDP become async collective fusions (the next weights arrive while a matmul
# runs) and data-parallel reductions are combined and overlapped. The set MaxText's v5e / v5p /
# v6e training recipes start libtpu with (its benchmarks/xla_flags_library.py: the data-parallel
# all-reduce optimisation and "continuation fusion for all-gather"); every flag is known to the
# libtpu this project pins (an unknown one stops libtpu at start-up; tests/plan/test_comms.py
# starts it with them).
ASYNC_COLLECTIVE_FLAGS = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)
# Per TPU generation (libtpu's names); one set for all today, kept per generation because the
# recipes differ as they are tuned.
COLLECTIVE_FLAGS = dict.fromkeys(("v4", "v5e", "v5p", "v6e"), ASYNC_COLLECTIVE_FLAGS)


def set_collective_flags(generation: str, environ: MutableMapping[str, str] | None = None
                         ) -> list[str]:
    """Add the generation's ``COLLECTIVE_FLAGS`` to ``LIBTPU_INIT_ARGS`` (a flag the user already
    set there, with any value, is kept as the user set it); returns the flags in
    ``LIBTPU_INIT_ARGS`` afterwards. libtpu reads them once, when it starts: call this before
    anything compiles for or runs on a TPU."""
    environ = os.environ if environ is None else environ
    present = environ.get("LIBTPU_INIT_ARGS", "").split()
    named = {arg.split("=", 1)[0] for arg in present}
    added = [f for f in COLLECTIVE_FLAGS.get(generation, ()) if f.split("=", 1)[0] not in named]
    if added:
        environ["LIBTPU_INIT_ARGS"] = " ".join(present + added)
    return environ.get("LIBTPU_INIT_ARGS", "").split()


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
