"""Loss parity with PyTorch. Reference: the docs/algorithms.md §2 loss written in plain torch on a
transformers ``LlamaForCausalLM`` run with full (bidirectional) attention, fed the same ``t`` and
noise mask.

Two levels: (1) diffujax's loss on the logits torch computed (checks the loss math alone);
(2) diffujax's loss on diffujax's own Llama holding the same weights, converted with
``diffujax.checkpoint.from_state_dict`` (checks converter + model + loss together).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from diffujax.attention.pattern import full
from diffujax.checkpoint import from_state_dict
from diffujax.diffusion import diffusion_loss_sums, forward_process
from diffujax.models import apply_fn_for, init_params

B, L, V, M = 3, 12, 97, 96
HF_CONFIG = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**HF_CONFIG, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


def torch_logits(model, x_t):
    """Full attention: a custom 4D additive mask of zeros replaces the causal one."""
    ids = torch.tensor(np.asarray(x_t), dtype=torch.long)
    open_mask = torch.zeros(ids.shape[0], 1, ids.shape[1], ids.shape[1])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=open_mask).logits.float()


def torch_reference_loss(logits, x, noise, t, src, normalization):
    """docs/algorithms.md §2.4-2.6 in torch."""
    x, noise, t, src = (torch.tensor(np.array(a)) for a in (x, noise, t, src))
    x = x.long()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1),
                                           reduction="none").view(x.shape[0], -1)
    weight = noise[:, 1:].float() / t[:, None]
    if normalization == "masked":
        return (weight * ce).sum() / noise[:, 1:].sum()
    return (weight * ce).sum() / (~src[:, 1:]).sum()


NORMALIZATIONS = ("masked", "tokens")


def _batch():
    x = jax.random.randint(jax.random.key(0), (B, L), 0, V - 1)
    src = jnp.zeros((B, L), bool).at[:, :3].set(True)
    return x, src


def _diffujax_losses(apply_fn, params, x, src, key):
    """Both normalisations in one compiled function."""
    def losses(p):
        return {n: diffusion_loss_sums(apply_fn, p, x, key, mask_token_id=M, pattern=full(),
                                       src=src, normalization=n).loss for n in NORMALIZATIONS}
    return jax.jit(losses)(params)


def _check(losses, torch_model, x, src, key):
    noised = forward_process(key, x, mask_token_id=M, src=src)
    logits = torch_logits(torch_model, noised.x_t)
    for n in NORMALIZATIONS:
        expected = torch_reference_loss(logits, x, noised.noise, noised.t, src, n)
        np.testing.assert_allclose(float(losses[n]), float(expected), rtol=1e-5, err_msg=n)


def test_loss_on_torch_logits_matches_torch_reference(torch_model):
    x, src = _batch()
    key = jax.random.key(1)
    x_t = forward_process(key, x, mask_token_id=M, src=src).x_t
    logits = jnp.asarray(torch_logits(torch_model, x_t).numpy())

    def replay(params, tokens, pattern):  # "the model" returns what torch computed from x_t
        return params

    _check(_diffujax_losses(replay, logits, x, src, key), torch_model, x, src, key)


def _diffujax_llama(torch_model):
    """diffujax's Llama holding the torch weights, through the checkpoint converter."""
    config, params = from_state_dict(torch_model.config.to_dict(), torch_model.state_dict())
    apply_fn, _ = apply_fn_for(config), init_params(config, seed=0)
    return apply_fn, params


def test_loss_on_diffujax_llama_matches_torch_reference(torch_model):
    apply_fn, params = _diffujax_llama(torch_model)
    x, src = _batch()
    key = jax.random.key(2)
    _check(_diffujax_losses(apply_fn, params, x, src, key), torch_model, x, src, key)
