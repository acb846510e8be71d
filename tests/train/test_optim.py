"""Schedules against their closed forms, the weight-decay mask, AdamW's decoupled decay, EMA."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffujax.config import OptimizerSection
from diffujax.models import GPT2Config, LlamaConfig, init_params
from diffujax.train.optim import ema_update, make_optimizer, make_schedule, weight_decay_mask

LLAMA = LlamaConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                    intermediate_size=16, tie_word_embeddings=False)
GPT2 = GPT2Config(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
                  intermediate_size=16, max_positions=8)


def lr(schedule, step):
    return float(schedule(jnp.int32(step)))


def test_cosine_schedule():
    s = make_schedule(OptimizerSection(peak_lr=1.0, schedule="cosine", warmup_steps=10,
                                       min_lr_ratio=0.1), total_steps=110)
    assert lr(s, 0) == 0.0 and lr(s, 5) == pytest.approx(0.5) and lr(s, 10) == pytest.approx(1.0)
    # halfway through the decay: end + (peak - end) * (1 + cos(pi / 2)) / 2
    assert lr(s, 60) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
    assert lr(s, 110) == pytest.approx(0.1) and lr(s, 500) == pytest.approx(0.1)


def test_linear_and_constant_schedules():
    s = make_schedule(OptimizerSection(peak_lr=2.0, schedule="linear", warmup_steps=4,
                                       min_lr_ratio=0.0, decay_steps=14), total_steps=1000)
    assert [lr(s, i) for i in (0, 2, 4, 9, 14, 20)] == pytest.approx([0, 1, 2, 1, 0, 0])
    c = make_schedule(OptimizerSection(peak_lr=2e-5, schedule="constant"), total_steps=10)
    assert lr(c, 0) == pytest.approx(2e-5) and lr(c, 10**6) == pytest.approx(2e-5)


def _names(mask, value):
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    return {"/".join(str(k.key) for k in path) for path, v in flat if v == value}


@pytest.mark.parametrize("config,exempt", [
    (LLAMA, {"layers/attn_norm/scale", "layers/mlp_norm/scale", "final_norm/scale"}),
    (GPT2, {"layers/ln1/scale", "layers/ln1/bias", "layers/ln2/scale", "layers/ln2/bias",
            "ln_f/scale", "ln_f/bias", "layers/attn/q_proj/bias", "layers/attn/k_proj/bias",
            "layers/attn/v_proj/bias", "layers/attn/o_proj/bias", "layers/mlp/c_fc/bias",
            "layers/mlp/c_proj/bias"}),
])
def test_norms_and_biases_do_not_decay(config, exempt):
    mask = weight_decay_mask(config)
    assert jax.tree.structure(mask) == jax.tree.structure(init_params(config))
    assert _names(mask, False) == exempt
    assert "layers/attn/q_proj/kernel" in _names(mask, True)
    assert {"embed/embedding", "wte/embedding"} & _names(mask, True)  # embeddings decay (common practice)


def test_adamw_decays_only_the_masked_weights():
    params = init_params(LLAMA)
    opt = OptimizerSection(peak_lr=0.1, schedule="constant", weight_decay=0.5, clip_norm=None)
    tx = make_optimizer(opt, 10, LLAMA)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    p, n = params, new
    np.testing.assert_allclose(n["layers"]["attn"]["q_proj"]["kernel"], p["layers"]["attn"]["q_proj"]["kernel"] * (1 - 0.1 * 0.5),
                               rtol=1e-6)
    np.testing.assert_array_equal(n["final_norm"]["scale"], p["final_norm"]["scale"])


@pytest.mark.parametrize("config", [LLAMA, GPT2])
def test_weight_decay_scope_all_decays_every_parameter_as_the_reference(config):
    """The reference's one parameter group: with zero gradients (Adam's update is 0) every
    parameter, norm scales and biases included, becomes ``p * (1 - lr * wd)``."""
    params = init_params(config)
    opt = OptimizerSection(peak_lr=0.1, schedule="constant", weight_decay=0.5, clip_norm=None,
                           weight_decay_scope="all")
    assert all(jax.tree.leaves(weight_decay_mask(config, "all")))
    tx = make_optimizer(opt, 10, config)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for p, u in zip(jax.tree.leaves(params), jax.tree.leaves(updates)):
        np.testing.assert_allclose(np.asarray(p + u), np.asarray(p) * (1 - 0.1 * 0.5),
                                   rtol=1e-6)


def test_ema_update():
    ema = {"w": jnp.zeros(3)}
    out = ema_update(ema, {"w": jnp.ones(3, jnp.bfloat16)}, 0.9)
    np.testing.assert_allclose(out["w"], 0.1, rtol=1e-6)
    assert out["w"].dtype == jnp.float32 and not math.isnan(float(out["w"][0]))
