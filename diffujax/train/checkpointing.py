"""Training checkpoints: orbax ``CheckpointManager`` plus the things a preempted run needs.

Layout of ``RUN_DIR/checkpoints/STEP/``:

    state/   the TrainState pytree (params, optimizer state, step, rng, ema, counters), sharded
    data/    the data iterator's state, one ``process_I-of-N.json`` per process
    config/  the run config (JSON)
    meta/    step, wall time, process/device counts, the model config (what export needs)

Saves are asynchronous (the arrays are copied to host memory before ``save`` returns, so the step
may donate its buffers right after), every ``save_every`` steps, keeping the last ``keep_last``
plus every ``keep_every``-th step forever. ``PreemptionGuard`` turns SIGTERM / SIGINT (or, on a
multi-host run, JAX's preemption sync point) into "save now and exit". ``restore_latest`` restores
into abstract targets that carry the *current* shardings, so a run may resume on a different
topology, and falls back to the previous step when the latest one is truncated or corrupt.

Out of a run: ``save_model`` writes a diffujax model checkpoint (``checkpoint.store`` format,
multi-host safe) and ``export_step`` / ``export_hf`` turn any ``checkpoints/STEP`` into one or
into a Hugging Face directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import tempfile
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from diffujax import paths
from diffujax.attention.config import AttentionConfig
from diffujax.checkpoint import store, tree
from diffujax.checkpoint.convert import export
from diffujax.checkpoint.errors import CheckpointError as _CheckpointError
from diffujax.checkpoint.tokenizer_files import copy_tokenizer_files
from diffujax.models import FAMILIES
from diffujax.plain import to_plain

log = logging.getLogger(__name__)

STATE, DATA, CONFIG, META = "state", "data", "config", "meta"
CORRUPT_DIR = "corrupt"  # bad steps are moved here (never deleted: they may still hold work)


class CheckpointError(_CheckpointError):
    """No usable training checkpoint where one was expected (the message says which steps were
    tried); a ValueError, so the command line prints it as one line."""


# ---------------------------------------------------------------------------------------------
# Data-iterator state: one small JSON file per process (each host reads its own shard of data).


class DataStateHandler(ocp.CheckpointHandler):
    """Writes / reads a JSON-able dict per process; restore returns the dict (or None)."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        path = epath.Path(directory) / _data_file()
        path.write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None):
        """The dict, or None when this process has none (the run was saved with another number
        of processes: the caller decides; it is not a damaged checkpoint)."""
        path = epath.Path(directory) / _data_file()
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def _data_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


# ---------------------------------------------------------------------------------------------
# Preemption: a flag set by a signal handler (single process) or JAX's sync point (multi-host).


class PreemptionGuard:
    """``with PreemptionGuard() as guard: ... if guard.requested(step): save; exit``.

    JAX's preemption service only exists after ``jax.distributed.initialize`` (and then it owns
    SIGTERM), so a single-process run installs its own handlers that just set a flag; the loop
    checks it once per step. A second SIGINT interrupts immediately (the default handler is put
    back after the first), so a stuck run can still be killed with Ctrl-C twice.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.signal_name: str | None = None
        self._previous: dict = {}
        self._multihost = jax.process_count() > 1

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        log.warning("%s received: saving a checkpoint after the current step, then exiting",
                    self.signal_name)

    def __enter__(self):
        if not self._multihost:
            for s in self.signals:
                try:
                    self._previous[s] = signal.signal(s, self._handle)
                except ValueError:  # not the main thread: leave signals alone
                    pass
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def requested(self, step: int) -> bool:
        """Must be called by every process at every step (multi-host: it is a collective)."""
        if self._multihost:
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signal_name = self.signal_name or "preemption notice"
            except RuntimeError:  # preemption service disabled
                pass
        return self.signal_name is not None


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: Any = None  # None when the checkpoint holds none for this process
    config: dict | None = None
    meta: dict | None = None


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs for ``tree`` (arrays or ShapeDtypeStructs), with ``shardings`` (a matching
    pytree, or None to keep each leaf's own sharding): the restore target."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


class TrainCheckpointer:
    """Asynchronous, rotating, preemption-aware checkpoints of one run.

    ``save_every``: steps between periodic saves; ``keep_last``: how many recent steps to keep;
    ``keep_every``: also keep every step divisible by it (None: none).
    """

    def __init__(self, directory, *, save_every: int = 1000, keep_last: int = 3,
                 keep_every: int | None = None, async_save: bool = True):
        self.directory = paths.resolve(directory)  # a local path or a bucket URL
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last if keep_last and keep_last > 0 else None,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=True,
            # Half-written temporary dirs of a killed save are removed on start.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=(STATE, DATA, CONFIG, META))

    # -- saving --------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def is_due(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state, *, data_state=None, config: dict | None = None,
             meta: dict | None = None, force: bool = False) -> bool:
        """Start an asynchronous save of ``step`` if due (or ``force``); True if one started.
        A step that already has a checkpoint is never rewritten. Call on every process."""
        step = int(step)
        if not (force or self.is_due(step)) or step in self.manager.all_steps():
            return False
        meta = dict(meta or {}, step=step, time=time.time(), process_count=jax.process_count(),
                    device_count=jax.device_count())
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: DataStateSave(data_state),
            CONFIG: ocp.args.JsonSave(to_plain(config or {})),
            META: ocp.args.JsonSave(to_plain(meta)),
        })
        return bool(self.manager.save(step, args=args, force=True))

    def wait(self):
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    # -- restoring -----------------------------------------------------------------------------

    def restore(self, step: int, abstract_state, *, restore_data: bool = True) -> Restored:
        """Restore ``step`` into ``abstract_state`` (ShapeDtypeStructs with the wanted shardings).
        Raises if the checkpoint is incomplete or unreadable."""
        step_dir = self.directory / str(step)
        missing = [n for n in ("_CHECKPOINT_METADATA", STATE, META) if not (step_dir / n).exists()]
        if missing:
            raise CheckpointError(f"checkpoint {step_dir} is incomplete: missing {missing}")
        items = {STATE: ocp.args.StandardRestore(abstract_state),
                 CONFIG: ocp.args.JsonRestore(), META: ocp.args.JsonRestore()}
        if restore_data and (step_dir / DATA).exists():
            items[DATA] = DataStateRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = out[META] or {}
        if meta.get("step", step) != step:
            raise CheckpointError(f"checkpoint {step_dir} says it is step {meta.get('step')}")
        return Restored(step=step, state=out[STATE], data_state=out.get(DATA),
                        config=out[CONFIG], meta=meta)

    def restore_latest(self, abstract_state, *, restore_data: bool = True) -> Restored | None:
        """Restore the newest readable step; None when there is no checkpoint at all.

        A step that fails to restore (truncated, missing files, no commit marker) is reported with
        a warning naming it and the previous step is tried. Once an older step restores, the bad
        newer ones are moved to ``checkpoints/corrupt/`` (so later saves of the same step numbers
        are possible; nothing is deleted). If no step restores, nothing is moved: the usual cause
        is a configuration that no longer matches the saved state (optimizer, EMA, model), not
        damage to every checkpoint, and the user's work must stay where it is.
        """
        failed = []
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(step, abstract_state, restore_data=restore_data)
            except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
                reason = f"{type(e).__name__}: {str(e)[:200]}"
                failed.append((step, reason))
                warnings.warn(f"checkpoint step {step} in {self.directory} is unusable ({reason});"
                              " falling back to the previous checkpoint", RuntimeWarning,
                              stacklevel=2)
                continue
            for bad_step, _ in failed:
                self._quarantine(bad_step)
            return restored
        if failed:
            steps = [s for s, _ in failed]
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores into the current configuration"
                f" (steps {steps}; newest: {failed[0][1]}). If the optimizer, EMA or model"
                " settings changed, restore them or start a new output_dir; nothing was moved"
                " or deleted")
        return None

    def _quarantine(self, step: int):
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory / CORRUPT_DIR / f"{step}-{int(time.time())}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.exists():
                src.rename(dst)
        _sync(f"diffujax_quarantine_{step}")
        self.manager.reload()


def _sync(name: str):
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def find_step_dir(path, step: int | None = None) -> epath.Path:
    """Accept ``RUN_DIR``, ``RUN_DIR/checkpoints`` or ``RUN_DIR/checkpoints/STEP``; newest step
    when ``step`` is None."""
    path = paths.resolve(path)
    if (path / META).exists() and (path / STATE).exists():
        return path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []
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
    except (FileNotFoundError, OSError):
        return False


def read_meta(step_dir) -> dict:
    p = epath.Path(os.fspath(step_dir))
    return json.loads((p / META / "metadata").read_text())


def load_params(step_dir, *, params_key: str = "params"):
    """The model parameters of a training checkpoint as host numpy arrays (only that subtree is
    read; the optimizer state stays on disk)."""
    step_dir = epath.Path(os.fspath(step_dir))
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(step_dir / STATE).item_metadata.tree
    if params_key not in tree:
        raise CheckpointError(f"{step_dir}: state has no {params_key!r} (has {sorted(tree)})")
    target = {params_key: jax.tree.map(lambda m: np.empty((), np.dtype(m.dtype)), tree[params_key])}
    restore_args = {params_key: jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray),
                                             tree[params_key])}
    out = checkpointer.restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
    return _unwrap_variables(out[params_key])


def _unwrap_variables(tree):
    """An ``nnx.Param`` is stored as ``{"value": array}``: give back plain nested arrays."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return tree["value"]
        return {k: _unwrap_variables(v) for k, v in tree.items()}
    return tree


def model_config_to_dict(config) -> dict:
    """A model config as JSON-able fields plus its family (exact: ``model_config_from_dict``
    gives back an equal config)."""
    return dict(to_plain(dataclasses.asdict(config)), family=config.family)


def model_config_from_dict(d: dict):
    fields = dict(d)
    cls = FAMILIES[fields.pop("family")].config
    tuples = lambda v: tuple(tuples(x) for x in v) if isinstance(v, list) else v  # JSON lists back
    fields = {k: tuples(v) for k, v in fields.items()}
    legacy_backend = fields.pop("attention_backend", "auto")  # metadata before AttentionConfig
    fields["attention"] = AttentionConfig.from_dict(
        fields.get("attention", {"backend": legacy_backend}))
    return cls(**fields)


def saved_model_config(directory):
    """The model config recorded by the newest checkpoint whose metadata is readable, or None."""
    directory = epath.Path(os.fspath(directory))
    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True) \
        if directory.is_dir() else []
    for step in steps:
        try:
            return model_config_from_dict(read_meta(directory / str(step))["model_config"])
        except Exception:  # noqa: BLE001 - a broken step: restore_latest reports it
            continue
    return None


# ---------------------------------------------------------------------------------------------
# Model checkpoints out of a run: ``final/`` at the end, or any step afterwards (and HF).


def save_model(directory, model_cfg, params, *, tokenizer_from=None, overwrite: bool = True):
    """``params`` (sharded or not) as a diffujax model checkpoint (``checkpoint.store`` format).

    Single process: ``store.save`` (atomic). Several processes: every process writes its shards
    with orbax into ``DIR.tmp``; process 0 adds config, tokenizer files and the completion
    marker, then renames it into place (in a bucket, where directories cannot be renamed, they
    write ``DIR`` itself and the marker written last says it is complete).
    """
    directory = paths.resolve(directory)
    if jax.process_count() == 1:
        host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
        store.save(directory, model_cfg, host, tokenizer_from=tokenizer_from, overwrite=overwrite)
        return directory
    remote = paths.is_remote(directory)
    tmp = directory if remote else directory.parent / f"{directory.name}.tmp"
    if jax.process_index() == 0 and tmp.exists():
        tmp.rmtree()
    _sync("diffujax_save_model_start")
    if jax.process_index() == 0:
        tmp.mkdir(parents=True)
    _sync("diffujax_save_model_dir")
    store.write(tmp, model_cfg, tree.from_state(model_cfg, params))
    _sync("diffujax_save_model_written")
    if jax.process_index() == 0:
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)
        store.mark_complete(tmp)
        if not remote:
            if directory.exists():
                directory.rmtree()
            tmp.rename(directory)
    _sync("diffujax_save_model_done")
    return directory


def export_step(run_dir, step: int | None, dst, *, hf_dir=None, ema: bool = False,
                overwrite: bool = False):
    """Training checkpoint -> diffujax model checkpoint ``dst`` (and Hugging Face ``hf_dir``).

    ``run_dir``: the run's ``output_dir``, its ``checkpoints`` dir or one ``checkpoints/STEP``;
    ``step``: None for the newest. Only the parameters (or the EMA) are read. Single process.
    """
    step_dir = find_step_dir(run_dir, step)
    meta = read_meta(step_dir)
    model_cfg = model_config_from_dict(meta["model_config"])
    params = load_params(step_dir, params_key="ema" if ema else "params")
    tokenizer_dir = meta.get("tokenizer_dir")
    if tokenizer_dir and not paths.resolve(tokenizer_dir).is_dir():
        warnings.warn(f"tokenizer dir {tokenizer_dir} of the run is gone: {dst} has no tokenizer")
        tokenizer_dir = None
    store.save(dst, model_cfg, params, tokenizer_from=tokenizer_dir, overwrite=overwrite)
    if hf_dir is not None:
        export(dst, hf_dir, overwrite=overwrite)
    return paths.resolve(dst)


def export_hf(src, hf_dir, *, step: int | None = None, ema: bool = False, **export_kwargs):
    """Training checkpoint -> Hugging Face directory in one go (``diffujax export RUN_DIR HF``):
    a temporary diffujax model checkpoint next to ``hf_dir``, then ``checkpoint.convert.export``
    with ``export_kwargs`` (max_shard_size, dtype, overwrite, naming)."""
    parent = None  # a bucket destination: the intermediate checkpoint goes to local scratch
    if not paths.is_remote(hf_dir):
        parent = os.fspath(paths.resolve(hf_dir).parent)
        os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".diffujax-export-", dir=parent) as tmp:
        model_dir = export_step(src, step, os.path.join(tmp, "model"), ema=ema)
        return export(model_dir, hf_dir, **export_kwargs)
