"""``diffujax plan``: compile a run for a Cloud TPU slice on any machine and report what it needs.

    diffujax plan --config configs/diffullama_7b.yaml --topology v5p-128 [--num-slices N]
                  [--what train|eval|generate|decode] [--batch B] [--context L] [--fit]
                  [--json] [key=value ...]

The programs are compiled by the real TPU compiler (libtpu) for compile-only devices of the named
slice, from abstract inputs that carry the run's shardings (``programs.py``): no weights, no data,
no TPU. The report gives, per program: the mesh; HBM per chip (parameters, optimizer state, batch,
temporaries, total) against the chip's HBM; compile time; the attention backend; the collectives
of the optimized HLO (``hlo.py``) and any parameter gathered whole; and for the train step the
model FLOPs and, from XLA's own cost model, an *estimated* step time and MFU (``estimate.py``);
for ``--what generate`` on a block model, the cached block decoder's estimated tokens/s per chip;
for ``--what decode``, one pass of that decoder (``--batch`` rows, a KV cache of ``--context``
positions): weights and KV cache per chip, its time, matmul FLOPs and tokens/s per chip.
``--fit`` searches ``optimizer.grad_accum_steps`` (the micro-batch, with the global batch fixed)
and ``model.remat`` for the fastest setting that fits and prints the overrides.
"""

from __future__ import annotations

from diffujax.plan.analysis import Target, compile_program, make_target, plan
from diffujax.plan.search import fit

__all__ = ["Target", "compile_program", "fit", "make_target", "plan"]
