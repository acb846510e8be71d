"""GPT-2's training dropout (HF's embd_pdrop / resid_pdrop): read from config.json with HF's
defaults, applied only with a dropout key (training), drawn from the step so reruns and resumes
are exact, off with ``model.dropout: false``; never in evaluation or sampling."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffujax.attention.pattern import full
from diffujax.models import GPT2Config, apply_fn_for, init_params
from diffujax.models.layers import dropout

_spec = importlib.util.spec_from_file_location(
    "train_worker", pathlib.Path(__file__).resolve().parents[1] / "train" / "train_worker.py")
train_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_worker)

HF = dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)


def test_rates_come_from_config_json_with_hf_defaults():
    default = GPT2Config.from_hf(HF)
    assert (default.embd_pdrop, default.resid_pdrop, default.attn_pdrop) == (0.1, 0.1, 0.1)
    explicit = GPT2Config.from_hf(dict(HF, resid_pdrop=0.0, embd_pdrop=0.2))
    assert (explicit.embd_pdrop, explicit.resid_pdrop) == (0.2, 0.0)
    assert {k: explicit.to_hf()[k] for k in ("embd_pdrop", "resid_pdrop", "attn_pdrop")} == \
        dict(embd_pdrop=0.2, resid_pdrop=0.0, attn_pdrop=0.1)


def test_dropout_zeroes_at_the_rate_and_rescales_the_rest():
    x = jnp.full((200, 500), 3.0)
    y = np.asarray(dropout(x, 0.25, jax.random.key(0)))
    dropped = (y == 0).mean()
    assert abs(dropped - 0.25) < 4 * np.sqrt(0.25 * 0.75 / y.size)
    np.testing.assert_allclose(y[y != 0], 3.0 / 0.75, rtol=1e-6)
    assert dropout(x, 0.0, jax.random.key(0)) is x


def test_the_model_drops_only_with_a_key():
    config = GPT2Config.from_hf(HF)
    apply_fn, params = apply_fn_for(config), init_params(config, seed=0)
    apply_fn = jax.jit(apply_fn)
    no_rates = init_params(config.replace(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0),
                           seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    plain = apply_fn(params, tokens, full())
    np.testing.assert_array_equal(plain, apply_fn(no_rates, tokens, full()))
    key = jax.random.key(1)
    dropped = apply_fn(params, tokens, full(), dropout_key=key)
    assert not np.allclose(dropped, plain)
    np.testing.assert_array_equal(dropped, apply_fn(params, tokens, full(), dropout_key=key))
    assert not np.allclose(dropped, apply_fn(params, tokens, full(),
                                             dropout_key=jax.random.key(2)))


def _losses(**overrides):
    gpt2 = dict(train_worker.MODELS["gpt2"], **overrides.pop("rates", {}))
    cfg = train_worker.make_config("gpt2", **overrides)
    cfg = type(cfg)(**{**cfg.__dict__, "model": type(cfg.model)(**{**cfg.model.__dict__,
                                                                    "init": gpt2})})
    _, history = train_worker.run(cfg, devices=jax.devices()[:1], steps=1)
    return [h["loss"] for h in history]


def test_train_step_drops_out_reproducibly_and_can_be_turned_off():
    rates = dict(embd_pdrop=0.1, resid_pdrop=0.1)
    with_dropout = _losses(rates=rates)
    assert with_dropout == _losses(rates=rates)  # masks follow from the step: exact reruns
    off = _losses(rates=rates, model__dropout=False)
    assert off == _losses()  # model.dropout: false is the same run as a model without rates
    assert with_dropout[0] != pytest.approx(off[0], rel=1e-6)
