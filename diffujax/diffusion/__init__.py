"""The diffusion math: pure functions of ``(apply_fn, params, tokens, key)``; no model imports.

``apply_fn(params, tokens [B, L], pattern) -> logits [B, L, V]`` is the only contact with a model
(block diffusion, ``blocks.py``, also passes ``positions``: ``apply_fn(params, tokens, pattern,
positions)``; the cached decoders take ``cached_fn(params, tokens, pattern, cache, offset)``).
The losses and likelihoods also take an ``apply_fn`` that returns an ``objective.SplitHead``
(hidden states and output head) in place of the logits: they then compute the cross-entropy
in chunks of positions.
"""

from diffujax.diffusion.blocks import (block_diffusion_loss_sums, block_forward_process,
                                       block_logits, effective_block_size)
from diffujax.diffusion.categorical import (exponential_draws, exponential_from_bits,
                                            filter_logits, race_winner, sample_categorical,
                                            uniform_from_bits)
from diffujax.diffusion.decoding import DecodeOutput, canvas_length, decode_blocks
from diffujax.diffusion.likelihood import (NLLEstimate, ar_nll_terms, conditional_nll,
                                           elbo_terms, multiple_choice_score, summarize_nll)
from diffujax.diffusion.noise import (DEFAULT_EPS, NoisedBatch, apply_noise, forward_process,
                                      row_keys, sample_exact_count_mask, sample_noise_mask,
                                      sample_t)
from diffujax.diffusion.objective import (NORMALIZATIONS, LossSums, ar_loss_sums,
                                          diffusion_loss_sums,
                                          loss_sums_from_logits, per_sequence_terms,
                                          shifted_cross_entropy, target_positions)
from diffujax.diffusion.sampling import (SampleOutput, sample_ancestral, sample_confidence,
                                         sample_semi_ar, sample_threshold)
from diffujax.diffusion.sft import build_sft_example

__all__ = [
    "DEFAULT_EPS", "NORMALIZATIONS", "DecodeOutput", "LossSums", "NLLEstimate", "NoisedBatch",
    "SampleOutput", "apply_noise", "ar_loss_sums", "ar_nll_terms",
    "block_diffusion_loss_sums", "block_forward_process", "block_logits",
    "build_sft_example", "canvas_length", "conditional_nll", "decode_blocks",
    "diffusion_loss_sums", "effective_block_size",
    "elbo_terms", "exponential_draws", "exponential_from_bits", "filter_logits",
    "forward_process", "loss_sums_from_logits",
    "multiple_choice_score", "per_sequence_terms", "race_winner", "row_keys", "sample_ancestral",
    "sample_categorical", "sample_confidence", "sample_exact_count_mask", "sample_noise_mask",
    "sample_semi_ar", "sample_t", "sample_threshold", "shifted_cross_entropy", "summarize_nll",
    "target_positions", "uniform_from_bits",
]
