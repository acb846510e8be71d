"""The programs a run compiles, built from abstract inputs: no weights, no data, real shardings.

Each builder reuses what ``diffujax train`` / ``eval`` / ``generate`` call (``make_train_step``,
``train_state_shardings``, ``make_eval_step``, the samplers), so what is compiled here is what a
run compiles; only the arrays are ``jax.ShapeDtypeStruct`` s carrying their ``NamedSharding``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from diffujax.attention.pattern import anneal_end, is_annealing
from diffujax.checkpoint import store
from diffujax.config import checked_mask_token, init_model_config
from diffujax.diffusion import decoding
from diffujax.diffusion.decoding import canvas_length, decode_blocks
from diffujax.diffusion.sampling import sample_confidence
from diffujax.models import (KVCache, abstract_params, apply_fn_for, cached_fn_for,
                             param_shardings)
from diffujax.parallel.mesh import Layout
from diffujax.plan.matmuls import matmul_flops
from diffujax.train.checkpointing import abstract_like
from diffujax.train.state import (abstract_train_state, apply_fn_for_run, model_params,
                                  train_state_shardings)
from diffujax.train.step import make_eval_step, make_train_step, step_config

# The default sampler of ``diffujax generate`` and its default number of passes.
GENERATE_SAMPLER, GENERATE_STEPS = "confidence", 64


@dataclasses.dataclass
class Program:
    name: str  # "train", "train_full", "eval", "generate", "generate_cached", "generate_ar"
    description: str
    lower: Callable[[], Any]  # () -> jax.stages.Lowered
    inputs: dict[str, Any]  # group ("params", "optimizer", ...) -> pytree of ShapeDtypeStructs
    pattern: str  # the attention pattern kind its layers run
    rows: int  # batch rows per call
    # The cached decoder's plan (``cached_generate_program``): prompt width, new tokens, block
    # size, passes per block and forward passes per call.
    decode: dict | None = None
    # One pass of it (``decode_step_program``): rows, context, cache length, block size.
    decode_step: dict | None = None
    # () -> the matmul FLOPs of one call, from the traced program (``matmuls.py``).
    matmul_flops: Callable[[], int] | None = None


# ------------------------------------------------------------------------------ the model config


def plan_model_config(cfg):
    """``(model_cfg, source)`` of the run without reading any weights: the base checkpoint's
    ``config.json`` when it is on disk, else ``model.init``, else ``plan.model`` (the
    architecture a config names for planning without the checkpoint)."""
    if cfg.model.init is not None:
        return cfg.resolve_model_config(), "model.init"
    path = cfg.model.checkpoint
    if path != "default" and not os.path.isdir(os.path.expanduser(path)) and cfg.plan.model:
        return (cfg.resolve_model_config(init_model_config(cfg.plan.model)),
                f"plan.model (no checkpoint at {path})")
    path = cfg.model_checkpoint()
    try:
        loaded, _ = store.read_meta(path)
    except Exception as e:  # noqa: BLE001 - one line saying what plan needs
        raise ValueError(f"model.checkpoint: {e}; plan reads only its config.json; without the"
                         " checkpoint, describe the architecture in plan.model (model.init"
                         " fields)") from None
    return cfg.resolve_model_config(loaded), f"{path}/config.json"


# ------------------------------------------------------------------------------ abstract inputs


def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def abstract_batch(cfg, rows: int, layout: Layout) -> dict:
    """The batch the data pipeline yields (its output contract: tokens, segment_ids, src,
    loss_mask, and positions when ``data.options.positions``), as global ``[rows, L]`` arrays."""
    sharding = layout.batch_sharding
    shape = (rows, cfg.data.seq_len)
    fields = {"tokens": jnp.int32, "segment_ids": jnp.int32, "src": jnp.bool_,
              "loss_mask": jnp.bool_}
    if cfg.data.options.get("positions"):
        fields["positions"] = jnp.int32
    return {name: _sds(shape, dtype, sharding) for name, dtype in fields.items()}


def abstract_state(cfg, model_cfg, layout: Layout):
    return abstract_like(abstract_train_state(cfg, model_cfg),
                         train_state_shardings(cfg, model_cfg, layout))


def abstract_model_params(model_cfg, layout: Layout):
    """The weights ``diffujax generate`` holds: the model's (a LoRA run exports them merged)."""
    return abstract_like(abstract_params(model_cfg), param_shardings(model_cfg, layout))


def abstract_key(layout: Layout):
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=layout.replicated())


# ------------------------------------------------------------------------------ the programs


def train_programs(cfg, model_cfg, layout: Layout) -> list[Program]:
    """Every train step ``diffujax train`` compiles (``step_config``): the step while the
    attention mask anneals (when ``diffusion.anneal_steps > 0``), the full-attention step it
    switches to afterwards, and one of each per block size of ``diffusion.block_schedule``
    (docs/algorithms.md §9), in the order the run first needs them."""
    apply_fn = apply_fn_for_run(cfg, model_cfg)
    state = abstract_state(cfg, model_cfg, layout)
    batch = abstract_batch(cfg, cfg.data.global_batch, layout)
    # With LoRA, "params" are the adapters (what trains) and "frozen" the base weights.
    inputs = {"params": state.params, "frozen": state.frozen, "optimizer": state.opt_state,
              "ema": state.ema, "batch": batch}
    d = cfg.diffusion
    # The program changes only where the block size or the annealing phase does.
    changes = {0, anneal_end(d.anneal_steps)} | {step for step, _ in d.block_schedule}
    phases = {}
    for step in sorted(s for s in changes if s < cfg.train.steps):
        run_cfg = step_config(cfg, step)
        phases.setdefault((run_cfg.diffusion.block_size, is_annealing(step, d.anneal_steps)),
                          (step, run_cfg))
    out = []
    for (block, annealing), (step, run_cfg) in phases.items():
        name = "train" if annealing or d.anneal_steps <= 0 else "train_full"
        text = ("train step, annealed mask" + f" (steps 1..{d.anneal_steps})" if annealing else
                "train step, full attention" + (" (after annealing)" if d.anneal_steps > 0
                                                 else ""))
        if block:
            name += f"_blocks{block}"
            text += f", blocks of {block} (from step {step})"
        train_step = make_train_step(run_cfg, model_cfg, apply_fn, layout)
        out.append(Program(name, text,
                           lambda s=train_step, a=annealing: s.lower(state, batch, a), inputs,
                           "annealed" if annealing else "full", cfg.data.global_batch))
    return out


def eval_program(cfg, model_cfg, layout: Layout) -> Program:
    """The held-out ELBO step of training (one micro-batch of rows, as the loop feeds it)."""
    apply_fn = apply_fn_for_run(cfg, model_cfg)
    params = model_params(abstract_state(cfg, model_cfg, layout))
    rows = cfg.data.global_batch // cfg.optimizer.grad_accum_steps
    batch = abstract_batch(cfg, rows, layout)
    step = make_eval_step(cfg, model_cfg, apply_fn, layout, kind="elbo")
    key = abstract_key(layout)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=layout.replicated())  # row offset, rows
    return Program("eval", "held-out ELBO step (one micro-batch)",
                   lambda: step.lower(params, batch, key, scalar, scalar),
                   {"params": params, "batch": batch}, "full", rows)


def generate_program(cfg, model_cfg, layout: Layout) -> Program:
    """``diffujax generate``'s default sampler on one row per batch shard of ``data.seq_len``
    tokens (a whole denoising loop: one compiled ``while``)."""
    apply_fn = apply_fn_for(model_cfg)
    params = abstract_model_params(model_cfg, layout)
    rows = layout.batch_shards
    canvas, src = (_sds((rows, cfg.data.seq_len), dtype, layout.batch_sharding)
                   for dtype in (jnp.int32, jnp.bool_))
    key = abstract_key(layout)
    mask_id = checked_mask_token(model_cfg)

    def lower():
        with layout.active():
            return sample_confidence.lower(apply_fn, params, canvas, src, key,
                                           mask_token_id=int(mask_id), steps=GENERATE_STEPS)

    return Program("generate", f"sampler '{GENERATE_SAMPLER}', {GENERATE_STEPS} passes, one row"
                   " per batch shard", lower, {"params": params, "batch": {"canvas": canvas,
                                                                            "src": src}},
                   "full", rows)


def decode_plan(seq_len: int, block_size: int, steps: int = GENERATE_STEPS) -> dict:
    """What the planned cached decode does, worked out without running it: every row's prompt is
    ``seq_len // 4`` tokens and it generates the rest of ``seq_len``; the ``confidence`` rule with
    ``diffujax generate``'s split of ``steps`` over the blocks (``per_block``), so that every
    block takes a fixed number of passes (the threshold rule's depend on the logits). Passes
    (``decoding.py``): the prefill (when a whole block of prompt exists), per block
    ``ceil(masked / k)`` denoising passes (``k = ceil(N / per_block)`` positions each) and a
    commit pass, except after the last block; with blocks of one token (the AR decoder) one
    commit pass per token but the first (drawn from the prefill's logit). ``loop_passes``: those
    inside the decoder's ``while`` (all but the prefill)."""
    n = block_size
    width = max(1, seq_len // 4)
    new = seq_len - width
    per_block = max(1, steps // -(-new // n)) if n > 1 else 1
    k = math.ceil(n / per_block)
    length = canvas_length(width, new, n)
    prefill = 1 if width // n else 0
    passes = prefill
    if n == 1:
        passes += new - 1
    else:
        for b in range(width // n, length // n):
            passes += -(-(min((b + 1) * n, length) - max(b * n, width)) // k)
            if (b + 1) * n < width + new:
                passes += 1  # the commit pass
    return dict(prompt_width=width, new_tokens=new, block_size=n, steps_per_block=per_block,
                canvas=length, forward_passes=passes, loop_passes=passes - prefill)


def abstract_cache(model_cfg, layout: Layout, rows: int, length: int) -> KVCache:
    """The decoder's KV cache as abstract arrays: ``rows`` x ``length`` positions in the compute
    dtype, split over the batch shards as ``decode_blocks`` receives it."""
    shape = (model_cfg.num_layers, rows, length, model_cfg.num_kv_heads, model_cfg.head_dim)
    sharding = NamedSharding(layout.mesh, PartitionSpec(None, layout.batch_sharding.spec[0]))
    return KVCache(*(_sds(shape, model_cfg.dtype, sharding),) * 2)


def cached_generate_program(cfg, model_cfg, layout: Layout, block_size: int | None = None
                            ) -> Program:
    """A block model's ``diffujax generate``: the cached block decoder (``decode_blocks``, one
    compiled ``while`` over denoising and commit passes, the KV cache donated) on one row per
    batch shard, with the deterministic ``confidence`` plan of ``decode_plan``; ``block_size=1``:
    the AR KV-cache decoder (``--sampler ar``) on the same prompts, its speed baseline."""
    n = model_cfg.block_size if block_size is None else block_size
    plan = decode_plan(cfg.data.seq_len, n)
    params = abstract_model_params(model_cfg, layout)
    rows = layout.batch_shards
    sharding = layout.batch_sharding
    prompt = _sds((rows, plan["prompt_width"]), jnp.int32, sharding)
    lengths = _sds((rows,), jnp.int32, NamedSharding(layout.mesh, PartitionSpec(sharding.spec[0])))
    cache = abstract_cache(model_cfg, layout, rows, plan["canvas"])
    key = abstract_key(layout)
    mask_id = int(checked_mask_token(model_cfg)) if n > 1 else None

    def lower():
        with layout.active():
            return decode_blocks.lower(
                cached_fn_for(model_cfg), params, prompt, lengths, cache, key, block_size=n,
                new_tokens=plan["new_tokens"], mask_token_id=mask_id,
                sampler="confidence", steps=plan["steps_per_block"])

    sizes = (f"prompt {plan['prompt_width']}, {plan['new_tokens']} new tokens, one row per batch"
             " shard")
    if n == 1:
        name, text = "generate_ar", f"AR KV-cache decoder, greedy; {sizes}"
    else:
        name, text = "generate_cached", (f"cached block decoder, blocks of {n}, sampler"
                                         f" 'confidence' {plan['steps_per_block']} passes per"
                                         f" block; {sizes}")
    return Program(name, text, lower, {"params": params, "batch": {"prompt": prompt},
                                       "cache": cache}, "cached", rows, decode=plan)


def decode_step_program(cfg, model_cfg, layout: Layout, batch: int, context: int) -> Program:
    """One pass of the cached block decoder (``decoding.block_pass``, what every denoising and
    commit pass of ``decode_blocks`` calls): ``batch`` rows of one block of ``block_size``
    tokens, the last block of a KV cache of ``context`` positions (rounded up to whole blocks;
    the pass attends over the whole cache, so where the block sits changes no cost), the cache
    donated and split over the batch shards as the decoder's. The sampler's work between passes
    is not in it (``--what generate`` compiles the whole decoder with it)."""
    n = model_cfg.block_size
    if n < 1:
        raise ValueError("plan --what decode: the model is not a block diffusion model; set"
                         " diffusion.block_size (the block of tokens a pass decodes)")
    if batch < 1 or batch % layout.batch_shards:
        raise ValueError(f"--batch {batch}: must be a positive multiple of the mesh's"
                         f" {layout.batch_shards} batch shards")
    if context < 1:
        raise ValueError(f"--context {context}: must be >= 1")
    length = canvas_length(context, 0, n)
    limit = getattr(model_cfg, "max_positions", None)
    if limit is not None and length > limit:
        raise ValueError(f"--context {context}: a cache of {length} positions (whole blocks of"
                         f" {n}) exceeds the model's {limit} positions")
    params = abstract_model_params(model_cfg, layout)
    tokens = _sds((batch, n), jnp.int32, layout.batch_sharding)
    cache = abstract_cache(model_cfg, layout, batch, length)
    offset = jax.ShapeDtypeStruct((), jnp.int32, sharding=layout.replicated())
    step = jax.jit(decoding.block_pass, static_argnames=("cached_fn", "block_size"),
                   donate_argnames=("cache",))

    cached_fn = cached_fn_for(model_cfg)

    @functools.cache  # traced once, for both the matmul count and the lowering
    def trace():
        with layout.active():
            return step.trace(cached_fn, params, tokens, cache, offset, block_size=n)

    def lower():
        with layout.active():
            return trace().lower()

    return Program("decode_step", f"one cached decoder pass: {batch} rows x a block of {n}"
                   f" tokens against a KV cache of {length} positions", lower,
                   {"params": params, "batch": {"tokens": tokens}, "cache": cache}, "cached",
                   batch, decode_step=dict(batch=batch, context=context, cache_length=length,
                                           block_size=n),
                   matmul_flops=lambda: matmul_flops(trace().jaxpr))


def programs_for(what: str, cfg, model_cfg, layout: Layout, *, batch: int | None = None,
                 context: int | None = None) -> list[Program]:
    """The programs of ``what``; ``decode`` (one cached decoder pass) takes ``batch`` rows
    (default: one per batch shard) and a ``context`` of KV-cache positions (default:
    ``data.seq_len``)."""
    if what == "decode":
        return [decode_step_program(
            cfg, model_cfg, layout, layout.batch_shards if batch is None else batch,
            cfg.data.seq_len if context is None else context)]
    if what == "train":
        return train_programs(cfg, model_cfg, layout)
    if what == "eval":
        return [eval_program(cfg, model_cfg, layout)]
    if what == "generate":
        if model_cfg.block_size > 0:  # the cached block decoder and its AR baseline
            return [cached_generate_program(cfg, model_cfg, layout),
                    cached_generate_program(cfg, model_cfg, layout, block_size=1)]
        return [generate_program(cfg, model_cfg, layout)]
    raise ValueError(f"--what {what!r} is not one of train, eval, generate, decode")


# ------------------------------------------------------------------------------ sizes


def bytes_per_device(tree) -> int:
    """HBM one device holds for a pytree of sharded ShapeDtypeStructs (its shard of each)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total

