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


def save_word_checkpoint(root: pathlib.Path, *, words: int, **config) -> pathlib.Path:
    """A random tiny LLaMA (hidden 32, 4 heads over 2 KV heads, MLP 64, untied head; ``config``
    overrides) saved by diffujax at ``root / "ckpt"`` with the word tokenizer of ``words`` words
    (then ``<unk>``, ``<mask>``, ``<eos>``, which doubles as BOS); returns that path."""
    from diffujax.checkpoint import save
    from diffujax.models import LlamaConfig, init_params

    unk, mask, eos = words, words + 1, words + 2
    (root / "tok").mkdir()
    write_word_tokenizer(root / "tok", words=words, unk=unk, mask=mask, eos=eos)
    config = LlamaConfig(**dict(
        vocab_size=words + 3, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
        intermediate_size=64, max_positions=64, tie_word_embeddings=False, mask_token_id=mask,
        bos_token_id=eos, eos_token_id=eos) | config)
    save(root / "ckpt", config, init_params(config, seed=0), tokenizer_from=root / "tok")
    return root / "ckpt"
