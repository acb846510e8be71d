"""Read Hugging Face checkpoints, one tensor at a time, into diffujax's stacked layout.

A ``TensorSource`` answers names, shapes and dtypes without reading data, and hands out one tensor
at a time: everything is validated (unexpected, missing, mis-shaped tensors) before any data is
read, and the result is filled into preallocated arrays, so converting needs about one copy of
the model in memory.
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping

import ml_dtypes
import numpy as np
from safetensors import safe_open

from diffujax import console, paths
from diffujax.checkpoint.errors import CheckpointError
from diffujax.checkpoint.version import check_version
from diffujax.models import param_specs
from diffujax.models import ConfigError, ModelConfig, config_from_hf, family_of
from diffujax.models.family import LM_HEAD

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

# safetensors' dtype codes, as numpy names (the ones a weight may have, and the common others).
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8"}
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16,
          "float64": np.float64}


def parse_dtype(dtype) -> np.dtype | None:
    """None / "keep" -> None (keep the stored dtype); a name or dtype -> numpy dtype."""
    if dtype is None or dtype == "keep":
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not one of keep, {', '.join(DTYPES)}")
        return np.dtype(DTYPES[dtype])
    return np.dtype(dtype)


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name  # "float32", "bfloat16", ...


# -- tensor sources ---------------------------------------------------------------------------


class TensorSource:
    """Names, shapes and dtype names up front (``meta``: name -> ``(shape, dtype name)``), data
    one tensor at a time (``get(name) -> np.ndarray``); ``where(name)`` names the file holding a
    tensor, for messages."""

    def __init__(self, meta: dict, files: Mapping | None = None):
        self.meta, self._files = meta, files or {}

    def where(self, name: str) -> str:
        return str(self._files.get(name, "state dict"))

    def close(self):
        pass


def _torch_to_numpy(t) -> np.ndarray:
    """A view of a CPU torch tensor's memory (a memory-mapped one stays unread until used)."""
    import torch  # optional (the torch extra): only torch tensors get here

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class DictSource(TensorSource):
    """A state dict (numpy arrays or torch tensors), e.g. ``hf_model.state_dict()``."""

    def __init__(self, tensors: Mapping, files: Mapping | None = None):
        self._tensors = {k: v if isinstance(v, np.ndarray) else _torch_to_numpy(v)
                         for k, v in tensors.items()}
        super().__init__({k: (tuple(v.shape), v.dtype.name) for k, v in self._tensors.items()},
                         files)

    def get(self, name):
        return self._tensors[name]


def _read_index(path: pathlib.Path) -> tuple[list[pathlib.Path], dict[str, str]]:
    """The shard files a ``*.index.json`` lists (checked to exist), and its weight map."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid shard index ({e})") from None
    missing = sorted({f for f in weight_map.values() if not (path.parent / f).is_file()})
    if missing:
        raise CheckpointError(f"{path}: shard file(s) {', '.join(missing)} listed in the index"
                              f" are missing from {path.parent}")
    return [path.parent / f for f in sorted(set(weight_map.values()))], weight_map


class SafetensorsSource(TensorSource):
    """One ``model.safetensors`` or the shards of ``model.safetensors.index.json`` (memory-mapped
    by ``safe_open``; ``get`` copies a single tensor out)."""

    def __init__(self, files: list[pathlib.Path], weight_map: dict[str, str] | None = None):
        super().__init__({}, {})
        self._handles = {}
        for path in files:
            try:
                handle = self._handles[path] = safe_open(str(path), framework="numpy")
                for name in handle.keys():
                    s = handle.get_slice(name)
                    code = s.get_dtype()
                    self.meta[name] = (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(code, code))
                    self._files[name] = path
            except Exception as e:  # safetensors raises its own SafetensorError, or OSError
                self.close()
                raise CheckpointError(f"{path}: cannot read safetensors file"
                                      f" (truncated or corrupted?): {e}") from None
        for name, shard in (weight_map or {}).items():
            if self._files.get(name, pathlib.Path()).name != shard:
                self.close()
                raise CheckpointError(f"index lists tensor {name!r} in {shard}, which does not"
                                      " contain it")

    def get(self, name):
        try:
            return self._handles[self._files[name]].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.where(name)}: cannot read tensor {name!r}: {e}") from None

    def close(self):
        for handle in self._handles.values():
            handle.__exit__(None, None, None)  # unmaps the file
        self._handles = {}


def _torch_bin(files: list[pathlib.Path]) -> DictSource:
    """``pytorch_model.bin`` (or its shards): torch pickles of tensors, memory-mapped where the
    file allows it (zip format, torch >= 1.6; the legacy format is read whole)."""
    try:
        import torch  # optional (the torch extra): only .bin checkpoints need it
    except ImportError:
        raise CheckpointError(f"{files[0]}: reading pytorch_model.bin needs torch; install it"
                              " (pip install torch) or convert the checkpoint to safetensors")
    tensors, where = {}, {}
    for path in files:
        try:
            try:
                sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read torch checkpoint"
                                  f" (truncated or corrupted?): {e}") from None
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: expected a state dict of tensors")
        tensors.update(sd)
        where.update(dict.fromkeys(sd, path))
    return DictSource(tensors, where)


def open_weights(directory) -> TensorSource:
    """The weights of a Hugging Face model directory, whichever of the four layouts it uses."""
    d = pathlib.Path(directory)
    if (d / SAFETENSORS_INDEX).is_file():
        return SafetensorsSource(*_read_index(d / SAFETENSORS_INDEX))
    if (d / SAFETENSORS).is_file():
        return SafetensorsSource([d / SAFETENSORS])
    if (d / TORCH_BIN_INDEX).is_file():
        return _torch_bin(_read_index(d / TORCH_BIN_INDEX)[0])
    if (d / TORCH_BIN).is_file():
        return _torch_bin([d / TORCH_BIN])
    raise CheckpointError(f"{d}: no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX},"
                          f" {TORCH_BIN} or {TORCH_BIN_INDEX})")


def read_config(directory, kind: str | None = None) -> tuple[ModelConfig, dict]:
    """The config in ``config.json`` of a Hugging Face (or diffujax) directory, and its "diffujax"
    section; with ``kind`` ("model") that section's format version is checked first."""
    path = paths.resolve(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a model directory?)")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    section = hf.pop("diffujax", None) or {}
    if kind is not None:
        check_version(section, path.parent, kind)
    try:
        return config_from_hf(hf, source=str(path)), section
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


# -- HF tensors -> diffujax parameters ----------------------------------------------------------


def _listing(names, limit=5) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def read_params(config: ModelConfig, source: TensorSource, dtype=None):
    """Validate ``source`` against ``config`` and read it into diffujax parameters.

    Returns ``(params, layout)``: ``params`` a flat ``{spec path: numpy array}`` (stacked
    per-layer weights), ``layout`` what export needs to write the same file back
    (``{"naming": ..., "tied_head_stored": bool}``). ``dtype=None`` keeps each tensor's dtype.
    """
    target = parse_dtype(dtype)
    names = list(source.meta)
    family = family_of(config)
    naming = family.detect_naming(names)
    kmap = family.keymap(config, naming)
    expected = kmap.expand(config.num_layers)
    # A tied model may still carry lm_head (the DiffuGPT wrapper, torch state dicts): accepted
    # if it equals the embedding, checked after reading.
    tied_head = config.tie_word_embeddings and LM_HEAD in names
    known = set(expected) | ({LM_HEAD} if tied_head else set())

    unexpected = [n for n in names if n not in known and not kmap.ignored(n)]
    if unexpected:
        where = sorted({source.where(n) for n in unexpected})
        raise CheckpointError(f"{', '.join(where)}: unexpected tensor(s) {_listing(unexpected)}"
                              f" for a {config.family} model with {config.num_layers} layers"
                              f" ({naming} naming)")
    missing = [n for n in expected if n not in source.meta]
    if missing:
        raise CheckpointError(f"missing tensor(s) {_listing(missing)} for the {config.family}"
                              f" model described by config.json ({config.num_layers} layers,"
                              f" {'tied' if config.tie_word_embeddings else 'untied'} embeddings)")
    emb_shape = kmap.entry_for(family.embedding).shape
    for name in names:
        if name not in known:
            continue
        want = emb_shape if name == LM_HEAD and tied_head else expected[name][0].shape
        got, dtype_got = source.meta[name]
        if got != want:
            raise CheckpointError(f"{source.where(name)}: tensor {name!r} has shape {got}, but"
                                  f" config.json implies {want}")
        if dtype_got not in DTYPES:
            raise CheckpointError(f"{source.where(name)}: tensor {name!r} has dtype {dtype_got},"
                                  " expected a floating-point weight")

    specs = param_specs(config)
    params: dict[str, np.ndarray] = {}
    for name in console.progress(names, total=len(names), desc="read", unit="tensor"):
        if name not in expected:
            continue
        entry, layer = expected[name]
        tensor = source.get(name)
        slices = [specs[p].shape[1:] if entry.per_layer else specs[p].shape for p in entry.paths]
        for path, part in zip(entry.paths, entry.to_diffujax(tensor, slices)):
            if path not in params:
                params[path] = np.empty(specs[path].shape, target or tensor.dtype)
            params[path][layer if entry.per_layer else ...] = part
        del tensor

    if tied_head:
        emb = params[family.embedding]
        head = source.get(LM_HEAD).astype(emb.dtype, copy=False)
        if not np.array_equal(head.view(np.uint8), emb.view(np.uint8)):
            raise CheckpointError(f"{source.where(LM_HEAD)}: tensor {LM_HEAD!r} differs from the"
                                  " input embedding, but config.json says tie_word_embeddings=true"
                                  " (set it to false to keep a separate output head)")
    return params, {"naming": naming, "tied_head_stored": bool(tied_head)}
