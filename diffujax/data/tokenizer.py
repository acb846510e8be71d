"""One face over a sentencepiece ``tokenizer.model`` (LLaMA-2 style) and a Hugging Face
``tokenizer.json`` (the ``tokenizers`` library).

Pickling keeps the path and the resolved special ids, not the backend, which a grain worker
process (spawned) loads again from the path. Special ids are resolved once, in the process that
loads the tokenizer, and travel as plain ints.

Text is encoded *without* the tokenizer's own post-processing (no BOS added by a template) and
without parsing special-token strings found in the text: a document containing the characters
``<|endoftext|>`` stays text. Sequence structure (BOS, EOS, SEP, PAD) is added by the pipeline,
explicitly.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import sentencepiece as spm
from tokenizers import Tokenizer as _HF

from diffujax import paths

_SPECIAL_NAMES = ("bos", "eos", "pad", "unk", "sep", "mask")


class VocabMismatchError(ValueError):
    """The tokenizer can produce ids that the model's embedding table does not have."""


class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size`` and ``special``
    (``{"bos": id, "eos": id, ...}``, the ids the tokenizer has) over a sentencepiece model
    (``kind`` "sentencepiece") or a ``tokenizer.json`` (``kind`` "hf")."""

    def __init__(self, path: str | pathlib.Path, kind: str):
        self.path, self.kind = str(path), kind
        self._impl = self._load()
        if kind == "sentencepiece":
            sp = self._impl
            ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
            self.special = {k: v for k, v in ids.items() if v >= 0}
            self.vocab_size = int(sp.get_piece_size())
        else:  # tokenizer.json alone does not say which token is BOS/EOS: the side files do
            self.special = {}
            self.vocab_size = int(self._impl.get_vocab_size(with_added_tokens=True))

    def _load(self):
        if self.kind == "sentencepiece":  # control symbols in the text are never parsed
            return spm.SentencePieceProcessor(model_file=self.path)
        tok = _HF.from_file(self.path)
        tok.encode_special_tokens = True  # special-token strings in a document stay text
        return tok

    # The backend's own pickle would lose encode_special_tokens: ship the path, load it there.
    def __getstate__(self):
        return {**self.__dict__, "_impl": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._impl = self._load()

    bos_id = property(lambda self: self.special.get("bos"))
    eos_id = property(lambda self: self.special.get("eos"))
    pad_id = property(lambda self: self.special.get("pad"))

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            return self._impl.encode(list(texts))
        return [e.ids for e in self._impl.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._impl.decode(ids)
        return self._impl.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "hf":
            return self._impl.token_to_id(token)
        # piece_to_id answers unk for unknown pieces; check the round trip instead.
        tid = self._impl.piece_to_id(token)
        return tid if self._impl.id_to_piece(tid) == token else None

    def decode_generated(self, ids: Sequence[int], *, stop_at_eos: bool = True) -> str:
        """Text of generated ids, cut before the first EOS (the model ending the text)."""
        ids = [int(i) for i in ids]
        if stop_at_eos and self.eos_id is not None and self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.decode(ids)

    def start_id(self, config_bos: int | None = None) -> int | None:
        """The token a canvas starts with (position 0 is conditioned on, never generated):
        this tokenizer's BOS (what the data pipeline puts before SFT rows and, with ``add_bos``,
        documents), else the model config's ``bos_token_id``, else EOS (packed pretraining puts
        one before every document); None when there is none of them."""
        for tid in (self.bos_id, config_bos, self.eos_id):
            if tid is not None:
                return int(tid)
        return None

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Raise ``VocabMismatchError`` if an id this tokenizer can emit is >= the model vocab.

        A model table larger than the tokenizer is fine (padded vocabularies, an added mask token).
        """
        if self.vocab_size > model_vocab_size:
            raise VocabMismatchError(
                f"tokenizer {self.path} has {self.vocab_size} tokens (ids up to "
                f"{self.vocab_size - 1}) but the model's vocabulary has only {model_vocab_size} "
                "rows: ids >= that would index past the embedding table. Use the tokenizer that "
                "belongs to this checkpoint."
            )
        for name, tid in self.special.items():
            if tid >= model_vocab_size:
                raise VocabMismatchError(f"tokenizer {self.path}: special token {name}={tid} is"
                                         f" >= the model vocabulary size {model_vocab_size}")

    def __repr__(self) -> str:
        return (f"Tokenizer({self.path!r}, {self.kind}, vocab_size={self.vocab_size},"
                f" special={self.special})")


# -- finding a tokenizer in a directory ---------------------------------------------------------


def read_json_file(path) -> Any:
    """A Hugging Face side file's JSON, None when the file is absent; invalid JSON is a
    ValueError naming the file (local or in a bucket)."""
    path = paths.resolve(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def declared_tokens(directory) -> dict[str, tuple[str, pathlib.Path]]:
    """``{name: (token string, file)}`` of the special tokens (``bos``, ``eos``, ..., ``mask``)
    the side files declare; tokenizer_config.json wins over special_tokens_map.json. The one
    reader of these files (the converter finds the mask token with it too)."""
    found = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        path = paths.resolve(directory) / fname
        cfg = read_json_file(path) or {}
        for name in _SPECIAL_NAMES:
            content = cfg.get(f"{name}_token")  # a string, or an AddedToken dict
            content = content.get("content") if isinstance(content, dict) else content
            if isinstance(content, str):
                found[name] = (content, path)
    return found


def _special_from_dir(tok: Tokenizer, directory: pathlib.Path) -> dict[str, int]:
    """Special ids from the HF side files, most specific first:
    tokenizer_config.json > special_tokens_map.json > config.json (*_token_id) > the tokenizer."""
    found = dict(tok.special)
    model_cfg = read_json_file(directory / "config.json") or {}
    for name in _SPECIAL_NAMES:
        tid = model_cfg.get(f"{name}_token_id")
        if isinstance(tid, list):  # HF allows a list of EOS ids; the first is the one we append
            tid = tid[0] if tid else None
        if isinstance(tid, int):
            found[name] = tid
    for name, (content, path) in declared_tokens(directory).items():
        tid = tok.token_to_id(content)
        if tid is None:
            raise ValueError(f"{path}: {name}_token {content!r} is not in the vocabulary of"
                             f" {tok.path}")
        found[name] = tid
    return found


# What ``load_tokenizer`` reads from a directory (copied to the cache from a bucket).
_FILES_READ = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "special_tokens_map.json", "config.json")


def load_tokenizer(directory: str | pathlib.Path, *,
                   model_vocab_size: int | None = None) -> Tokenizer:
    """Load the tokenizer of a checkpoint / Hugging Face directory (or a path to the file itself):
    ``tokenizer.json`` when there is one (what ``transformers.AutoTokenizer`` uses), else
    ``tokenizer.model``. Special ids come from the side files (see ``_special_from_dir``).
    With ``model_vocab_size`` the tokenizer is checked against the model's embedding table.
    """
    if paths.is_remote(directory):  # the tokenizer libraries read local files
        remote = paths.resolve(directory)
        if not remote.exists():
            raise FileNotFoundError(f"tokenizer path {remote} does not exist")
        directory = paths.local_copy(remote, None if remote.is_file() else _FILES_READ)
    path = pathlib.Path(directory)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if path.is_dir():
        path = next((f for f in (path / "tokenizer.json", path / "tokenizer.model") if f.is_file()),
                    None)
        if path is None:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {directory}")
    kind = "hf" if path.suffix == ".json" else "sentencepiece"
    try:
        tok = Tokenizer(path, kind)
    except Exception as e:  # noqa: BLE001 - each library raises its own types for a bad file
        what = "a tokenizer.json" if kind == "hf" else "a sentencepiece model"
        raise ValueError(f"{path}: not {what} ({type(e).__name__}:"
                         f" {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    tok.special = _special_from_dir(tok, path.parent)
    if model_vocab_size is not None:
        tok.check_model_vocab(model_vocab_size)
    return tok
