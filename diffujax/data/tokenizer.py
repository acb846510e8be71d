"""One face over a sentencepiece ``tokenizer.model`` (LLaMA-2 style) and a Hugging Face
``tokenizer.json`` (the ``tokenizers`` library).

The heavy object is loaded lazily and dropped when pickled, so a tokenizer can be shipped to grain
worker processes (which are spawned) and re-loads itself there on first use. Special token ids are
resolved once, in the process that builds the tokenizer, and travel as plain ints.

Text is encoded *without* the tokenizer's own post-processing (no BOS added by a template) and, by
default, without parsing special-token strings found in the text: a document containing the
characters ``<|endoftext|>`` stays text. Sequence structure (BOS, EOS, SEP, PAD) is added by the
pipeline, explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import threading
from typing import Any, Sequence

import sentencepiece as spm
from tokenizers import Tokenizer as _HF

from diffujax import paths

_SPECIAL_NAMES = ("bos", "eos", "pad", "unk", "sep", "mask")


class VocabMismatchError(ValueError):
    """The tokenizer can produce ids that the model's embedding table does not have."""


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    bos: int | None = None
    eos: int | None = None
    pad: int | None = None
    unk: int | None = None
    sep: int | None = None
    mask: int | None = None

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class Tokenizer:
    """Base class: ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ids.

    Subclasses implement ``_load`` (returns the backend object), ``_default_special``,
    ``token_to_id`` and ``_backend_vocab_size`` / ``_backend_encode`` / ``_backend_decode``.
    """

    kind = ""

    def __init__(self, path: str | pathlib.Path, special: SpecialTokens | None = None):
        self.path = str(path)
        self._impl = None
        self._lock = threading.Lock()
        self.special = special if special is not None else self._default_special()
        self.vocab_size = self._backend_vocab_size()

    # -- lazy loading; pickling keeps only the path and the resolved ids ----------------------
    @property
    def impl(self):
        if self._impl is None:
            with self._lock:  # grain may call from several reader threads at once
                if self._impl is None:
                    self._impl = self._load()
        return self._impl

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_impl"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- public face -----------------------------------------------------------------------------
    @property
    def bos_id(self) -> int | None:
        return self.special.bos

    @property
    def eos_id(self) -> int | None:
        return self.special.eos

    @property
    def pad_id(self) -> int | None:
        return self.special.pad

    def encode(self, text: str) -> list[int]:
        return self._backend_encode([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._backend_encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend_decode([int(i) for i in ids])

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
        for name, tid in self.special.as_dict().items():
            if tid >= model_vocab_size:
                raise VocabMismatchError(
                    f"tokenizer {self.path}: special token {name}={tid} is >= the model "
                    f"vocabulary size {model_vocab_size}"
                )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, "
            f"special={self.special.as_dict()})"
        )


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file. Control symbols in the text are never parsed as such."""

    kind = "sentencepiece"

    def _load(self):
        return spm.SentencePieceProcessor(model_file=self.path)

    def _default_special(self) -> SpecialTokens:
        sp = self.impl
        ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
        return SpecialTokens(**{k: (v if v >= 0 else None) for k, v in ids.items()})

    def _backend_vocab_size(self) -> int:
        return int(self.impl.get_piece_size())

    def _backend_encode(self, texts):
        return self.impl.encode(texts)

    def _backend_decode(self, ids):
        return self.impl.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        # piece_to_id answers unk for unknown pieces; check the round trip instead.
        tid = self.impl.piece_to_id(token)
        return tid if self.impl.id_to_piece(tid) == token else None


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``.

    ``parse_special=False`` (default) sets ``encode_special_tokens`` so that special-token strings
    inside the text are tokenised as plain text instead of turning into control ids.
    """

    kind = "hf"

    def __init__(self, path, special: SpecialTokens | None = None, parse_special: bool = False):
        self.parse_special = parse_special
        super().__init__(path, special)

    def _load(self):
        tok = _HF.from_file(self.path)
        tok.encode_special_tokens = not self.parse_special
        return tok

    def _default_special(self) -> SpecialTokens:
        return SpecialTokens()  # tokenizer.json alone does not say which token is BOS/EOS

    def _backend_vocab_size(self) -> int:
        return int(self.impl.get_vocab_size(with_added_tokens=True))

    def _backend_encode(self, texts):
        encs = self.impl.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encs]

    def _backend_decode(self, ids):
        return self.impl.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.impl.token_to_id(token)


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


def _token_content(value: Any) -> str | None:
    """tokenizer_config / special_tokens_map spell a token as a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def declared_tokens(directory) -> dict[str, tuple[str, pathlib.Path]]:
    """``{name: (token string, file)}`` of the special tokens (``bos``, ``eos``, ..., ``mask``)
    the side files declare; tokenizer_config.json wins over special_tokens_map.json. The one
    reader of these files (the converter finds the mask token with it too)."""
    found = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        path = paths.resolve(directory) / fname
        cfg = read_json_file(path) or {}
        for name in _SPECIAL_NAMES:
            content = _token_content(cfg.get(f"{name}_token"))
            if content is not None:
                found[name] = (content, path)
    return found


def _special_from_dir(tok: Tokenizer, directory: pathlib.Path) -> SpecialTokens:
    """Special ids from the HF side files, most specific first:
    tokenizer_config.json > special_tokens_map.json > config.json (*_token_id) > the tokenizer."""
    found = tok.special.as_dict()
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
    return SpecialTokens(**found)


# What ``load_tokenizer`` reads from a directory (copied to the cache from a bucket).
_FILES_READ = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "special_tokens_map.json", "config.json")


def load_tokenizer(
    directory: str | pathlib.Path,
    *,
    prefer: str = "hf",
    parse_special: bool = False,
    model_vocab_size: int | None = None,
    **overrides: int | None,
) -> Tokenizer:
    """Load the tokenizer of a checkpoint / Hugging Face directory (or a path to the file itself).

    Finds ``tokenizer.json`` and/or ``tokenizer.model``; when both exist, ``prefer`` picks
    (``"hf"``, the default, is what ``transformers.AutoTokenizer`` uses). Special ids come from
    the side files (see ``_special_from_dir``); keyword ``overrides`` (``bos=1, pad=0``...) win.
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
    if path.is_file():
        files = {"hf" if path.suffix == ".json" else "sentencepiece": path}
        directory = path.parent
    else:
        directory = path
        files = {}
        if (path / "tokenizer.json").is_file():
            files["hf"] = path / "tokenizer.json"
        if (path / "tokenizer.model").is_file():
            files["sentencepiece"] = path / "tokenizer.model"
        if not files:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
    kind = prefer if prefer in files else next(iter(files))
    tok: Tokenizer
    try:
        if kind == "hf":
            tok = HFTokenizer(files["hf"], parse_special=parse_special)
        else:
            tok = SentencePieceTokenizer(files["sentencepiece"])
    except Exception as e:  # noqa: BLE001 - each library raises its own types for a bad file
        what = "a tokenizer.json" if kind == "hf" else "a sentencepiece model"
        raise ValueError(f"{files[kind]}: not {what} ({type(e).__name__}:"
                         f" {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    special = _special_from_dir(tok, pathlib.Path(directory)).as_dict()
    for name, tid in overrides.items():
        if name not in _SPECIAL_NAMES:
            raise TypeError(f"unknown special token {name!r}; expected one of {_SPECIAL_NAMES}")
        special[name] = tid
    tok.special = SpecialTokens(**{k: v for k, v in special.items() if v is not None})
    if model_vocab_size is not None:
        tok.check_model_vocab(model_vocab_size)
    return tok
