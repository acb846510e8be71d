"""Tokenizer files travel with a checkpoint; this finds and adds the mask token in them."""

from __future__ import annotations

import json

from diffujax import paths
from diffujax.checkpoint.errors import CheckpointError
from diffujax.data.tokenizer import declared_tokens, read_json_file

# Files copied along with the weights (whichever exist). generation_config.json is not a
# tokenizer file, but it holds the special ids generation uses, so it travels too.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
MASK_TOKEN = "<|mask|>"


def copy_tokenizer_files(src, dst) -> None:
    src, dst = paths.resolve(src), paths.resolve(dst)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            paths.copy_file(src / name, dst / name)


def _load(directory, name):
    try:
        return read_json_file(paths.resolve(directory) / name)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _dump(directory, name, obj):
    (paths.resolve(directory) / name).write_text(
        json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def token_ids(directory) -> dict[str, int]:
    """Every token string the tokenizer files know -> id (base vocabulary and added tokens)."""
    ids: dict[str, int] = {}
    vocab = _load(directory, "vocab.json")
    if isinstance(vocab, dict):
        ids.update(vocab)
    tok = _load(directory, "tokenizer.json")
    if tok:
        model_vocab = (tok.get("model") or {}).get("vocab")
        if isinstance(model_vocab, dict):  # BPE / WordPiece / WordLevel
            ids.update(model_vocab)
        elif isinstance(model_vocab, list):  # Unigram: [[piece, score], ...]
            ids.update({piece[0]: i for i, piece in enumerate(model_vocab)})
        ids.update({t["content"]: t["id"] for t in tok.get("added_tokens") or []})
    ids.update(_load(directory, "added_tokens.json") or {})
    config = _load(directory, "tokenizer_config.json") or {}
    ids.update({t["content"]: int(i) for i, t in (config.get("added_tokens_decoder") or {}).items()})
    return ids


def tokenizer_size(directory) -> int | None:
    """Number of ids the tokenizer can produce (None when no readable vocabulary is there)."""
    ids = token_ids(directory)
    return max(ids.values()) + 1 if ids else None


def find_mask_token(directory) -> int | None:
    """The id of the tokenizer's own mask token, if it declares one."""
    try:
        content = declared_tokens(directory).get("mask", (None,))[0]
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    ids = token_ids(directory) if content else {}
    return int(ids[content]) if content in ids else None


def add_mask_token(directory, token_id: int, content: str = MASK_TOKEN) -> None:
    """Add ``content`` as special token ``token_id`` to the tokenizer files in ``directory``
    (edited in place) and declare it the mask token."""
    added = {"id": token_id, "content": content, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
    tok = _load(directory, "tokenizer.json")
    if tok is not None:
        tok.setdefault("added_tokens", []).append(added)
        _dump(directory, "tokenizer.json", tok)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = _load(directory, name)
        if config is not None:
            config["mask_token"] = content
            if "added_tokens_decoder" in config:  # transformers 4.x spelling of added tokens
                entry = {k: v for k, v in added.items() if k != "id"}
                config["added_tokens_decoder"][str(token_id)] = entry
            _dump(directory, name, config)
    # Slow tokenizers (vocab.json + merges.txt, sentencepiece) read extra ids from added_tokens.json.
    slow = any((paths.resolve(directory) / f).is_file() for f in ("vocab.json", "tokenizer.model"))
    if tok is None and slow:
        extra = _load(directory, "added_tokens.json") or {}
        extra[content] = token_id
        _dump(directory, "added_tokens.json", extra)
