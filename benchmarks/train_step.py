"""One training step, diffujax vs plain PyTorch + transformers, on the same machine.

    python benchmarks/train_step.py                         # CPU: SmolLM2-135M at L = 256
    python benchmarks/train_step.py --batch 8 --steps 5
    python benchmarks/train_step.py --gpu                   # GPU: SmolLM2 and a 1.1B LLaMA, L = 2048
    python benchmarks/train_step.py --model tiny --batch 2 --seq-len 16 --steps 1   # smoke test

Both sides take the same step: the masked-diffusion loss (docs/algorithms.md §2: the same noised
batch x_t, the same noise mask and t, shift, ``1/t`` weights, "masked" normalisation) with full
bidirectional attention, its gradient, global-norm clipping at 1.0 and AdamW, on the same
weights. diffujax runs its real ``make_train_step`` (what ``diffujax train`` runs: noise drawn
inside the step from the step's key); the torch side is the straightforward implementation
(``LlamaForCausalLM`` with an all-zero 4D additive mask, ``torch.optim.AdamW``). The batch's
noise is drawn once with diffujax's own ``forward_process`` and the same key, so the first-step
losses must agree (printed as a check). Times exclude compilation / a warm-up step, and the two
sides take turns, one step each, so a change in the machine's load (a shared machine) hits both
alike; reported: tokens per second (``B * L / step time``, median of ``--steps``) side by side,
their ratio, and on a GPU the MFU (model FLOPs: 6N + full attention, ``runs/flops.py``).

What it measures is the step alone, on a batch already on the device: not what ``diffujax train``
does around it (the data pipeline, attention-mask annealing, packed-document segment masks,
per-step metrics, logging, evaluation, checkpoints; README, "Benchmarks").

Models: SmolLM2-135M-Instruct (the embedded default model, ``diffujax default-model``) and, on a
GPU, a TinyLlama-1.1B-shaped LLaMA with random weights (same weights on both sides); ``--model
tiny`` is a 2-layer random LLaMA that checks the script runs (the test suite's smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffujax.attention.pattern import full, is_annealing
from diffujax.checkpoint import load, to_state_dict
from diffujax.checkpoint.smollm2 import default_model
from diffujax.config import from_dict
from diffujax.diffusion.noise import forward_process
from diffujax.models import LlamaConfig, apply_fn_for, init_params
from diffujax.parallel.mesh import make_layout
from diffujax.runs.flops import peak_flops_per_device, train_flops_per_token
from diffujax.train.state import create_train_state
from diffujax.train.step import make_train_step

LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.95), 1e-8, 0.0, 1.0
TINYLLAMA = LlamaConfig(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
                        num_kv_heads=4, intermediate_size=5632, max_positions=2048,
                        tie_word_embeddings=False, mask_token_id=31999, bos_token_id=1,
                        eos_token_id=2)
TINY = LlamaConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=64, max_positions=64, tie_word_embeddings=False,
                   mask_token_id=99, bos_token_id=0, eos_token_id=1)
MODELS = ("smollm2", "tinyllama-1.1b", "tiny")


def run_config(config, batch: int, seq_len: int, dtype: str):
    """The diffujax run config of the step (one device, full attention from step 0). Its
    ``model.init`` describes the benchmarked model (whose weights ``models`` supplies), so the
    config's checks (mask token, heads, positions) are those of a real run of that model."""
    init = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in ("attention", "extra_hf", "block_size")}  # not model.init fields
    return from_dict({
        "output_dir": "unused",
        "model": {"init": {"family": config.family, **init}, "dtype": dtype,
                  "param_dtype": "float32"},
        "diffusion": {"anneal_steps": 0, "normalization": "masked"},
        "data": {"seq_len": seq_len, "global_batch": batch},
        "optimizer": {"peak_lr": LR, "schedule": "constant", "b1": BETAS[0], "b2": BETAS[1],
                      "eps": EPS, "weight_decay": WEIGHT_DECAY, "clip_norm": CLIP},
        "mesh": {"shape": {"data": 1, "fsdp": 1, "tensor": 1}},
        "train": {"steps": 1000},
    })


def models(name: str, dtype: str):
    """``(model_cfg, params)``: the same weights for both sides."""
    if name == "smollm2":
        config, params = load(default_model(), dtype="float32")
    else:
        config = TINYLLAMA if name == "tinyllama-1.1b" else TINY
        params = init_params(config, seed=0)
    return config.replace(dtype=dtype, param_dtype="float32"), params


def the_batch(config, batch: int, seq_len: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.mask_token_id, (batch, seq_len), dtype=np.int32)
    tokens[:, 0] = config.bos_token_id or 0
    return tokens


def time_in_turns(step_fns, steps: int) -> list[float]:
    """Median seconds per call of each of ``step_fns`` after one warm-up call each, the functions
    taking turns (one call each per round, ``steps`` rounds)."""
    for once in step_fns:
        once()
    times = [[] for _ in step_fns]
    for _ in range(steps):
        for once, seconds in zip(step_fns, times):
            t0 = time.perf_counter()
            once()
            seconds.append(time.perf_counter() - t0)
    return [statistics.median(seconds) for seconds in times]


def diffujax_side(config, params, tokens, cfg):
    """``(first-step loss, a function that runs one more step)``."""
    layout = make_layout(cfg.mesh, jax.devices()[:1])
    apply_fn = apply_fn_for(config)
    state = create_train_state(cfg, config, layout, params=params)
    step = make_train_step(cfg, config, apply_fn, layout)
    batch = layout.make_global_batch({"tokens": tokens})
    holder = {"state": state}
    # the program a run takes once annealing is over (here from step 0: anneal_steps is 0)
    phase = is_annealing(0, cfg.diffusion.anneal_steps)
    state, metrics = step(state, batch, phase)  # compiles; its loss is the first step's
    first_loss = float(metrics["loss"])
    holder["state"] = state

    def once():
        holder["state"], m = step(holder["state"], batch, phase)
        jax.block_until_ready(m["loss"])

    return first_loss, once


def torch_side(config, params, tokens, noised, device: str, dtype: str):
    """``(first-step loss, a function that runs one more step)``."""
    import torch  # optional: the torch extra
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    state = {k: torch.from_numpy(np.array(v, np.float32))
             for k, v in to_state_dict(config, params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise SystemExit(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    if "lm_head.weight" in missing:
        model.tie_weights()
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                  weight_decay=WEIGHT_DECAY)
    x_t = torch.as_tensor(np.array(noised.x_t), dtype=torch.long, device=device)  # writable copies
    x0 = torch.as_tensor(tokens, dtype=torch.long, device=device)
    noise = torch.as_tensor(np.array(noised.noise), device=device)[:, 1:]
    t = torch.as_tensor(np.array(noised.t), device=device)
    b, length = tokens.shape
    full_attention = torch.zeros(b, 1, length, length, device=device)
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16)
                if dtype == "bfloat16" else torch.autocast(device_type="cpu", enabled=False))

    def loss_fn():
        with autocast:
            logits = model(input_ids=x_t, attention_mask=full_attention).logits
        # shift: logits at i predict token i + 1; weight 1/t on noised targets; "masked" norm
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), x0[:, 1:],
                                               reduction="none")
        return (torch.where(noise, ce, 0.0) / t[:, None]).sum() / noise.sum().clamp(min=1)

    def once():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.detach()

    first_loss = float(once())  # the same weights and batch as diffujax's first step
    return first_loss, once


def bench(name: str, batch: int, seq_len: int, steps: int, dtype: str, device: str) -> dict:
    config, params = models(name, dtype)
    cfg = run_config(config, batch, seq_len, dtype)
    tokens = the_batch(config, batch, seq_len)
    # The step's noise: key fold_in(seed, step 0), as make_train_step draws it.
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), 0)
    noised = forward_process(key, jnp.asarray(tokens), mask_token_id=config.mask_token_id,
                             eps=cfg.diffusion.eps, global_batch=batch)
    jax_loss, jax_once = diffujax_side(config, params, tokens, cfg)
    torch_loss, torch_once = torch_side(config, params, tokens, noised, device, dtype)
    jax_s, torch_s = time_in_turns([jax_once, torch_once], steps)
    flops = train_flops_per_token(config, seq_len) * batch * seq_len
    peak = peak_flops_per_device()
    return dict(model=name, batch=batch, seq_len=seq_len, dtype=dtype,
                jax_loss=jax_loss, torch_loss=torch_loss,
                jax_tokens_s=batch * seq_len / jax_s, torch_tokens_s=batch * seq_len / torch_s,
                jax_mfu=flops / jax_s / peak if peak else None,
                torch_mfu=flops / torch_s / peak if peak else None)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="bf16 on the GPU: SmolLM2 and 1.1B, L=2048")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (median)")
    p.add_argument("--model", choices=MODELS, default=None,
                   help="one model only (default: SmolLM2; with --gpu, SmolLM2 and the 1.1B)")
    args = p.parse_args(argv)
    if args.gpu:
        runs = [("smollm2", args.batch or 16), ("tinyllama-1.1b", args.batch or 8)]
        seq_len, dtype, device = args.seq_len or 2048, "bfloat16", "cuda"
    else:
        runs = [("smollm2", args.batch or 4)]
        seq_len, dtype, device = args.seq_len or 256, "float32", "cpu"
    if args.model:
        runs = [(args.model, runs[0][1])]
    print(f"{jax.devices()[0].device_kind}: one train step (masked-diffusion loss, full"
          f" attention, AdamW, clip {CLIP}), {dtype}")
    print(f"{'model':<16}{'B x L':>12}{'loss jax / torch':>22}{'diffujax tok/s':>16}"
          f"{'torch tok/s':>14}{'ratio':>8}{'MFU jax / torch':>18}")
    results = []
    for name, batch in runs:
        r = bench(name, batch, seq_len, args.steps, dtype, device)
        results.append(r)
        mfu = ("n/a" if r["jax_mfu"] is None
               else f"{100 * r['jax_mfu']:.0f}% / {100 * r['torch_mfu']:.0f}%")
        print(f"{name:<16}{f'{batch} x {seq_len}':>12}"
              f"{r['jax_loss']:>11.4f} / {r['torch_loss']:<8.4f}{r['jax_tokens_s']:>16,.0f}"
              f"{r['torch_tokens_s']:>14,.0f}{r['jax_tokens_s'] / r['torch_tokens_s']:>8.2f}"
              f"{mfu:>18}", flush=True)
    return results


if __name__ == "__main__":
    main()
