"""LoRA training (``model.lora``, models/lora.py). References: the adapters' formula written out
in numpy (``W + (alpha / r) * A @ B``), the unadapted network, the optimizer state itself (which
leaves it holds), the single-device run for the sharded one, and ``peft`` loading the exported
adapter onto the transformers model (tests/checkpoint for that one)."""

import dataclasses
import functools
import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from diffujax.attention import causal
from diffujax.config import ConfigError
from diffujax.models import flatten, forward, lora
from diffujax.parallel.mesh import make_layout
from diffujax.train.state import create_train_state, model_params

HERE = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("train_worker", HERE / "train_worker.py")
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

LORA = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj", "o_proj", "down_proj"]}


@functools.cache
def trained(data=1, fsdp=1, tensor=1, block_size=0):
    cfg = W.make_config("llama", data, fsdp, tensor, model__lora=LORA,
                        diffusion__block_size=block_size)
    state, history = W.run(cfg, jax.devices()[: data * fsdp * tensor])
    return cfg, state, history


def test_only_the_adapters_train():
    cfg, state, history = trained()
    model_cfg = cfg.resolve_model_config()
    layout = make_layout(cfg.mesh, jax.devices()[:1])
    base = create_train_state(cfg, model_cfg, layout).frozen
    # the base is untouched, bit for bit
    for path, value in flatten(base).items():
        np.testing.assert_array_equal(np.asarray(flatten(state.frozen)[path]), value, path)
    # the optimizer holds moments for the adapters and nothing else
    spec = cfg.lora_spec(model_cfg)
    adapters = set(lora.adapter_shapes(model_cfg, spec))
    moments = {p for p in flatten(jax.tree.map(lambda _: 0, state.params))}
    assert moments == adapters
    mu = state.opt_state[1][0].mu  # clip_by_global_norm, then adamw's scale_by_adam
    assert set(flatten(mu)) == adapters
    # the adapters moved (B starts at zero), every step applied
    assert all(np.abs(np.asarray(flatten(state.params)[p])).max() > 0
               for p in adapters if p.endswith("_lora_b"))
    assert all(m["skipped"] == 0 for m in history)


def test_adapted_model_equals_the_merged_weights():
    cfg, state, _ = trained()
    model_cfg = cfg.resolve_model_config()
    spec = cfg.lora_spec(model_cfg)
    base, adapters = flatten(state.frozen), flatten(state.params)
    merged = flatten(lora.merged(model_cfg, spec, state.frozen, state.params))
    for target in spec.targets:  # W + (alpha / r) * A @ B, written out per layer in numpy
        path = lora.projections(model_cfg)[target]
        a, b = np.asarray(adapters[path + "_lora_a"]), np.asarray(adapters[path + "_lora_b"])
        for i in range(a.shape[0]):
            delta = a[i].reshape(-1, spec.rank) @ b[i].reshape(spec.rank, -1)
            expected = np.asarray(base[path][i]) + spec.alpha / spec.rank * delta.reshape(
                base[path][i].shape)
            np.testing.assert_allclose(merged[path][i], expected, rtol=1e-6, atol=1e-7)
    untouched = set(base) - {lora.projections(model_cfg)[t] for t in spec.targets}
    assert all(np.array_equal(merged[p], base[p]) for p in untouched)
    tokens = np.asarray(W.global_batches(1)[0]["tokens"])
    adapted = lora.forward(model_cfg, spec, model_params(state), tokens, causal())
    plain = forward(model_cfg, lora.merged(model_cfg, spec, state.frozen, state.params), tokens,
                    causal())
    np.testing.assert_allclose(adapted, plain, rtol=2e-5, atol=2e-5)
    assert np.abs(np.asarray(adapted) - np.asarray(forward(model_cfg, state.frozen, tokens,
                                                          causal()))).max() > 1e-3


def test_sharded_lora_step_matches_single_device():
    one, sharded = trained(), trained(2, 2, 2)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in sharded[2]], [m[key] for m in one[2]],
                                   rtol=2e-5)
    for x, y in zip(jax.tree.leaves(sharded[1].params), jax.tree.leaves(one[1].params),
                    strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)


def test_lora_trains_block_diffusion_on_a_mesh():
    cfg, state, history = trained(2, 2, 2, block_size=4)
    assert all(m["skipped"] == 0 and np.isfinite(m["loss"]) for m in history)
    one = trained(block_size=4)
    np.testing.assert_allclose([m["loss"] for m in history], [m["loss"] for m in one[2]],
                               rtol=2e-5)


@pytest.mark.parametrize("fields,message", [
    ({"targets": ["q_proj", "w_nope"]}, r"model.lora.targets: \['w_nope'\] not among"),
    ({"rank": 0}, r"model.lora.rank: 0 must be >= 1"),
    ({"rank": 40}, r"model.lora.rank 40: must be 1..16"),
    ({"alpha": -1}, r"model.lora.alpha: -1.0 must be > 0"),
    ({"dropout": 1.0}, "model.lora.dropout: 1.0 must be < 1"),
])
def test_bad_lora_settings_are_refused_by_name(fields, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        cfg = W.make_config("llama", model__lora={**LORA, **fields})
        cfg.check_model(cfg.resolve_model_config(), "model.init")


def test_lora_model_flops_count_no_weight_gradient_for_the_base():
    from diffujax.models import matmul_params
    from diffujax.runs.flops import attention_flops_per_token
    from diffujax.train.state import model_flops_per_token

    cfg = W.make_config("llama", model__lora=LORA)
    model_cfg = cfg.resolve_model_config()
    d, f, r = 32, 64, LORA["rank"]
    # q: [d, 4 x 8] and v: [d, 2 x 8] per layer, o: [4 x 8, d], down: [f, d]; A + B each
    adapters = 2 * r * ((d + 32) + (d + 16) + (32 + d) + (f + d))
    assert lora.adapter_params(model_cfg, cfg.lora_spec(model_cfg)) == adapters
    attention = attention_flops_per_token(model_cfg, W.SEQ_LEN)
    assert model_flops_per_token(cfg, model_cfg) == (4 * matmul_params(model_cfg)
                                                    + 6 * adapters + attention)
    full = W.make_config("llama")
    assert model_flops_per_token(full, model_cfg) == 6 * matmul_params(model_cfg) + attention


def test_lora_dropout_drops_the_adapters_input_only():
    cfg, state, _ = trained()
    model_cfg = cfg.resolve_model_config()
    spec = dataclasses.replace(cfg.lora_spec(model_cfg), dropout=0.5)
    tokens = np.asarray(W.global_batches(1)[0]["tokens"])
    run = jax.jit(lambda p, key: lora.forward(model_cfg, spec, p, tokens, causal(),
                                              dropout_key=key))
    # fresh adapters (B = 0) add nothing, dropped out or not: the base model's logits exactly
    fresh = lora.join(state.frozen, lora.init_adapters(model_cfg, spec, 0))
    np.testing.assert_array_equal(run(fresh, jax.random.key(1)),
                                  forward(model_cfg, state.frozen, tokens, causal()))
    # trained adapters: a key draws one mask (reproducible), another key another one, and
    # without a key (evaluation) nothing is dropped
    joined = model_params(state)
    plain = lora.forward(model_cfg, spec, joined, tokens, causal())
    np.testing.assert_array_equal(plain, lora.forward(model_cfg, cfg.lora_spec(model_cfg), joined,
                                                      tokens, causal()))
    one, again, other = (run(joined, jax.random.key(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(one, again)
    assert np.abs(np.asarray(one) - np.asarray(plain)).max() > 1e-4
    assert np.abs(np.asarray(one) - np.asarray(other)).max() > 1e-4
