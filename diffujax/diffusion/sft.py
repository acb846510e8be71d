"""The supervised fine-tuning data contract, docs/algorithms.md §4 (numpy, host side).

``tokens = [BOS] + prompt + [SEP] + answer + [EOS] + [PAD]...`` in ``length`` positions, with the
prompt left-truncated first (its most recent tokens survive) and then the tail cut if the
answer alone is still too long. ``src`` covers BOS, the prompt and SEP: they are never noised.
The answer, EOS and the padding are targets, so the model learns the output length by
predicting PAD. There is no attention padding mask. Train on it with
``diffusion_loss_sums(..., src=src, pattern=for_training(step, anneal_steps=1))`` and
``normalization="sequence"`` for LLaDA's per-sequence normalisation.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def build_sft_example(prompt: Sequence[int], answer: Sequence[int], *, length: int, bos_id: int,
                      eos_id: int, pad_id: int, sep_id: int | None = None):
    """One example: ``(tokens int32 [length], src bool [length])``; ``sep_id=None``: no SEP."""
    head = [bos_id]
    sep = [] if sep_id is None else [sep_id]
    tail = list(answer) + [eos_id]
    room_for_prompt = max(0, length - len(head) - len(sep) - len(tail))
    prompt = list(prompt)[len(prompt) - min(len(prompt), room_for_prompt):]
    context = head + prompt + sep
    sequence = (context + tail)[:length]
    tokens = np.full(length, pad_id, np.int32)
    tokens[:len(sequence)] = sequence
    src = np.zeros(length, bool)
    src[:min(len(context), length)] = True
    return tokens, src

