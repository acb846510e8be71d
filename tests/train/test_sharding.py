"""Sharded training steps against the same steps on one device (the independent reference: the
unsharded computation of the same math), plus accumulation, the non-finite skip and a
2-process x 4-device run against 1 process x 8 devices."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("train_worker", HERE / "train_worker.py")
train_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_worker)


@functools.cache
def trained(family, data=1, fsdp=1, tensor=1, accum=1):
    cfg = train_worker.make_config(family, data, fsdp, tensor, optimizer__grad_accum_steps=accum)
    state, history = train_worker.run(cfg, jax.devices()[: data * fsdp * tensor])
    return cfg, state, history


def leaves(tree, skip=()):
    """The leaves of ``tree`` except those whose weight path (``layers/attn/k_proj/bias``, inside
    the optimizer state too) ends in one of ``skip``."""
    def path_of(path):
        return "/".join(str(k.key) for k in path if hasattr(k, "key"))

    return [np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if not path_of(path).endswith(skip)]


# GPT-2's key bias gets no gradient at all (softmax ignores a shift shared by all keys), only
# rounding noise, which Adam then scales up: it differs between any two summation orders.
NOISE_ONLY = ("layers/attn/k_proj/bias",)


def assert_same_run(a, b, rtol=2e-5, atol=2e-6):
    (_, state_a, hist_a), (_, state_b, hist_b) = a, b
    for key in ("loss", "unweighted_masked_loss", "grad_norm", "target_tokens", "lr"):
        np.testing.assert_allclose([m[key] for m in hist_a], [m[key] for m in hist_b], rtol=rtol,
                                   err_msg=key)
    for x, y in zip(leaves(state_a.params, NOISE_ONLY), leaves(state_b.params, NOISE_ONLY),
                    strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
    for x, y in zip(leaves(state_a.opt_state, NOISE_ONLY), leaves(state_b.opt_state, NOISE_ONLY),
                    strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family,mesh", [("llama", (2, 2, 2)), ("llama", (1, 4, 2)),
                                         ("gpt2", (2, 2, 2))])
def test_sharded_step_matches_single_device(family, mesh):
    reference = trained(family)
    sharded = trained(family, *mesh)
    assert all(m["skipped"] == 0 for m in sharded[2])
    assert sharded[2][0]["loss"] != sharded[2][-1]["loss"]  # it did train
    assert_same_run(sharded, reference)


def _specs(tree):
    return {"/".join(str(k.key) for k in path if hasattr(k, "key")): x.sharding.spec
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


LLAMA_SPECS = {  # DEFAULT_RULES: embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor
    "embed/embedding": P("tensor", "fsdp"),
    "lm_head": P("fsdp", "tensor"),
    "final_norm/scale": P("fsdp"),
    "layers/attn_norm/scale": P(None, "fsdp"),
    "layers/attn/q_proj/kernel": P(None, "fsdp", "tensor", None),
    "layers/attn/k_proj/kernel": P(None, "fsdp", "tensor", None),
    "layers/attn/v_proj/kernel": P(None, "fsdp", "tensor", None),
    "layers/attn/o_proj/kernel": P(None, "tensor", None, "fsdp"),
    "layers/mlp/gate_proj/kernel": P(None, "fsdp", "tensor"),
    "layers/mlp/up_proj/kernel": P(None, "fsdp", "tensor"),
    "layers/mlp/down_proj/kernel": P(None, "tensor", "fsdp"),
    "layers/mlp_norm/scale": P(None, "fsdp"),
}


def test_params_and_optimizer_state_are_sharded_as_the_rules_say():
    _, state, _ = trained("llama", 2, 2, 2)
    specs = _specs(state.params)
    assert specs == LLAMA_SPECS
    wq = state.params["layers"]["attn"]["q_proj"]["kernel"]
    assert len(wq.addressable_shards) == 8
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)  # (n, d / fsdp, h / tensor, hd)
    # Adam's moments are laid out like the params; the counters are replicated.
    adam = state.opt_state[1][0]
    assert _specs(adam.mu) == LLAMA_SPECS and _specs(adam.nu) == LLAMA_SPECS
    assert adam.count.sharding.spec == P() and state.step.sharding.spec == P()


def test_gradient_accumulation_gives_the_same_update():
    assert_same_run(trained("llama", 2, 2, 2, accum=2), trained("llama", 2, 2, 2))


def test_non_finite_step_is_skipped_and_counted():
    from diffujax.attention.pattern import is_annealing
    from diffujax.models import apply_fn_for
    from diffujax.parallel.mesh import make_layout
    from diffujax.train.step import make_train_step

    cfg, trained_state, _ = trained("llama")
    state = jax.tree.map(jnp.copy, trained_state)  # the step donates its input
    layout = make_layout(cfg.mesh, jax.devices()[:1])
    model_cfg = cfg.resolve_model_config()
    step = make_train_step(cfg, model_cfg, apply_fn_for(model_cfg), layout)
    batch = layout.make_global_batch(train_worker.global_batches(1)[0])

    clean = state.params["final_norm"]["scale"]
    state.params["final_norm"]["scale"] = clean.at[0].set(jnp.nan)
    before = leaves((state.params, state.opt_state))
    for expected_bad in (1, 2):
        state, metrics = step(state, batch, is_annealing(int(state.step), cfg.diffusion.anneal_steps))
        assert metrics["skipped"] == 1 and not np.isfinite(metrics["loss"])
        assert int(state.bad_steps) == expected_bad and int(state.total_bad_steps) == expected_bad
        for x, y in zip(before, leaves((state.params, state.opt_state)), strict=True):
            np.testing.assert_array_equal(x, y)  # nothing moved (NaN compares equal here)
    assert int(state.step) == train_worker.STEPS + 2
    assert int(state.applied_steps) == train_worker.STEPS

    state.params["final_norm"]["scale"] = clean
    state, metrics = step(state, batch, is_annealing(int(state.step), cfg.diffusion.anneal_steps))
    assert metrics["skipped"] == 0 and np.isfinite(metrics["loss"])
    assert int(state.bad_steps) == 0 and int(state.total_bad_steps) == 2
    # the skips did not advance Adam
    assert int(state.opt_state[1][0].count) == train_worker.STEPS + 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.integration  # two processes joined by gloo
def test_two_processes_match_one_process(tmp_path):
    """2 processes x 4 CPU devices (gloo) == 1 process x 8 devices, same global batches."""
    port, out = _free_port(), tmp_path / "result.json"
    # No persistent compilation cache in the workers: only process 0 would hit it, and a process
    # that compiles much longer than its peer makes the peer's gloo set-up time out (30 s).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, str(HERE / "train_worker.py"), str(i), "2",
                               str(port), str(out), "llama", "2", "2", "2"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    result = json.loads(out.read_text())
    assert result["process_count"] == 2 and result["devices"] == 8

    _, state, history = trained("llama", 2, 2, 2)
    np.testing.assert_allclose(result["losses"], [m["loss"] for m in history], rtol=2e-5)
    np.testing.assert_allclose(result["checksums"], train_worker.checksums(state.params), rtol=2e-5,
                               atol=1e-6)


def test_after_the_ramp_the_full_attention_step_computes_the_same_update():
    """Once r = 1 the annealed pattern is all open, so the full-attention phase the training loop
    switches to must give the same update, bit for bit (reference: the annealing phase itself);
    the loop switches exactly there (``is_annealing``)."""
    from diffujax.attention.pattern import is_annealing
    from diffujax.models import apply_fn_for
    from diffujax.parallel.mesh import make_layout
    from diffujax.train.state import create_train_state
    from diffujax.train.step import make_train_step

    cfg = train_worker.make_config("llama")  # anneal_steps = 4: r = 1 from step 3 on
    phases = [is_annealing(s, cfg.diffusion.anneal_steps) for s in range(5)]
    assert phases == [True, True, True, False, False]
    layout = make_layout(cfg.mesh, jax.devices()[:1])
    model_cfg = cfg.resolve_model_config()
    step = make_train_step(cfg, model_cfg, apply_fn_for(model_cfg), layout)
    state = create_train_state(cfg, model_cfg, layout)
    batches = [layout.make_global_batch(b) for b in train_worker.global_batches(4)]
    for batch in batches[:3]:
        state, _ = step(state, batch, True)
    copy = jax.tree.map(jnp.copy, state)
    a, metrics_a = step(state, batches[3], True)
    b, metrics_b = step(copy, batches[3], False)
    assert float(metrics_a["loss"]) == float(metrics_b["loss"])
    for x, y in zip(leaves(a.params), leaves(b.params)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_chunked_cross_entropy_gives_the_same_run(family, monkeypatch):
    """``model.loss_chunk`` (16 positions in chunks of 6: three, the last padded) on a sharded
    mesh: the same losses, gradients and updates as the full logits."""
    from diffujax.diffusion import objective

    chunks = []
    chunked_ce = objective.chunked_cross_entropy
    monkeypatch.setattr(objective, "chunked_cross_entropy",
                        lambda split, targets: chunks.append(split.chunk) or chunked_ce(split,
                                                                                        targets))
    cfg = train_worker.make_config(family, 1, 2, 2, model__loss_chunk=6)
    chunked = (cfg, *train_worker.run(cfg, jax.devices()[:4]))
    assert chunks and set(chunks) == {6}  # the step's loss went through the chunks
    assert_same_run(chunked, trained(family, 1, 2, 2))
