"""Hugging Face <-> diffujax: ``convert`` (HF directory -> diffujax checkpoint), ``export``
(diffujax checkpoint -> HF directory) and their in-memory forms for state dicts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
from typing import Mapping

import jax
import numpy as np

from diffujax import paths
from diffujax.checkpoint import store
from diffujax.checkpoint.errors import CheckpointError
from diffujax.checkpoint.hf_read import (DictSource, dtype_name, open_weights, parse_dtype,
                                         read_config, read_params)
from diffujax.checkpoint.hf_write import hf_tensors, write_safetensors
from diffujax.checkpoint.tokenizer_files import (MASK_TOKEN, add_mask_token, copy_tokenizer_files,
                                                 find_mask_token, token_ids, tokenizer_size)
from diffujax.models import (ConfigError, ModelConfig, Params, config_from_hf, family_of, flatten,
                             nest)

log = logging.getLogger(__name__)

# -- in memory ----------------------------------------------------------------------------------


def from_state_dict(hf_config, tensors: Mapping, *, dtype="keep") -> tuple[ModelConfig, Params]:
    """A Hugging Face state dict (torch tensors or numpy arrays, e.g. ``hf_model.state_dict()``)
    and its config (a ``config.json`` dict or a diffujax config) -> ``(config, params)``."""
    config = hf_config
    if not isinstance(config, ModelConfig):
        try:
            config = config_from_hf(dict(hf_config), source="config")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    params, _ = read_params(config, DictSource(tensors), parse_dtype(dtype))
    config = config.replace(param_dtype=dtype_name(params[family_of(config).embedding].dtype))
    return config, nest(params)


def to_state_dict(config: ModelConfig, params, *, dtype=None, naming="transformers") -> dict:
    """diffujax params (the parameter tree, or its flat dict) -> ``{HF name: numpy array}``."""
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(params).items()}
    store.check_params(config, flat, "params")
    return {name: make() for name, _, _, make in
            hf_tensors(config, flat, {"naming": naming}, parse_dtype(dtype))}


# -- the mask token (docs/algorithms.md §1) --------------------------------------------------------


def _init_mask_row(config: ModelConfig, params: dict, row: int) -> ModelConfig:
    """Give token ``row`` (``== vocab_size``: a new row; below it: an unused padding row) the
    mean embedding, and an untied head its mean output vector: the new token starts "average"."""
    grow = row == config.vocab_size
    for path, axis in ((family_of(config).embedding, 0), ("lm_head", 1)):  # lm_head is [D, V]
        if path not in params:
            continue
        w = params[path]
        mean = np.mean(w, axis=axis, dtype=np.float64, keepdims=True).astype(w.dtype)
        if grow:
            params[path] = np.concatenate([w, mean], axis=axis)
        else:
            np.moveaxis(w, axis, 0)[row] = np.moveaxis(mean, axis, 0)[0]
    return config.replace(vocab_size=config.vocab_size + int(grow), mask_token_id=row)


def _fresh_mask_note(config: ModelConfig, row: int, add_token: bool, init_row: bool) -> str:
    """What ``convert`` did to give the model a mask token (said, as the vocabulary changes)."""
    where = ("a new embedding row" if row == config.vocab_size
             else f"embedding row {row}, unused padding until now")
    token = (f"added {MASK_TOKEN} to the tokenizer as id {row}" if add_token
             else f"{MASK_TOKEN} is the tokenizer's id {row}")
    mean = "; its embedding starts at the mean embedding" if init_row else ""
    return (f"mask token: {token} ({where}{mean}); --mask-token-id N picks an existing token,"
            " --no-mask-token keeps the vocabulary as it is")


def _choose_mask_token(config: ModelConfig, src: pathlib.Path, mask_token_id, no_mask_token):
    """-> (mask id or None, whether it is a fresh token to add)."""
    v = config.vocab_size
    if no_mask_token:
        if mask_token_id is not None:
            raise CheckpointError("--mask-token-id and --no-mask-token exclude each other")
        return config.mask_token_id, False
    if mask_token_id is not None:
        if not 0 <= mask_token_id <= v:
            raise CheckpointError(f"mask token id {mask_token_id} is outside the vocabulary (0..{v - 1},"
                                  f" or {v} to add a new token)")
        return mask_token_id, mask_token_id == v
    for what, found in (("config.json mask_token_id", config.mask_token_id),
                        ("the tokenizer's mask token", find_mask_token(src))):
        if found is not None:
            if not 0 <= found < v:
                raise CheckpointError(f"{src}: {what} is {found}, outside the vocabulary of {v} rows")
            return found, False
    return None, True


def _place_fresh_mask(config: ModelConfig, src: pathlib.Path, requested: int | None):
    """-> (row, add the token to the tokenizer files?, initialise the row?).

    A fresh token takes the tokenizer's next id (tokenizers cannot give an added token an id that
    leaves a gap): a new embedding row, or an unused padding row when the embedding is larger
    than the tokenizer. A ``<|mask|>`` the tokenizer already has is reused as it is."""
    v = config.vocab_size
    existing = token_ids(src).get(MASK_TOKEN)
    if existing is not None and requested in (None, existing):
        if existing > v:
            raise CheckpointError(f"{src}: tokenizer token {MASK_TOKEN} has id {existing}, beyond"
                                  f" the embedding's {v} rows")
        return existing, False, existing == v
    n = tokenizer_size(src)
    row = requested if requested is not None else (v if n is None else n)
    if n is not None and n != row:
        raise CheckpointError(f"{src}: the tokenizer has {n} ids, so a new token would get id {n},"
                              f" not {row}")
    if row > v:
        raise CheckpointError(f"{src}: the tokenizer has {n} ids but the embedding only {v} rows;"
                              " cannot place a mask token")
    return row, n is not None, True


# -- directories --------------------------------------------------------------------------------


def convert(src, dst, *, dtype="keep", mask_token_id: int | None = None,
            no_mask_token: bool = False, overwrite: bool = False):
    """Hugging Face model directory ``src`` -> diffujax checkpoint ``dst`` (see ``store``).

    The mask token is ``mask_token_id`` if given (``== vocab_size`` adds a new token there), else
    config.json's ``mask_token_id``, else the tokenizer's mask token, else a fresh ``<|mask|>``
    (embedding + untied head grow by a row initialised to the mean; the copied tokenizer files
    learn the token). ``no_mask_token`` leaves the vocabulary untouched (a bit-exact copy).
    """
    if not paths.resolve(src).is_dir():
        raise CheckpointError(f"{paths.resolve(src)}: not a directory")
    store.check_separate(src, dst)
    target = parse_dtype(dtype)
    # safetensors reads local files: a model in a bucket is read from a temporary local copy.
    with store.atomic_directory(dst, overwrite) as tmp, paths.local_view(src) as src:
        src = pathlib.Path(src)
        config, _ = read_config(src)
        mask_id, fresh = _choose_mask_token(config, src, mask_token_id, no_mask_token)
        with contextlib.closing(open_weights(src)) as source:
            params, layout = read_params(config, source, target)
        copy_tokenizer_files(src, tmp)
        if fresh:
            row, add_token, init_row = _place_fresh_mask(config, src, mask_id)
            if add_token:
                add_mask_token(tmp, row)
            log.info(_fresh_mask_note(config, row, add_token, init_row))
            config = (_init_mask_row(config, params, row) if init_row
                      else config.replace(mask_token_id=row))
        elif mask_id is not None:
            config = config.replace(mask_token_id=int(mask_id))
        store.write(tmp, config, params, layout)
        store.mark_complete(tmp)
    return paths.resolve(dst)


def export(src_ckpt, dst, *, max_shard_size="5GB", dtype=None, overwrite: bool = False,
           naming: str | None = None):
    """diffujax checkpoint -> Hugging Face directory: config.json (with ``mask_token_id``),
    safetensors (sharded above ``max_shard_size``), tokenizer files. Tensor names, shapes and
    dtypes are those of the converted source (``naming`` overrides the names: "transformers"
    gives what ``AutoModelForCausalLM`` loads); ``dtype`` casts."""
    src_ckpt = paths.resolve(src_ckpt)
    store.check_separate(src_ckpt, dst)
    target = parse_dtype(dtype)
    with store.atomic_directory(dst, overwrite) as tmp:
        config, params, layout = store.load_numpy(src_ckpt)
        if naming is not None:
            layout = {**layout, "naming": naming}
        hf = config.to_hf()
        hf["dtype"] = dtype_name(target or params[family_of(config).embedding].dtype)
        hf["torch_dtype"] = hf["dtype"]  # transformers 4.x reads this spelling
        try:
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            copy_tokenizer_files(src_ckpt, tmp)
            write_safetensors(tmp, hf_tensors(config, params, layout, target), max_shard_size)
        except OSError as e:  # a full disk, a failing bucket: named by the file being written
            name = os.path.basename(os.fspath(e.filename)) if e.filename else ""
            raise CheckpointError(f"writing {paths.resolve(dst) / name} failed:"
                                  f" {e.strerror or e}; nothing was left at {dst}") from None
    return paths.resolve(dst)
