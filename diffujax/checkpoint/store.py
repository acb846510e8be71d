"""The diffujax model checkpoint: a directory any diffujax command can load.

    config.json     the model config as a Hugging Face config dict (incl. mask_token_id), with a
                    "diffujax" section: format version and how to write the weights back to HF
    params/         the parameters, saved by orbax: a tree laid out as the ``param_specs`` paths
                    (stacked per-layer weights, diffujax layout)
    checksums.json  two sums per parameter (``checkpoint.integrity``), verified on every load:
                    damage orbax reads without complaint is found and named
    tokenizer.json, tokenizer_config.json, ...   tokenizer files, copied along
    .complete       written last: a directory without it is an interrupted write

``load`` restores straight into the shardings it is given (abstract targets carry them), so a
model is never materialised whole on one device when a mesh is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import type_handlers as th

from diffujax import paths
from diffujax.checkpoint.errors import CheckpointError
from diffujax.checkpoint.hf_read import dtype_name, parse_dtype, read_config
from diffujax.checkpoint.integrity import by_device_set, checksums, first_mismatch, local_value
from diffujax.checkpoint.tokenizer_files import copy_tokenizer_files
from diffujax.checkpoint.version import stamp
from diffujax.models import Params, family_of, flatten, nest, param_specs
from diffujax.models.configs import ModelConfig

PARAMS = "params"
CHECKSUMS = "checksums.json"
COMPLETE = paths.COMPLETE


def check_separate(src, dst, what: str = "destination") -> None:
    """Refuse a ``dst`` that is ``src``, contains it or lies inside it (an ``--overwrite``
    would delete the source, or the output would be written into it)."""
    def parts(p):
        text = os.fspath(p)
        if paths.is_remote(text):
            return tuple(text.rstrip("/").split("/"))
        return pathlib.Path(os.path.realpath(os.path.expanduser(text))).parts
    a, b = parts(src), parts(dst)
    clash = ("is the source itself" if a == b else f"contains the source {src}"
             if a[:len(b)] == b else f"lies inside the source {src}" if b[:len(a)] == a else None)
    if clash:
        raise CheckpointError(f"{dst}: the {what} {clash}; choose a directory outside it")


@contextlib.contextmanager
def scratch_directory(dst, purpose: str = "export"):
    """A local temporary directory beside ``dst`` (stale ones of killed runs removed first),
    removed on exit."""
    dst = pathlib.Path(os.fspath(dst)).expanduser().absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    paths.remove_stale_scratch(dst)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=paths.scratch_prefix(dst, purpose),
                                        dir=dst.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_directory(dst, overwrite: bool = False):
    """Yield where to write ``dst``'s contents; never a half-written ``dst`` (``paths``: a
    temporary directory renamed into place, or on an object store a completion marker)."""
    return paths.atomic_directory(dst, overwrite, error=CheckpointError)


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
    hf["diffujax"] = stamp({"hf_naming": layout.get("naming", "transformers"),
                            "hf_tied_head_stored": bool(layout.get("tied_head_stored", False))})
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    saver = _saver()
    try:
        saver.save(directory / PARAMS, args=ocp.args.PyTreeSave(nest(dict(params))))
    finally:
        saver.close()
    # One array at a time: the host copies of a converted model never meet on a device at once.
    sums = {name: checksums({name: x})[name] for name, x in params.items()}
    if jax.process_index() == 0:
        (directory / CHECKSUMS).write_text(json.dumps(sums, sort_keys=True) + "\n")


def mark_complete(directory):
    (paths.resolve(directory) / COMPLETE).write_text("ok\n")


def save(directory, config: ModelConfig, params, *, tokenizer_from=None, layout=None,
         overwrite: bool = False) -> epath.Path:
    """Save a model (``params``: its parameter tree, or the flat ``{spec path: array}`` dict)
    with its config, and the tokenizer files found in ``tokenizer_from``. Single-process,
    atomic."""
    flat = flatten(params)
    check_params(config, flat, str(directory))
    with atomic_directory(directory, overwrite) as tmp:
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)
        write(tmp, config, flat, layout)
        mark_complete(tmp)
    return paths.resolve(directory)


def check_params(config, flat, where):
    """Every weight of the config's table present, with its shape (``flat``: spec path ->
    array); raise naming the first that is not."""
    for path, spec in param_specs(config).items():
        if path not in flat:
            raise CheckpointError(f"{where}: parameter {path!r} is missing")
        if tuple(flat[path].shape) != spec.shape:
            raise CheckpointError(f"{where}: parameter {path!r} has shape {tuple(flat[path].shape)},"
                                  f" the config implies {spec.shape}")


def read_meta(directory) -> tuple[ModelConfig, dict]:
    """Config and the "diffujax" section of a checkpoint's config.json (checks completeness and
    the format version, before the config is interpreted)."""
    directory = paths.resolve(directory)
    if not (directory / COMPLETE).is_file():
        what = "incomplete or not a diffujax checkpoint" if directory.exists() else "not found"
        raise CheckpointError(f"{directory}: {what} (no {COMPLETE} marker)")
    return read_config(directory, "model")


def _sharding_for(config: ModelConfig, shardings) -> Callable[[str], Any]:
    """Normalise ``shardings`` to a function of the spec path: None (first device), a callable
    ``(path, ParamSpec) -> Sharding``, or a tree like the params."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return lambda path: device
    if callable(shardings) and not isinstance(shardings, Mapping):
        specs = param_specs(config)
        return lambda path: shardings(path, specs[path])
    return flatten(shardings).__getitem__


def _restore(directory, config, dtype, shardings) -> tuple[ModelConfig, dict[str, jax.Array]]:
    """The flat parameters of the checkpoint in ``directory`` (``read_meta`` has checked it), and
    ``config`` with their dtype: names and shapes checked before any array is read, checksums and
    finiteness after (of the stored bits: ``dtype`` casts afterwards)."""
    directory = paths.resolve(directory)
    where = directory / PARAMS
    ckptr = ocp.StandardCheckpointer()
    try:
        stored = flatten(ckptr.metadata(where).item_metadata.tree)
        specs = param_specs(config)
        if set(stored) != set(specs):
            raise CheckpointError(f"{where}: parameters {sorted(set(stored) ^ set(specs))[:5]} do"
                                  " not match the model in config.json")
        for p in specs:
            if tuple(stored[p].shape) != specs[p].shape:
                raise CheckpointError(f"{where}: parameter {p!r} has shape {tuple(stored[p].shape)},"
                                      f" config.json implies {specs[p].shape}")
        sharding = _sharding_for(config, shardings)
        target = {p: jax.ShapeDtypeStruct(s.shape, stored[p].dtype, sharding=sharding(p))
                  for p, s in specs.items()}
        flat = flatten(ckptr.restore(where, nest(target)))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore: files missing or damaged
        raise CheckpointError(f"{where}: the parameters cannot be read (files"
                              f" missing or damaged: {type(e).__name__}: {str(e)[:200]})") from None
    finally:
        ckptr.close()
    record = directory / CHECKSUMS
    if not record.exists():
        raise CheckpointError(f"{record}: missing (the checkpoint is damaged)")
    name = first_mismatch(json.loads(record.read_text()), checksums(flat))
    if name is not None:
        raise CheckpointError(f"{where}: parameter {name!r} does not match its saved"
                              " checksum (the files are damaged)")
    check_finite(flat, str(where))
    if dtype is not None:
        for name in flat:  # one at a time: each stored copy is released once it is cast
            flat[name] = flat[name].astype(dtype)  # keeps its sharding
    return config.replace(param_dtype=dtype_name(flat[family_of(config).embedding].dtype)), flat


@jax.jit
def _all_finite(leaves):
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def check_finite(flat: Mapping[str, Any], where: str) -> None:
    """Refuse parameters holding NaN or inf: one reduction per array, on the devices that hold
    it (grouped by device set: one program per group), naming the first bad tensor."""
    inexact = [(name, x) for name, x in flat.items() if jnp.issubdtype(x.dtype, jnp.inexact)]
    for members in by_device_set(inexact):
        ok = [bool(local_value(v)) for v in _all_finite([x for _, x in members])]
        bad = [name for (name, _), good in zip(members, ok) if not good]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise CheckpointError(f"{where}: parameter {sorted(bad)[0]!r} holds NaN or inf"
                                  f" values{more}; the checkpoint is unusable")


def load(directory, *, dtype=None, shardings=None) -> tuple[ModelConfig, Params]:
    """``(config, params)``: ``params`` is the parameter tree (``models.forward(config, params,
    ...)`` runs it). ``dtype`` casts once the checksums are verified;
    ``shardings`` (see ``_sharding_for``) places each parameter as it is read. The config's
    ``param_dtype`` is set to the dtype the parameters now have."""
    config, flat = _restore(directory, read_meta(directory)[0], parse_dtype(dtype), shardings)
    return config, nest(flat)


def load_numpy(directory, dtype=None) -> tuple[ModelConfig, dict[str, np.ndarray], dict]:
    """Host copies of the parameters as a flat dict, and the HF layout, for export."""
    config, meta = read_meta(directory)
    config, flat = _restore(directory, config, parse_dtype(dtype), None)
    layout = {"naming": meta.get("hf_naming", "transformers"),
              "tied_head_stored": meta.get("hf_tied_head_stored", False)}
    return config, {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}, layout
