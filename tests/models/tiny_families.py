"""Tiny LLaMA (GQA) and GPT-2 (with its training dropout) configs that the layer-loop tests
(remat policies, unrolled layers) share."""

from diffujax.models import GPT2Config, LlamaConfig

MASK, LENGTH = 63, 16
CONFIGS = {
    "llama": LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=48, mask_token_id=MASK),
    "gpt2": GPT2Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=4, intermediate_size=64, max_positions=LENGTH,
                       mask_token_id=MASK, embd_pdrop=0.1, resid_pdrop=0.1),
}
