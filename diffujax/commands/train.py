"""``diffujax train --config RUN.yaml [key=value ...]``: the config read and checked, the process
readied for a run (libtpu's flags, the distributed runtime, the compilation cache), then the
training loop (``train/loop.py``, which documents the run directory and the exit status)."""

from __future__ import annotations

import logging
import os

import jax

from diffujax import paths
from diffujax.config import load_config
from diffujax.parallel import tpu_env
from diffujax.parallel.mesh import maybe_initialize_distributed
from diffujax.parallel.topology import parse_slice
from diffujax.train.loop import train

log = logging.getLogger(__name__)


def run_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    _async_collectives(cfg)
    # Before any other JAX call: multi-host jobs must join the distributed runtime first.
    maybe_initialize_distributed(cfg.mesh)
    _enable_compilation_cache()
    return train(cfg)


def _async_collectives(cfg):
    """On a TPU, libtpu's async collective flags for its generation (``tpu_env``), before JAX
    starts libtpu: the TPU VM's accelerator type, else the slice the config plans for."""
    if not tpu_env.tpu_attached():
        return
    accelerator = os.environ.get("TPU_ACCELERATOR_TYPE") or cfg.plan.topology
    try:
        generation = parse_slice(accelerator).generation.libtpu if accelerator else None
    except ValueError:
        generation = None
    if generation is None:
        log.warning("TPU generation unknown (no TPU_ACCELERATOR_TYPE, no plan.topology): libtpu"
                    " starts without the async collective flags")
        return
    flags = tpu_env.set_collective_flags(generation)
    log.info("libtpu flags (%s): %s", generation, " ".join(flags))


def _enable_compilation_cache():
    """Restarts after a preemption should not pay for compilation again: keep compiled steps in
    ``$DIFFUJAX_CACHE/jax`` unless the user chose a cache (``JAX_COMPILATION_CACHE_DIR``)."""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", os.fspath(paths.cache_root() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
