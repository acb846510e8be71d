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
from diffujax.models import param_specs
from diffujax.models import ConfigError, ModelConfig, config_from_hf, family_of
from diffujax.models.family import LM_HEAD

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16,
          "float64": np.float64}
FLOAT_DTYPES = {np.dtype(t) for t in DTYPES.values()}  # bfloat16 is no np.floating subtype


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
    """Names, shapes and dtypes up front; data one tensor at a time. Each source defines
    ``names() -> list[str]``, ``shape(name) -> tuple``, ``dtype(name) -> np.dtype`` and
    ``get(name) -> np.ndarray``."""

    def where(self, name: str) -> str:
        """The file holding ``name`` (for error messages)."""
        return "state dict"

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _torch_to_numpy(t) -> np.ndarray:
    import torch  # optional (the torch extra): only torch tensors get here

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class DictSource(TensorSource):
    """An in-memory state dict (numpy arrays or torch tensors), e.g. ``hf_model.state_dict()``."""

    def __init__(self, tensors: Mapping):
        self._tensors = {k: v if isinstance(v, np.ndarray) else _torch_to_numpy(v)
                         for k, v in tensors.items()}

    def names(self):
        return list(self._tensors)

    def shape(self, name):
        return tuple(self._tensors[name].shape)

    def dtype(self, name):
        return self._tensors[name].dtype

    def get(self, name):
        return self._tensors[name]


def _read_index(path: pathlib.Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid shard index ({e})") from None
    missing = sorted({f for f in weight_map.values() if not (path.parent / f).is_file()})
    if missing:
        raise CheckpointError(f"{path}: shard file(s) {', '.join(missing)} listed in the index"
                              f" are missing from {path.parent}")
    return weight_map


class SafetensorsSource(TensorSource):
    """One ``model.safetensors`` or the shards of ``model.safetensors.index.json`` (memory-mapped
    by ``safe_open``; ``get`` copies a single tensor out)."""

    def __init__(self, files: list[pathlib.Path], weight_map: dict[str, str] | None = None):
        self._handles, self._file, self._meta = {}, {}, {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="numpy")
                handle.__enter__()
                for name in handle.keys():
                    s = handle.get_slice(name)
                    self._meta[name] = (tuple(s.get_shape()), s.get_dtype())
                    self._file[name] = path
            except Exception as e:  # safetensors raises its own SafetensorError, or OSError
                self.close()
                raise CheckpointError(f"{path}: cannot read safetensors file"
                                      f" (truncated or corrupted?): {e}") from None
            self._handles[path] = handle
        for name, shard in (weight_map or {}).items():
            if self._file.get(name, pathlib.Path()).name != shard:
                self.close()
                raise CheckpointError(f"index lists tensor {name!r} in {shard}, which does not"
                                      " contain it")

    def names(self):
        return list(self._meta)

    def shape(self, name):
        return self._meta[name][0]

    def dtype(self, name):
        code = self._meta[name][1]
        if code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.where(name)}: tensor {name!r} has unsupported dtype {code}")
        return np.dtype(_SAFETENSORS_DTYPES[code])

    def get(self, name):
        try:
            return self._handles[self._file[name]].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.where(name)}: cannot read tensor {name!r}: {e}") from None

    def where(self, name):
        return str(self._file.get(name, "?"))

    def close(self):
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles = {}


def _torch_load(torch, path):
    """Memory-mapped where the file allows it (zip format, torch >= 1.6); the legacy format
    cannot be mapped and is read whole."""
    try:
        return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)


class TorchBinSource(DictSource):
    """``pytorch_model.bin`` (or its shards): memory-mapped torch pickles, tensors only (kept as
    torch tensors: each is converted when it is read)."""

    def __init__(self, files: list[pathlib.Path]):
        try:
            import torch  # optional (the torch extra): only .bin checkpoints need it
        except ImportError:
            raise CheckpointError(f"{files[0]}: reading pytorch_model.bin needs torch; install it"
                                  " (pip install torch) or convert the checkpoint to safetensors")
        self._tensors, self._file = {}, {}
        for path in files:
            try:
                sd = _torch_load(torch, path)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read torch checkpoint"
                                      f" (truncated or corrupted?): {e}") from None
            if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise CheckpointError(f"{path}: expected a state dict of tensors")
            for name, t in sd.items():
                self._tensors[name], self._file[name] = t, path

    def dtype(self, name):
        import torch  # optional, and present: __init__ imported it

        t = self._tensors[name]
        if t.dtype == torch.bfloat16:
            return np.dtype(ml_dtypes.bfloat16)
        return torch.empty(0, dtype=t.dtype).numpy().dtype

    def get(self, name):
        return _torch_to_numpy(self._tensors[name])

    def where(self, name):
        return str(self._file.get(name, "?"))


def open_weights(directory) -> TensorSource:
    """The weights of a Hugging Face model directory, whichever of the four layouts it uses."""
    d = pathlib.Path(directory)
    if (d / SAFETENSORS_INDEX).is_file():
        weight_map = _read_index(d / SAFETENSORS_INDEX)
        return SafetensorsSource([d / f for f in sorted(set(weight_map.values()))], weight_map)
    if (d / SAFETENSORS).is_file():
        return SafetensorsSource([d / SAFETENSORS])
    if (d / TORCH_BIN_INDEX).is_file():
        return TorchBinSource([d / f for f in sorted(set(_read_index(d / TORCH_BIN_INDEX).values()))])
    if (d / TORCH_BIN).is_file():
        return TorchBinSource([d / TORCH_BIN])
    raise CheckpointError(f"{d}: no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX},"
                          f" {TORCH_BIN} or {TORCH_BIN_INDEX})")


def read_config(directory) -> tuple[dict, ModelConfig]:
    """``config.json`` of a Hugging Face (or diffujax) directory: the raw dict and the config."""
    path = paths.resolve(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a model directory?)")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    hf.pop("diffujax", None)
    try:
        return hf, config_from_hf(hf, source=str(path))
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
    names = source.names()
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
    present = set(names)
    missing = [n for n in expected if n not in present]
    if missing:
        raise CheckpointError(f"missing tensor(s) {_listing(missing)} for the {config.family}"
                              f" model described by config.json ({config.num_layers} layers,"
                              f" {'tied' if config.tie_word_embeddings else 'untied'} embeddings)")
    emb_shape = kmap.entry_for(family.embedding).shape
    for name in names:
        if name not in known:
            continue
        want = emb_shape if name == LM_HEAD and tied_head else expected[name][0].shape
        got = source.shape(name)
        if got != want:
            raise CheckpointError(f"{source.where(name)}: tensor {name!r} has shape {got}, but"
                                  f" config.json implies {want}")
        if source.dtype(name) not in FLOAT_DTYPES:
            raise CheckpointError(f"{source.where(name)}: tensor {name!r} has dtype"
                                  f" {source.dtype(name)}, expected a floating-point weight")

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
            if entry.per_layer:
                params[path][layer] = part
            else:
                params[path][...] = part
        del tensor

    if tied_head:
        emb = params[family.embedding]
        head = source.get(LM_HEAD).astype(emb.dtype, copy=False)
        if not np.array_equal(head.view(np.uint8), emb.view(np.uint8)):
            raise CheckpointError(f"{source.where(LM_HEAD)}: tensor {LM_HEAD!r} differs from the"
                                  " input embedding, but config.json says tie_word_embeddings=true"
                                  " (set it to false to keep a separate output head)")
    return params, {"naming": naming, "tied_head_stored": bool(tied_head)}
