"""Items -> token rows (:class:`~diffujax.tasks.engine.Row`), the same rows for both objectives
except where the AR baseline's prompt differs (HumanEval).

Position 0 must be a real token (docs/algorithms.md §1): it is the tokenizer's BOS when it has one
(once: the reference's LLaMA path encoded every piece with BOS, so a BOS also sat before each
answer), otherwise the first context token. Text pieces are encoded on their own and concatenated,
as the reference does. ``without_context_bos()``: as the reference's AR script, a non-empty
context starts with its own first token (README: Tasks).
"""

from __future__ import annotations

import copy
import itertools

from diffujax.tasks.engine import ROW_STRIDE, Row


class Encoder:
    def __init__(self, tokenizer, *, mask_token_id: int | None, bos_id: int | None = None,
                 sep_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None):
        self.tokenizer = tokenizer
        self.mask = 0 if mask_token_id is None else int(mask_token_id)
        self.lead = [] if bos_id is None else [int(bos_id)]
        self.sep = [] if sep_id is None else [int(sep_id)]
        self.stops = {int(t) for t in (eos_id, pad_id) if t is not None}
        self.bos_before_context = True

    def without_context_bos(self) -> "Encoder":
        """This encoder, but a non-empty context starts with its own first token, not BOS."""
        other = copy.copy(self)
        other.bos_before_context = False
        return other

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text)) if text else []

    def context(self, text: str, what: str) -> list[int]:
        ids = self.ids(text)
        if self.bos_before_context or not ids:  # an empty context still needs a real position 0
            ids = self.lead + ids
        if not ids:
            raise ValueError(f"{what}: empty context and the tokenizer has no BOS token, so"
                             " position 0 would be generated (it must be a real token)")
        return ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def until_stop(self, ids) -> list[int]:
        """Generated ids up to the first EOS / PAD."""
        return list(itertools.takewhile(lambda i: i not in self.stops, map(int, ids)))

    # --- per kind --------------------------------------------------------------------------------

    def choice_rows(self, index: int, item) -> list[Row]:
        if len(item.continuations) > ROW_STRIDE:
            raise ValueError(f"item {index}: more than {ROW_STRIDE} choices")
        context = self.context(item.prefix, f"item {index}")
        rows = []
        for j, text in enumerate(item.continuations):
            target = self.ids(text)
            if not target:
                raise ValueError(f"item {index}: choice {j} encodes to no tokens")
            rows.append(Row.make(context, target, index * ROW_STRIDE + j))
        return rows

    def last_word_row(self, index: int, item) -> Row:
        """The prefix, then as many positions as the passage has tokens beyond it (T = that
        count for the diffusion objective)."""
        context = self.context(item.prefix, f"item {index}")
        count = len(self.ids(item.text)) - len(self.ids(item.prefix))
        if count < 1:
            raise ValueError(f"item {index}: the last word adds no tokens to its prefix")
        return Row.make(context, [self.mask] * count, index * ROW_STRIDE)

    def infill_row(self, index: int, item, ar: bool = False) -> Row:
        """The prefix, the oracle length of the middle, the suffix; ``ar`` (the AR baseline):
        its prompt (the prefix, or HumanEval's instruction), then the middle's length, generated
        left to right."""
        masks = [self.mask] * len(self.ids(item.middle))
        if ar:
            prompt = item.ar_prompt if item.ar_prompt is not None else item.prefix
            return Row.make(self.context(prompt, f"item {index}"), masks, index * ROW_STRIDE)
        return Row.make(self.context(item.prefix, f"item {index}"), masks, index * ROW_STRIDE,
                        suffix=self.ids(item.suffix))

    def answer_row(self, index: int, item, seq_len: int) -> Row:
        """``[BOS] + question + [SEP]`` and masks up to ``seq_len`` positions (the SFT layout of
        docs/algorithms.md §4; the question is left-truncated when it leaves no room)."""
        question = self.ids(item.question)
        room = seq_len - len(self.lead) - len(self.sep) - 1
        if room < 1:
            raise ValueError(f"--seq-len {seq_len} leaves no room for a question")
        context = self.lead + question[max(0, len(question) - room):] + self.sep
        if not context:
            raise ValueError(f"item {index}: empty question and no BOS token")
        return Row.make(context, [self.mask] * (seq_len - len(context)), index * ROW_STRIDE)
