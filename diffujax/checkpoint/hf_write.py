"""Write diffujax parameters as a Hugging Face safetensors checkpoint (single file or shards)."""

from __future__ import annotations

import errno
import json
import re
from typing import Iterator, Mapping

import numpy as np
from safetensors.numpy import save_file

from diffujax import console, paths
from diffujax.checkpoint.errors import CheckpointError
from diffujax.checkpoint.hf_read import SAFETENSORS, SAFETENSORS_INDEX
from diffujax.models import ModelConfig, family_of
from diffujax.models.family import LM_HEAD

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units as transformers uses them; ``GiB`` binary)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not m:
        raise CheckpointError(f"max shard size {size!r} is not a size like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def hf_tensors(config: ModelConfig, params: Mapping[str, np.ndarray], layout: Mapping | None = None,
               dtype=None) -> Iterator[tuple[str, tuple[int, ...], np.dtype, callable]]:
    """``(name, shape, dtype, make)`` for each tensor of the Hugging Face file, in file order;
    ``make()`` builds the tensor (only then is memory spent on it)."""
    layout = layout or {}
    family = family_of(config)
    kmap = family.keymap(config, layout.get("naming", "transformers"))

    def out_dtype(path):
        return np.dtype(dtype) if dtype is not None else params[path].dtype

    def make(entry, layer):
        parts = [params[p][layer] if layer is not None else params[p] for p in entry.paths]
        return entry.to_hf(parts).astype(out_dtype(entry.paths[0]), copy=False)

    for name, (entry, layer) in kmap.expand(config.num_layers).items():
        yield name, entry.shape, out_dtype(entry.paths[0]), (lambda e=entry, i=layer: make(e, i))
    if config.tie_word_embeddings and layout.get("tied_head_stored"):
        emb = family.embedding
        yield LM_HEAD, params[emb].shape, out_dtype(emb), lambda: params[emb].astype(out_dtype(emb))


def write_safetensors(directory, tensors, max_shard_size="5GB") -> list[str]:
    """Write ``(name, shape, dtype, make)`` tensors into ``model.safetensors``, or into
    ``model-0000k-of-0000n.safetensors`` shards plus an index when they exceed ``max_shard_size``
    (a tensor larger than the limit gets a shard of its own). One shard in memory at a time."""
    directory = paths.resolve(directory)
    limit = parse_size(max_shard_size)
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t[1])) * np.dtype(t[2]).itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    n = len(shards)
    files = [SAFETENSORS] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map, total = {}, 0
    bar = console.progress(total=sum(map(len, shards)), desc="write", unit="tensor")
    for file, shard in zip(files, shards):
        arrays = {}
        for name, _, _, make in shard:
            arrays[name] = make()
            bar.update(1)
        try:
            with paths.writing_file(directory / file) as local:  # safetensors: local files
                save_file(arrays, str(local), metadata={"format": "pt"})
                paths.chmod_as_created(local)
        except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error type
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
            raise OSError(getattr(e, "errno", None) or errno.EIO, reason, file) from None
        for name, a in arrays.items():
            weight_map[name] = file
            total += a.nbytes
        del arrays
    bar.close()
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files
