"""Training checkpoints: orbax ``CheckpointManager`` plus the things a preempted run needs.

Layout of ``RUN_DIR/checkpoints/STEP/``:

    state/   the TrainState pytree (params, optimizer state, step, rng, ema, counters), sharded
    data/    the data iterator's state, one ``process_I-of-N.json`` per process
    config/  the run config (JSON)
    meta/    the format version (``checkpoint.version``), step, wall time, process/device
             counts, the model config (what export needs)
    integrity/  checksums of the arrays and digests of config and meta

Saves are asynchronous (the arrays are copied to host memory before ``save`` returns, so the step
may donate its buffers right after), every ``save_every`` steps, keeping the last ``keep_last``
plus every ``keep_every``-th step forever. ``PreemptionGuard`` turns SIGTERM / SIGINT (or, on a
multi-host run, JAX's preemption sync point) into "save now and exit" (``runs.preemption``).
``restore_latest`` restores into abstract targets that carry the *current* shardings, so a run
may resume on a different topology, and falls back to the previous step when the latest one is
truncated or corrupt. Model checkpoints out of a run: ``train.export``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from diffujax import console, paths
from diffujax.checkpoint.errors import CheckpointError
from diffujax.checkpoint.integrity import checksums, first_mismatch, json_digest, local_value
from diffujax.checkpoint.version import FormatVersionError, check_version, stamp
from diffujax.models import ModelConfig, config_from_hf
from diffujax.plain import to_plain

log = logging.getLogger(__name__)

STATE, DATA, CONFIG, META, INTEGRITY = "state", "data", "config", "meta", "integrity"
CORRUPT_DIR = "corrupt"  # bad steps are moved here (never deleted: they may still hold work)


# ---------------------------------------------------------------------------------------------
# Data-iterator state: one small JSON file per process (each host reads its own shard of data),
# carrying the SHA-256 of its content.


class DataStateHandler(ocp.CheckpointHandler):
    """Writes / reads a JSON-able dict per process; restore returns the dict (or None)."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        path = epath.Path(directory) / _data_file()
        path.write_text(json.dumps({"state": args.state, "sha256": json_digest(args.state)}))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None):
        """The dict, or None when this process has none (saved with another number of
        processes, or deleted: the caller decides). A file whose digest does not match raises."""
        path = epath.Path(directory) / _data_file()
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if not (isinstance(record, dict) and set(record) == {"state", "sha256"}
                and json_digest(record["state"]) == record["sha256"]):
            raise CheckpointError(f"{path}: the data-iterator state does not match its checksum"
                                  " (damaged)")
        return record["state"]


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


@dataclasses.dataclass
class _NewestFinite(ocp.checkpoint_managers.PreservationPolicy):
    """Keeps the newest step whose state was finite when saved, however many came after it."""

    is_finite: Callable[[int], bool]

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        good = next((c.step for c in reversed(checkpoints) if self.is_finite(c.step)), None)
        return [c.step == good for c in checkpoints]


def _retention(keep_last: int | None, keep_every: int | None, is_finite):
    """The newest ``keep_last`` steps, the multiples of ``keep_every`` and the newest finite
    step (None, all steps: no ``keep_last``). Steps it drops are deleted once a save commits."""
    if (keep_last or 0) < 1:
        return None
    every = [ocp.checkpoint_managers.EveryNSteps(keep_every)] if keep_every else []
    return ocp.checkpoint_managers.AnyPreservationPolicy(
        [ocp.checkpoint_managers.LatestN(keep_last), _NewestFinite(is_finite), *every])


class SaveFailed(OSError):
    """A checkpoint could not be written (a full disk, a failing bucket): the run must stop at
    once; the steps saved before it are intact."""

    def __init__(self, step: int, step_dir, error: BaseException):
        text = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        reason = getattr(error, "strerror", None) or text
        super().__init__(f"checkpoint {step_dir} could not be written: {reason}")
        self.step = step


def _quiet_background_save_errors(record) -> bool:
    """orbax logs a failed background save with a traceback from each of its threads, steps
    before the run can see it; the run reports the failure in one line (``SaveFailed``)
    instead. Errors of other origin, and everything under ``--debug``, pass (a log filter)."""
    from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
    return not (from_orbax and record.levelno >= logging.ERROR and record.exc_info
                and not console.debug_enabled())


def _quiet_abandoned_writes() -> None:
    """After a failed save, the array writes orbax abandoned still finish and report to its
    closed event loop; the error each raises there is "unraisable" (native code), a traceback
    per array. The run has said what failed: those are dropped (not under ``--debug``)."""
    previous = sys.unraisablehook

    def hook(info):
        if not (info.exc_type is RuntimeError and str(info.exc_value) == "Event loop is closed"):
            previous(info)

    if not console.debug_enabled():
        sys.unraisablehook = hook


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: Any = None  # None only when the data stream restarts (restart_data)
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


def verify(integrity: dict, step_dir, *, config=None, meta=None, arrays=None, prefix: str = ""):
    """Raise if the run config or meta of a step do not match the digests saved with it, naming
    it, or if an array of ``arrays`` (under ``prefix``) does not match its saved checksum, naming
    the first damaged (or unrecorded) one."""
    for name, value in ((CONFIG, config), (META, meta)):
        if value is not None and json_digest(value) != integrity.get(f"{name}_sha256"):
            raise CheckpointError(f"{step_dir}/{name}: does not match its checksum (damaged)")
    name = None if arrays is None else first_mismatch(integrity.get("arrays", {}),
                                                      checksums(arrays), prefix)
    if name is not None:
        raise CheckpointError(f"{step_dir}: array {name!r} does not match its saved checksum"
                              " (the files are damaged)")


class TrainCheckpointer:
    """Asynchronous, rotating, preemption-aware, checksummed checkpoints of one run.

    ``save_every``: steps between periodic saves; ``keep_last``: how many recent steps to keep;
    ``keep_every``: also keep every step divisible by it (None: none). Rotation never removes
    the newest step whose state was finite when saved (no skipped steps pending), however many
    non-finite steps were saved after it. ``restart_data``: a step without this process's
    data-iterator state is usable (the data stream restarts) instead of incomplete.
    """

    def __init__(self, directory, *, save_every: int = 1000, keep_last: int = 3,
                 keep_every: int | None = None, async_save: bool = True,
                 restart_data: bool = False):
        self.directory = paths.resolve(directory)  # a local path or a bucket URL
        self.save_every = int(save_every)
        self.restart_data = restart_data
        self._finite: dict[int, bool] = {}  # step -> its state was finite when saved
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_retention(keep_last, keep_every, self._is_finite),
            enable_async_checkpointing=async_save,
            create=True,
            # Half-written temporary dirs of a killed save are removed on start.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=(STATE, DATA, CONFIG, META, INTEGRITY))
        self._in_flight: int | None = None  # the step of a started save not yet checked
        self.failed: SaveFailed | None = None
        logging.getLogger("absl").addFilter(_quiet_background_save_errors)

    # -- saving --------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def is_due(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state, *, data_state=None, config: dict | None = None,
             meta: dict | None = None, force: bool = False) -> bool:
        """Start an asynchronous save of ``step`` if due (or ``force``); True if one started.
        A step that already has a checkpoint is never rewritten. Call on every process.

        The arrays' checksums are computed on the devices first (the state must not have been
        donated yet) and saved with the step, with digests of its config and meta."""
        step = int(step)
        if not (force or self.is_due(step)) or step in self.manager.all_steps():
            return False
        self.wait()  # one save at a time: the previous one is on disk (or SaveFailed)
        bad = getattr(state, "bad_steps", 0)
        finite = int(local_value(bad)) == 0
        meta = to_plain(stamp(dict(meta or {}, step=step, time=time.time(),
                                    process_count=jax.process_count(),
                                    device_count=jax.device_count(), finite=finite)))
        config = to_plain(config or {})
        integrity = {"arrays": checksums(state), "config_sha256": json_digest(config),
                     "meta_sha256": json_digest(meta)}
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: DataStateSave(data_state),
            CONFIG: ocp.args.JsonSave(config),
            META: ocp.args.JsonSave(meta),
            INTEGRITY: ocp.args.JsonSave(integrity),
        })
        self._finite[step] = finite  # the manager's retention asks while it starts the save
        with self._failing(step):
            started = bool(self.manager.save(step, args=args, force=True))
        if started:
            self._in_flight = step
        return started

    @contextlib.contextmanager
    def _failing(self, step: int | None):
        """Turn any error of the block into ``SaveFailed`` for ``step`` (kept in ``failed``)."""
        if self.failed is not None:
            raise self.failed
        try:
            yield
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore / the OS: all mean "unsaved"
            step = self._in_flight if step is None else step
            self.failed = SaveFailed(step, self.directory / str(step), e)
            _quiet_abandoned_writes()
            with contextlib.suppress(Exception):  # retention's picks are on disk: list them again
                self.manager.reload()
            raise self.failed from None

    def check(self):
        """Raise ``SaveFailed`` as soon as a started save has failed in the background (one
        process: checked without blocking between steps; several: at the next wait, which every
        process reaches)."""
        if self._in_flight is None or jax.process_count() > 1:
            return
        if not self.manager.is_saving_in_progress():  # ended: waiting for it does not block
            self.wait()

    def wait(self):
        """Block until every started save is on disk (and the steps retention dropped deleted)."""
        with self._failing(None):
            self.manager.wait_until_finished()
        self._in_flight = None

    def close(self):
        try:
            if self.failed is None:  # after a failure orbax has nothing sound left to finish
                self.wait()
        finally:
            if self.failed is None:
                logging.getLogger("absl").removeFilter(_quiet_background_save_errors)
                self.manager.close()
            else:  # its threads may still report the failure: they stay quiet until exit
                with contextlib.suppress(Exception):
                    self.manager.close()

    def _is_finite(self, step: int) -> bool:
        if step not in self._finite:
            try:
                self._finite[step] = bool(read_meta(self.directory / str(step)).get("finite", True))
            except Exception:  # noqa: BLE001 - unreadable: not a step to protect
                self._finite[step] = False
        return self._finite[step]

    # -- restoring -----------------------------------------------------------------------------

    def restore(self, step: int, abstract_state) -> Restored:
        """Restore ``step`` into ``abstract_state`` (ShapeDtypeStructs with the wanted shardings)
        and verify it against its checksums. Raises if the checkpoint is incomplete (also: no
        data-iterator state for this process, unless ``restart_data``), unreadable or damaged."""
        step_dir = self.directory / str(step)
        missing = [n for n in ("_CHECKPOINT_METADATA", STATE, META, INTEGRITY)
                   if not (step_dir / n).exists()]
        if missing:
            raise CheckpointError(f"checkpoint {step_dir} is incomplete: missing {missing}")
        read_meta(step_dir)  # its format version, before any array is read
        items = {STATE: ocp.args.StandardRestore(abstract_state), CONFIG: ocp.args.JsonRestore(),
                 META: ocp.args.JsonRestore(), INTEGRITY: ocp.args.JsonRestore()}
        if (step_dir / DATA / _data_file()).exists():
            items[DATA] = DataStateRestore()
        elif not self.restart_data:
            raise CheckpointError(
                f"checkpoint {step_dir} is incomplete: no data-iterator state for process"
                f" {jax.process_index()} of {jax.process_count()} (to resume from it with a"
                " restarted data stream, set checkpoint.restart_data=true)")
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = out[META] or {}
        if meta.get("step", step) != step:
            raise CheckpointError(f"checkpoint {step_dir} says it is step {meta.get('step')}")
        integrity = out[INTEGRITY] or {}
        state = out[STATE]
        verify(integrity, step_dir, config=out[CONFIG], meta=out[META], arrays=state)
        self._finite.setdefault(step, bool(meta.get("finite", True)))
        return Restored(step=step, state=state, data_state=out.get(DATA),
                        config=out[CONFIG], meta=meta)

    def restore_latest(self, abstract_state) -> Restored | None:
        """Restore the newest usable step; None when there is no checkpoint at all.

        A step that fails to restore (truncated, missing files, no commit marker, no data state,
        a checksum mismatch) is reported with a warning naming it and the previous step is tried.
        Once an older step restores, the bad newer ones are moved to ``checkpoints/corrupt/`` (so
        later saves of the same step numbers are possible; nothing is deleted). If no step
        restores, nothing is moved: the usual cause is a configuration that no longer matches the
        saved state (optimizer, EMA, model), not damage to every checkpoint, and the user's work
        must stay where it is.
        """
        found, failed = newest_usable(self.directory, self.all_steps(),
                                      lambda step: self.restore(step, abstract_state))
        if found is not None:
            for bad_step, _ in failed:
                self._quarantine(bad_step)
            return found
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
        sync(f"diffujax_quarantine_{step}")
        self._finite.pop(step, None)
        self.manager.reload()


def stored_state_tree(step_dir) -> dict:
    """The saved training state's tree of array metadata (shapes, dtypes; nothing is read).

    Read by the item's handler: a Checkpointer would also look for step metadata inside the item
    directory (it sits one level up, in the step) and log a warning on every resume."""
    with contextlib.closing(ocp.PyTreeCheckpointHandler()) as handler:
        return handler.metadata(epath.Path(os.fspath(step_dir)) / STATE).tree


def sync(name: str):
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# What a run recorded about its model: read without the run (resume, export).


def read_meta(step_dir) -> dict:
    """A step's meta, once its format version is checked (``checkpoint.version``)."""
    p = epath.Path(os.fspath(step_dir))
    meta = json.loads((p / META / "metadata").read_text())
    check_version(meta, p, "training")
    return meta


def model_config_from_meta(meta: dict) -> ModelConfig:
    """The model config a step's meta recorded: its Hugging Face config dict (the one
    serialisation of a model config, also that of ``checkpoint.store``)."""
    return config_from_hf(dict(meta["model_config"]), source=f"meta of step {meta.get('step')}")


def saved_steps(directory) -> list[int]:
    """The committed steps under ``directory``, oldest first, listed as the manager lists them."""
    found = ocp.path.step.standard_name_format().find_all(paths.resolve(directory))
    return sorted(m.step for m in found)


def newest_usable(directory, steps, read, *, warn: bool = True):
    """``(read(step), failures)`` for the newest of ``steps`` (in ``directory``) that ``read``
    reads, the ``failures`` being the ``(step, reason)`` of the newer ones (each warned about
    with ``warn``); ``(None, failures)`` when none does. A step of another format version is
    refused (``FormatVersionError``) at once: the older ones are no more readable."""
    failed = []
    for step in reversed(steps):
        try:
            return read(step), failed
        except FormatVersionError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
            failed.append((step, f"{type(e).__name__}: {str(e)[:300]}"))
            if warn:
                warnings.warn(f"checkpoint step {step} in {directory} is unusable"
                              f" ({failed[-1][1]}); falling back to the previous checkpoint",
                              RuntimeWarning, stacklevel=3)
    return None, failed


def saved_record(directory) -> tuple[int, dict, dict] | None:
    """``(step, meta, run config)`` of the newest step under ``directory`` whose records are
    readable (None if none is; nothing of the state is read)."""
    directory = paths.resolve(directory)

    def read(step):
        meta = read_meta(directory / str(step))  # its format version first
        return step, meta, json.loads((directory / str(step) / CONFIG / "metadata").read_text())

    return newest_usable(directory, saved_steps(directory), read, warn=False)[0]
