"""A tiny training run shared by the sharding tests, in-process and as a multi-process worker.

In-process: the tests load this file and call ``run``. As a script (one per process)::

    python train_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json FAMILY DATA FSDP TENSOR

joins a ``jax.distributed`` job over gloo, feeds this process's rows of every global batch and
writes the losses and parameter checksums (process 0) as JSON.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

STEPS = 3
GLOBAL_BATCH, SEQ_LEN, VOCAB = 8, 16, 128

MODELS = {
    # GQA: 4 query heads over 2 key/value heads, both divisible by tensor=2.
    "llama": dict(family="llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, intermediate_size=64, tie_word_embeddings=False),
    "gpt2": dict(family="gpt2", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                 intermediate_size=64, max_positions=SEQ_LEN),
}


def make_config(family="llama", data=1, fsdp=1, tensor=1, **overrides):
    from diffujax.config import from_dict

    raw = {
        "model": {"init": MODELS[family], "dtype": "float32"},
        "diffusion": {"mask_token_id": 3, "anneal_steps": 4, "anneal_seed": 7},
        "data": {"global_batch": GLOBAL_BATCH, "seq_len": SEQ_LEN},
        "optimizer": {"peak_lr": 1e-2, "schedule": "cosine", "warmup_steps": 1, "clip_norm": 1.0,
                      "weight_decay": 0.1},
        "mesh": {"shape": {"data": data, "fsdp": fsdp, "tensor": tensor}},
        "train": {"steps": 10, "seed": 1},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return from_dict(raw)


def global_batches(steps=STEPS):
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        tokens = rng.integers(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN)).astype(np.int32)
        loss_mask = np.ones((GLOBAL_BATCH, SEQ_LEN), bool)
        loss_mask[-1, -3:] = False  # a little filler, so the denominators are not trivial
        out.append({"tokens": tokens, "loss_mask": loss_mask})
    return out


def checksums(params):
    """Per-leaf sum and sum of squares, replicated: readable on every process of a sharded run."""
    import jax
    import jax.numpy as jnp

    fn = jax.jit(lambda p: [(jnp.sum(x), jnp.sum(x * x)) for x in jax.tree.leaves(p)])
    return [[float(a), float(b)] for a, b in fn(params)]


def file_barrier(directory, name: str, index: int, count: int, timeout_s: float = 600) -> None:
    """Wait until all ``count`` processes reached ``name`` (a marker file each in a shared
    directory): no device collective, so it may precede the first one (gloo gives a peer only
    30 s to show up there, and the processes' compile times differ)."""
    marker = lambda i: pathlib.Path(directory, f"{name}.{i}")  # noqa: E731
    marker(index).touch()
    deadline = time.monotonic() + timeout_s
    while not all(marker(i).exists() for i in range(count)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name!r}: not every process arrived in {timeout_s} s")
        time.sleep(0.05)


def run(cfg, devices=None, steps=STEPS, barrier=None):
    """Train ``steps`` steps; returns (state, [metrics per step]). ``barrier()`` (multi-process)
    is called once the step is compiled."""
    import jax

    from diffujax.attention.pattern import is_annealing
    from diffujax.parallel.mesh import make_layout
    from diffujax.train.state import apply_fn_for_run, create_train_state
    from diffujax.train.step import make_train_step

    layout = make_layout(cfg.mesh, devices)
    model_cfg = cfg.resolve_model_config()
    apply_fn = apply_fn_for_run(cfg, model_cfg)
    state = create_train_state(cfg, model_cfg, layout)
    step = make_train_step(cfg, model_cfg, apply_fn, layout)
    index, count = layout.data_shard()
    assert (index, count) == (jax.process_index(), jax.process_count())
    rows = GLOBAL_BATCH // count
    lo = index * rows
    history = []
    for i, batch in enumerate(global_batches(steps)):
        local = layout.make_global_batch({k: v[lo:lo + rows] for k, v in batch.items()})
        annealing = is_annealing(i, cfg.diffusion.anneal_steps)
        if i == 0 and barrier is not None:
            step.lower(state, local, annealing).compile()  # the call below reuses this executable
            barrier()
        state, metrics = step(state, local, annealing)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def main(argv):
    pid, nproc, port, out, family, data, fsdp, tensor = argv
    import jax

    from diffujax.config import MeshSection
    from diffujax.parallel.mesh import maybe_initialize_distributed

    maybe_initialize_distributed(MeshSection(distributed=True, coordinator=f"127.0.0.1:{port}",
                                             num_processes=int(nproc), process_id=int(pid)))
    cfg = make_config(family, int(data), int(fsdp), int(tensor))
    state, history = run(cfg, barrier=lambda: file_barrier(pathlib.Path(out).parent, "compiled",
                                                           int(pid), int(nproc)))
    result = {"process_count": jax.process_count(), "devices": jax.device_count(),
              "losses": [m["loss"] for m in history], "checksums": checksums(state.params)}
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
