"""Tiny LLaMA (GQA) and GPT-2 (with its training dropout) configs, and the functions of their
weights that the layer-loop tests (remat policies, unrolled layers) compare."""

import functools

import jax

from diffujax.diffusion.objective import diffusion_loss_sums
from diffujax.models import GPT2Config, LlamaConfig, apply_fn_for

MASK, LENGTH = 63, 16
CONFIGS = {
    "llama": LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=48, mask_token_id=MASK),
    "gpt2": GPT2Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=4, intermediate_size=64, max_positions=LENGTH,
                       mask_token_id=MASK, embd_pdrop=0.1, resid_pdrop=0.1),
}


def forward_and_loss(config, pattern):
    """``(forward, loss)``, functions of the weights: the model's logits on fixed tokens, and
    the diffusion train loss (GPT-2 with its dropout, fixed keys) under ``pattern``."""
    tokens = jax.random.randint(jax.random.key(1), (2, LENGTH), 0, MASK)
    apply_fn = apply_fn_for(config)
    if isinstance(config, GPT2Config):
        apply_fn = functools.partial(apply_fn, dropout_key=jax.random.key(2))

    def loss(params):
        return diffusion_loss_sums(apply_fn, params, tokens, jax.random.key(3),
                                   mask_token_id=MASK, pattern=pattern).loss

    return (lambda params: apply_fn(params, tokens, pattern)), loss
