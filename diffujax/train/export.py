"""Model checkpoints out of a training run: ``final/`` at the end of the run, or any
``checkpoints/STEP`` afterwards (``diffujax export RUN_DIR DST``), as a diffujax model checkpoint
(``checkpoint.store`` format) or a Hugging Face directory."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings

import dataclasses
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from safetensors.numpy import save_file

from diffujax import paths
from diffujax.checkpoint import store
from diffujax.checkpoint.convert import export
from diffujax.checkpoint.errors import CheckpointError
from diffujax.checkpoint.tokenizer_files import copy_tokenizer_files
from diffujax.config import from_dict
from diffujax.models import flatten, lora
from diffujax.train.state import export_params
from diffujax.train.checkpointing import (CONFIG, INTEGRITY, META, STATE,
                                          model_config_from_meta, newest_usable, read_meta,
                                          saved_steps, stored_state_tree, sync, verify)


def _is_step_dir(path) -> bool:
    path = paths.resolve(path)
    return (path / META).exists() and (path / STATE).exists()


def find_step_dir(path, step: int | None = None) -> epath.Path:
    """Accept ``RUN_DIR``, ``RUN_DIR/checkpoints`` or ``RUN_DIR/checkpoints/STEP``; newest step
    when ``step`` is None."""
    path = paths.resolve(path)
    if _is_step_dir(path):
        return path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = saved_steps(path)
    if step is None:
        if not steps:
            raise FileNotFoundError(f"{path}: no training checkpoints")
        step = steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"{path}: no checkpoint for step {step} (have {steps})")
    return path / str(step)


def is_training_checkpoint(path) -> bool:
    """Is ``path`` a run dir, its ``checkpoints`` dir or one ``checkpoints/STEP`` (as opposed to
    a diffujax model checkpoint)?"""
    try:
        find_step_dir(path)
        return True
    except OSError:
        return False


def load_params(step_dir, *, params_key: str = "params"):
    """The model parameters of a training checkpoint as host numpy arrays (only that subtree is
    read; the optimizer state stays on disk)."""
    step_dir = epath.Path(os.fspath(step_dir))
    saved = stored_state_tree(step_dir)
    if params_key not in saved:
        raise CheckpointError(f"{step_dir}: state has no {params_key!r} (has {sorted(saved)})")
    target = {params_key: jax.tree.map(lambda m: np.empty((), np.dtype(m.dtype)),
                                       saved[params_key])}
    restore_args = {params_key: jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray),
                                             saved[params_key])}
    with contextlib.closing(ocp.PyTreeCheckpointer()) as checkpointer:
        return checkpointer.restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))[params_key]


def save_model(directory, model_cfg, params, *, tokenizer_from=None):
    """``params`` (sharded or not) as a diffujax model checkpoint (``checkpoint.store`` format).

    Single process: ``store.save`` (atomic). Several processes: every process writes its shards
    with orbax into ``DIR.tmp``; process 0 adds config, tokenizer files and the completion
    marker, then renames it into place (in a bucket, where directories cannot be renamed, they
    write ``DIR`` itself and the marker written last says it is complete).
    """
    directory = paths.resolve(directory)
    if jax.process_count() == 1:
        host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
        store.save(directory, model_cfg, host, tokenizer_from=tokenizer_from, overwrite=True)
        return directory
    remote = paths.is_remote(directory)
    tmp = directory if remote else directory.parent / f"{directory.name}.tmp"
    if jax.process_index() == 0 and tmp.exists():
        tmp.rmtree()
    sync("diffujax_save_model_start")
    if jax.process_index() == 0:
        tmp.mkdir(parents=True)
    sync("diffujax_save_model_dir")
    store.write(tmp, model_cfg, flatten(params))
    sync("diffujax_save_model_written")
    if jax.process_index() == 0:
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)
        store.mark_complete(tmp)
        if not remote:
            if directory.exists():
                directory.rmtree()
            tmp.rename(directory)
    sync("diffujax_save_model_done")
    return directory


def export_final(out_dir, run_cfg, model_cfg, state, tokenizer_dir, logger, *,
                 missing_only=False):
    """``output_dir/final`` (and ``final_ema`` when an EMA is kept): diffujax model checkpoints
    (a LoRA run's with the adapters folded in). ``missing_only``: write only those without their
    completion marker (a rerun of a finished run completes what a killed attempt left unwritten
    or half-written, e.g. in a bucket)."""
    targets = [("final", False)] + ([("final_ema", True)] if state.ema is not None else [])
    for name, ema in targets:
        if missing_only and paths.is_complete(out_dir / name):
            continue
        params = export_params(state, run_cfg, model_cfg, ema=ema)
        save_model(out_dir / name, model_cfg, params, tokenizer_from=tokenizer_dir)
        logger.message(f"model saved to {out_dir / name} (diffujax eval/generate --checkpoint"
                       f" {out_dir / name}; diffujax export {out_dir / name} HF_DIR)")


@dataclasses.dataclass
class StepWeights:
    """The weights of one training step: ``trained`` (the params or the EMA) and, for a LoRA run,
    its frozen base and adapter spec."""
    model_cfg: Any
    trained: Any
    meta: dict
    frozen: Any = None
    lora: Any = None  # models.lora.LoraSpec of a LoRA run
    base_checkpoint: str | None = None  # a LoRA run's model.checkpoint

    def model_params(self):
        """Plain model weights (a LoRA run's adapters folded into its base)."""
        if self.lora is None:
            return self.trained
        return lora.merged(self.model_cfg, self.lora, self.frozen, self.trained)


def _step_params(step_dir, params_key: str) -> StepWeights:
    """One step's weights, verified against the checksums saved with it; CheckpointError (one
    line) for any damage."""
    step_dir = epath.Path(os.fspath(step_dir))
    try:
        meta = read_meta(step_dir)  # checks the format version first
        model_cfg = model_config_from_meta(meta)
        integrity = json.loads((step_dir / INTEGRITY / "metadata").read_text())
        trees = {params_key: load_params(step_dir, params_key=params_key)}
        spec = base = None
        if stored_state_tree(step_dir).get("frozen"):  # a LoRA run: the base is saved too
            trees["frozen"] = load_params(step_dir, params_key="frozen")
            run_cfg = from_dict(json.loads((step_dir / CONFIG / "metadata").read_text()))
            spec, base = run_cfg.lora_spec(model_cfg), run_cfg.model.checkpoint
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax / JSON: files missing, truncated, damaged
        raise CheckpointError(f"{step_dir}: unreadable ({type(e).__name__}: {str(e)[:200]})"
                              ) from None
    verify(integrity, step_dir, meta=meta)
    for key, tree in trees.items():
        verify(integrity, step_dir, arrays={key: tree}, prefix=f"{key}/")
    return StepWeights(model_cfg, trees[params_key], meta, trees.get("frozen"), spec, base)


def read_step_weights(run_dir, step: int | None, *, ema: bool = False) -> StepWeights:
    """The weights of a training checkpoint. ``run_dir``: the run's ``output_dir``, its
    ``checkpoints`` dir or one ``checkpoints/STEP``; ``step``: None for the newest usable one: as
    when training resumes, a step that is damaged (checksums, missing or truncated files) is
    reported and the previous one is used. Only the parameters (or the EMA), and a LoRA run's
    base, are read."""
    params_key = "ema" if ema else "params"
    newest = find_step_dir(run_dir, step)
    if step is not None or _is_step_dir(run_dir):
        return _step_params(newest, params_key)  # one step asked for: its damage is an error
    found, failed = newest_usable(newest.parent, saved_steps(newest.parent),
                                  lambda s: _step_params(newest.parent / str(s), params_key))
    if found is None:
        raise CheckpointError(f"{newest.parent}: no step can be exported (newest:"
                              f" {failed[0][1]})")
    return found


def export_step(run_dir, step: int | None, dst, *, hf_dir=None, ema: bool = False,
                overwrite: bool = False):
    """Training checkpoint -> diffujax model checkpoint ``dst`` (and Hugging Face ``hf_dir``):
    ``read_step_weights``'s, a LoRA run's with its adapters folded in. Single process."""
    for target in (dst, hf_dir):
        if target is not None:
            store.check_separate(run_dir, target)
    weights = read_step_weights(run_dir, step, ema=ema)
    tokenizer_dir = weights.meta.get("tokenizer_dir")
    if tokenizer_dir and not paths.resolve(tokenizer_dir).is_dir():
        warnings.warn(f"tokenizer dir {tokenizer_dir} of the run is gone: {dst} has no tokenizer")
        tokenizer_dir = None
    store.save(dst, weights.model_cfg, weights.model_params(), tokenizer_from=tokenizer_dir,
               overwrite=overwrite)
    if hf_dir is not None:
        export(dst, hf_dir, overwrite=overwrite)
    return paths.resolve(dst)


def export_adapter(run_dir, dst, *, step: int | None = None, ema: bool = False,
                   overwrite: bool = False, base_model: str | None = None):
    """A LoRA run's adapters -> a PEFT LoRA adapter directory (``adapter_config.json``,
    ``adapter_model.safetensors``) that ``peft`` loads onto the base model's Hugging Face export
    (``base_model``: its name or path, recorded in the config; default the run's
    ``model.checkpoint``)."""
    store.check_separate(run_dir, dst)
    weights = read_step_weights(run_dir, step, ema=ema)
    if weights.lora is None:
        raise CheckpointError(f"{run_dir}: not a LoRA run (model.lora unset): export the model"
                              " without --adapter")
    try:
        tensors, modules = lora.peft_tensors(weights.model_cfg, weights.lora, weights.trained)
    except lora.AdapterExportError as e:
        raise CheckpointError(f"{run_dir}: {e}") from None
    if base_model is None:
        base_model = weights.base_checkpoint
    config = lora.peft_config(weights.lora, modules, base_model)
    with store.atomic_directory(dst, overwrite) as tmp:
        try:
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            with paths.writing_file(tmp / "adapter_model.safetensors") as local:
                save_file(tensors, local)
        except OSError as e:
            raise CheckpointError(f"writing {dst} failed: {e.strerror or e}; nothing was left"
                                  f" at {dst}") from None
    return paths.resolve(dst)


def export_hf(src, hf_dir, *, step: int | None = None, ema: bool = False, **export_kwargs):
    """Training checkpoint -> Hugging Face directory in one go (``diffujax export RUN_DIR HF``):
    a temporary diffujax model checkpoint next to ``hf_dir`` (one a killed export left behind is
    removed), then ``checkpoint.convert.export`` with ``export_kwargs`` (max_shard_size, dtype,
    overwrite, naming)."""
    store.check_separate(src, hf_dir)
    if paths.resolve(hf_dir).exists() and not export_kwargs.get("overwrite"):
        raise CheckpointError(f"{hf_dir}: already exists (pass --overwrite to replace it)")
    # Beside hf_dir, or for a bucket destination in local scratch.
    scratch = (tempfile.TemporaryDirectory(prefix=".diffujax-export-")
               if paths.is_remote(hf_dir) else store.scratch_directory(hf_dir, "export"))
    with scratch as tmp:
        model_dir = export_step(src, step, os.path.join(tmp, "model"), ema=ema)
        return export(model_dir, hf_dir, **export_kwargs)
