"""Training-time evaluation reports what ``diffujax eval`` reports on the same rows.

The training side runs the compiled eval step on an 8-device mesh, batch by batch, then
``heldout_nll``; the reference is ``evaluate.evaluate`` (one device, its own batching). Both are
``elbo_terms`` + ``summarize_nll``, so the NELBO and its error bar over sequences must agree up
to float rounding; the AR baseline as well.
"""

import dataclasses

import jax
import numpy as np
import pytest

from diffujax.config import from_dict
from diffujax.inference.perplexity import evaluate
from diffujax.models import LlamaConfig, apply_fn_for, init_params, param_shardings
from diffujax.parallel.mesh import make_layout
from diffujax.runtime import LoadedModel
from diffujax.train.step import heldout_nll, make_eval_step

V, L, B, BATCHES, SEED = 48, 16, 8, 3, 5
MODEL = LlamaConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, mask_token_id=V - 1)


@pytest.fixture(scope="module")
def setup():
    cfg = from_dict({"model": {"init": {"family": "llama", "vocab_size": V, "hidden_size": 32,
                                        "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                        "intermediate_size": 64}, "dtype": "float32"},
                     "diffusion": {"mask_token_id": V - 1}, "data": {"global_batch": B,
                                                                     "seq_len": L}})
    apply_fn, params = apply_fn_for(MODEL), init_params(MODEL, seed=1)
    rows = np.random.default_rng(0).integers(0, V - 1, (BATCHES * B, L)).astype(np.int32)
    layout = make_layout(cfg.mesh)
    sharded = jax.device_put(params, param_shardings(MODEL, layout))
    batches = [layout.make_global_batch({"tokens": rows[i * B:(i + 1) * B]})
               for i in range(BATCHES)]
    reference = LoadedModel(MODEL, apply_fn, params, tokenizer=None)
    return cfg, apply_fn, layout, sharded, batches, rows, reference


@pytest.mark.parametrize("kind, loss_chunk", [("elbo", 0), ("ar", 0), ("elbo", 6), ("ar", 6)])
def test_training_eval_equals_diffujax_eval(setup, kind, loss_chunk):
    """Also with ``model.loss_chunk`` (the cross-entropy over chunks of 6 of the 16 positions)."""
    cfg, apply_fn, layout, sharded, batches, rows, reference = setup
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, loss_chunk=loss_chunk))
    step = make_eval_step(cfg, MODEL, apply_fn, layout, kind=kind)
    ours = heldout_nll(step, sharded, batches, jax.random.key(SEED), kind=kind)
    ref = evaluate(reference, rows, objective="ar" if kind == "ar" else "diffusion", draws=1,
                   batch_size=B, seed=SEED)
    assert (ours.num_tokens, ours.num_sequences) == (ref.num_tokens, ref.num_sequences)
    assert ours.num_tokens == BATCHES * B * (L - 1) and ours.num_draws == ref.num_draws
    np.testing.assert_allclose(ours.mean_nll, ref.mean_nll, rtol=2e-6)
    np.testing.assert_allclose(ours.std_error, ref.std_error, rtol=1e-4)
    assert 0 < ours.std_error < 0.2 * ours.mean_nll  # a real error bar over 24 sequences


def test_block_model_training_eval_equals_diffujax_eval(setup):
    """A block model (its config's ``block_size``, 5 here: blocks of 5, 5, 5 and 1): the held-out
    bound of training is the block NELBO, as ``diffujax eval`` reports it."""
    cfg, apply_fn, layout, sharded, batches, rows, reference = setup
    block_model = MODEL.replace(block_size=5)
    step = make_eval_step(cfg, block_model, apply_fn, layout, kind="elbo")
    ours = heldout_nll(step, sharded, batches, jax.random.key(SEED))
    ref = evaluate(dataclasses.replace(reference, config=block_model), rows,
                   objective="diffusion", draws=1, batch_size=B, seed=SEED)
    full = evaluate(reference, rows, objective="diffusion", draws=1, batch_size=B, seed=SEED)
    assert ours.num_tokens == ref.num_tokens == BATCHES * B * (L - 1)
    np.testing.assert_allclose(ours.mean_nll, ref.mean_nll, rtol=2e-6)
    np.testing.assert_allclose(ours.std_error, ref.std_error, rtol=1e-4)
    assert abs(ours.mean_nll - full.mean_nll) > 1e-3  # not the full-sequence bound
