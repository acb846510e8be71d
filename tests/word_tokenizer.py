"""A word-level tokenizer.json for tiny test models: words ``w0 .. w{n-1}`` plus special tokens."""

from __future__ import annotations

import json
import pathlib

from tokenizers import Tokenizer, models, pre_tokenizers


def write_word_tokenizer(directory: pathlib.Path, *, words: int, unk: int, mask: int,
                         eos: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` (EOS doubles as BOS) in ``directory``."""
    vocab = {f"w{i}": i for i in range(words)} | {"<unk>": unk, "<mask>": mask, "<eos>": eos}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<eos>", "eos_token": "<eos>", "mask_token": "<mask>", "unk_token": "<unk>"}))
