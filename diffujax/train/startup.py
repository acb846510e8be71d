"""The state a run starts from: restored from the newest usable checkpoint of this run, or built
fresh (from ``model.checkpoint`` or ``model.init``), sharded either way."""

from __future__ import annotations

from diffujax.checkpoint import store
from diffujax.config import to_dict
from diffujax.models import param_shardings
from diffujax.train.checkpointing import abstract_like, model_config_from_meta, saved_record
from diffujax.train.resume import check_resume
from diffujax.train.state import abstract_train_state, create_train_state, train_state_shardings


def initial_state(cfg, layout, ckpt, notes: list):
    """``(model_cfg, state, restored)``; ``restored`` is None for a fresh start. ``notes`` gets
    one line saying where the state came from."""
    recorded = saved_record(ckpt.directory)
    if recorded is not None:  # refuse a config the checkpoint cannot honour before reading it
        step, meta, old = recorded
        check_resume(old, to_dict(cfg), step, str(ckpt.directory / str(step)))
        # The run's own record of the model config: resuming never needs the base checkpoint.
        model_cfg = cfg.resolve_model_config(model_config_from_meta(meta))
        cfg.check_model(model_cfg, f"the model of {ckpt.directory}")
        target = abstract_like(abstract_train_state(cfg, model_cfg),
                               train_state_shardings(cfg, model_cfg, layout))
        restored = ckpt.restore_latest(target)
        if restored is not None:
            notes.append(f"resumed from {ckpt.directory / str(restored.step)}")
            return model_cfg, restored.state, restored
    base = cfg.model_checkpoint()
    if base:
        loaded_cfg, _ = store.read_meta(base)
        model_cfg = cfg.resolve_model_config(loaded_cfg)
        cfg.check_model(model_cfg, f"model.checkpoint {base}")  # before any weight is read
        shardings = param_shardings(model_cfg, layout)
        _, params = store.load(base, dtype=model_cfg.param_dtype, shardings=shardings)
        state = create_train_state(cfg, model_cfg, layout, params=params)
        notes.append(f"initialised from {base}")
    else:
        model_cfg = cfg.resolve_model_config()
        state = create_train_state(cfg, model_cfg, layout)
        notes.append(f"random initialisation (seed {cfg.model.init_seed})")
    return model_cfg, state, None
