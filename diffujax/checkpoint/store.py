"""The diffujax model checkpoint: a directory any diffujax command can load.

    config.json     the model config as a Hugging Face config dict (incl. mask_token_id), with a
                    "diffujax" section: format version and how to write the weights back to HF
    params/         the parameters, saved by orbax: a tree laid out as the ``param_specs`` paths
                    (stacked per-layer weights, diffujax layout)
    tokenizer.json, tokenizer_config.json, ...   tokenizer files, copied along
    .complete       written last: a directory without it is an interrupted write

``load`` restores straight into the shardings it is given (abstract targets carry them), so a
model is never materialised whole on one device when a mesh is used.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from orbax.checkpoint import type_handlers as th

from diffujax import paths
from diffujax.checkpoint import tree
from diffujax.checkpoint.errors import CheckpointError
from diffujax.checkpoint.hf_read import dtype_name, parse_dtype, read_config
from diffujax.checkpoint.tokenizer_files import copy_tokenizer_files
from diffujax.models import family_of, param_specs
from diffujax.models.configs import ModelConfig

FORMAT = 1
PARAMS = "params"
COMPLETE = paths.COMPLETE


def atomic_directory(dst, overwrite: bool = False):
    """Yield where to write ``dst``'s contents; never a half-written ``dst`` (``paths``: a
    temporary directory renamed into place, or on an object store a completion marker)."""
    return paths.atomic_directory(dst, overwrite, error=CheckpointError)


def _checkpointer():
    return ocp.StandardCheckpointer()


def _saver():
    """A synchronous PyTree saver that writes host (numpy) arrays without first deep-copying
    them (orbax's default, a guard for async saves), so converting a model costs one copy of it,
    not two. The files are those of StandardCheckpointer, which restores them."""
    registry = th.create_type_handler_registry(
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, th.get_type_handler(jax.Array)))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


def write(directory, config: ModelConfig, params: Mapping[str, Any], layout: Mapping | None = None):
    """Write config.json and params/ into the (existing, empty) ``directory``; no marker."""
    directory = paths.resolve(directory)
    layout = layout or {}
    hf = config.to_hf()
    hf["dtype"] = dtype_name(params[family_of(config).embedding].dtype)
    hf["diffujax"] = {"format": FORMAT, "hf_naming": layout.get("naming", "transformers"),
                      "hf_tied_head_stored": bool(layout.get("tied_head_stored", False))}
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    saver = _saver()
    try:
        saver.save(directory / PARAMS, args=ocp.args.PyTreeSave(tree.nest(dict(params))))
    finally:
        saver.close()


def mark_complete(directory):
    (paths.resolve(directory) / COMPLETE).write_text("ok\n")


def save(directory, config: ModelConfig, params, *, tokenizer_from=None, layout=None,
         overwrite: bool = False) -> epath.Path:
    """Save a model (``params``: its ``nnx.State``, or a flat / nested dict of arrays) with its
    config, and the tokenizer files found in ``tokenizer_from``. Single-process, atomic."""
    flat = tree.from_state(config, params)
    _check_shapes(config, flat, str(directory))
    with atomic_directory(directory, overwrite) as tmp:
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)
        write(tmp, config, flat, layout)
        mark_complete(tmp)
    return paths.resolve(directory)


def _check_shapes(config, flat, where):
    for path, spec in param_specs(config).items():
        if path not in flat:
            raise CheckpointError(f"{where}: parameter {path!r} is missing")
        if tuple(flat[path].shape) != spec.shape:
            raise CheckpointError(f"{where}: parameter {path!r} has shape {tuple(flat[path].shape)},"
                                  f" the config implies {spec.shape}")


def read_meta(directory) -> tuple[ModelConfig, dict]:
    """Config and the "diffujax" section of a checkpoint's config.json (checks completeness)."""
    directory = paths.resolve(directory)
    if not (directory / COMPLETE).is_file():
        what = "incomplete or not a diffujax checkpoint" if directory.exists() else "not found"
        raise CheckpointError(f"{directory}: {what} (no {COMPLETE} marker)")
    _, config = read_config(directory)
    meta = json.loads((directory / "config.json").read_text()).get("diffujax") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / 'config.json'}: unknown diffujax checkpoint format"
                              f" {meta.get('format')!r} (expected {FORMAT})")
    return config, meta


def _sharding_for(config: ModelConfig, shardings) -> Callable[[str], Any]:
    """Normalise ``shardings`` to a function of the spec path: None (first device), one Sharding
    for all, a callable ``(path, ParamSpec) -> Sharding``, or a tree like the params."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return lambda path: device
    if isinstance(shardings, jax.sharding.Sharding):
        return lambda path: shardings
    if callable(shardings) and not isinstance(shardings, (Mapping, nnx.State)):
        specs = param_specs(config)
        return lambda path: shardings(path, specs[path])
    return tree.from_state(config, shardings).__getitem__


def _restore(directory, config: ModelConfig, dtype, shardings) -> dict[str, jax.Array]:
    directory = paths.resolve(directory)
    ckptr = _checkpointer()
    try:
        where = directory / PARAMS
        stored = tree.flatten(ckptr.metadata(where).item_metadata.tree)
        specs = param_specs(config)
        if set(stored) != set(specs):
            raise CheckpointError(f"{where}: parameters {sorted(set(stored) ^ set(specs))[:5]} do"
                                  " not match the model in config.json")
        for p in specs:
            if tuple(stored[p].shape) != specs[p].shape:
                raise CheckpointError(f"{where}: parameter {p!r} has shape {tuple(stored[p].shape)},"
                                      f" config.json implies {specs[p].shape}")
        sharding = _sharding_for(config, shardings)
        target = {p: jax.ShapeDtypeStruct(s.shape, dtype or stored[p].dtype, sharding=sharding(p))
                  for p, s in specs.items()}
        return tree.flatten(ckptr.restore(directory / PARAMS, tree.nest(target)))
    finally:
        ckptr.close()


def load(directory, *, dtype=None, shardings=None) -> tuple[ModelConfig, nnx.State]:
    """``(config, params)``: ``params`` is the model's ``nnx.State`` (``nnx.merge`` it with the
    graph of ``abstract_model(config)``, or use ``load_model``). ``dtype`` casts on restore;
    ``shardings`` (see ``_sharding_for``) places each parameter as it is read. The config's
    ``param_dtype`` is set to the dtype the parameters now have."""
    config, _ = read_meta(directory)
    dtype = parse_dtype(dtype)
    flat = _restore(directory, config, dtype, shardings)
    config = config.replace(param_dtype=dtype_name(flat[family_of(config).embedding].dtype))
    return config, tree.to_state(config, flat)


def load_model(directory, *, dtype=None, shardings=None) -> tuple[ModelConfig, nnx.Module]:
    config, params = load(directory, dtype=dtype, shardings=shardings)
    return config, tree.merge_model(config, params)


def load_numpy(directory, dtype=None) -> tuple[ModelConfig, dict[str, np.ndarray], dict]:
    """Host copies of the parameters as a flat dict, and the HF layout, for export."""
    config, meta = read_meta(directory)
    flat = _restore(directory, config, parse_dtype(dtype), None)
    flat = {k: tree.to_numpy(v) for k, v in flat.items()}
    config = config.replace(param_dtype=dtype_name(flat[family_of(config).embedding].dtype))
    layout = {"naming": meta.get("hf_naming", "transformers"),
              "tied_head_stored": meta.get("hf_tied_head_stored", False)}
    return config, flat, layout
