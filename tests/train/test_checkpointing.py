"""Training checkpoints: resharding restore, retention, corrupt-step fallback, the SIGTERM flag,
export of a step. Reference: the saved arrays themselves (restores must be bit-exact)."""

import json
import os
import signal
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffujax.train import checkpointing as C
from diffujax.runs.preemption import PreemptionGuard


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _state(mesh, value: float, spec=P("fsdp", None)):
    w = jax.device_put(jnp.arange(64, dtype=jnp.float32).reshape(8, 8) + value,
                       NamedSharding(mesh, spec))
    return {"params": {"w": w, "b": jnp.full((3,), value)}, "opt": {"mu": w * 2},
            "step": jnp.int32(value), "rng": jax.random.key_data(jax.random.key(int(value)))}


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_restore_into_another_topology(tmp_path):
    """Saved from an 8-way fsdp mesh, restored onto a (2, 2, 2) mesh with other shardings."""
    mesh8 = _mesh((8,), ("fsdp",))
    state = _state(mesh8, 3.0)
    ckpt = C.TrainCheckpointer(tmp_path, save_every=1, keep_last=2)
    assert ckpt.save(3, state, data_state={"pos": [1, 2]}, config={"a": (1, 2)},
                     meta={"model_config": {"x": 1}})
    ckpt.wait()
    mesh222 = _mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    shardings = jax.tree.map(lambda x: NamedSharding(mesh222, P(("data", "fsdp"), "tensor")
                                                     if x.ndim == 2 else P()), state)
    restored = ckpt.restore_latest(C.abstract_like(state, shardings))
    assert restored.step == 3
    assert _leaves_equal(restored.state, state)
    assert restored.state["params"]["w"].sharding == shardings["params"]["w"]
    assert restored.data_state == {"pos": [1, 2]}
    assert restored.config == {"a": [1, 2]}
    assert restored.meta["model_config"] == {"x": 1} and restored.meta["step"] == 3
    ckpt.close()


def test_interval_and_retention(tmp_path):
    mesh = _mesh((8,), ("fsdp",))
    ckpt = C.TrainCheckpointer(tmp_path, save_every=2, keep_last=2, keep_every=4)
    started = [ckpt.save(s, _state(mesh, float(s))) for s in range(1, 11)]
    ckpt.wait()
    assert started == [s % 2 == 0 for s in range(1, 11)]
    assert ckpt.all_steps() == [4, 8, 10]  # last two, plus every 4th kept for good
    assert not ckpt.save(10, _state(mesh, 0.0), force=True)  # never rewrites a step
    ckpt.close()


@pytest.mark.parametrize("damage", ["delete", "truncate", "no_metadata"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage):
    mesh = _mesh((8,), ("fsdp",))
    ckpt = C.TrainCheckpointer(tmp_path, save_every=1, keep_last=3)
    for s in (1, 2):
        ckpt.save(s, _state(mesh, float(s)), data_state={"pos": s})
    ckpt.wait()
    step_dir = tmp_path / "2"
    if damage == "delete":
        os.remove(step_dir / "state" / "manifest.ocdbt")
    elif damage == "truncate":  # the biggest array file, cut in half: a write killed midway
        files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
        biggest = max(files, key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    else:
        os.remove(step_dir / "_CHECKPOINT_METADATA")
    with pytest.warns(RuntimeWarning, match="checkpoint step 2 .* unusable"):
        restored = ckpt.restore_latest(C.abstract_like(_state(mesh, 0.0)))
    assert restored.step == 1 and restored.data_state == {"pos": 1}
    assert _leaves_equal(restored.state, _state(mesh, 1.0))
    assert [p.name.split("-")[0] for p in (tmp_path / C.CORRUPT_DIR).iterdir()] == ["2"]
    assert ckpt.all_steps() == [1]
    assert ckpt.save(2, _state(mesh, 2.0), force=True)  # the step can be written again
    ckpt.close()


def test_a_step_without_its_commit_marker_in_a_bucket_is_not_listed(gcs):
    """In a bucket orbax writes a step in place and commits it last (``commit_success.txt``): a
    step whose save was killed before that is not listed by the config check of a resume
    (``saved_record``), by export (``find_step_dir``) or by the manager, which deletes it
    before its first save."""
    from diffujax import paths
    from diffujax.train.export import find_step_dir

    run = gcs.url_for("uncommitted")
    steps = paths.resolve(run) / "checkpoints"
    mesh = _mesh((8,), ("fsdp",))
    ckpt = C.TrainCheckpointer(steps, save_every=1)
    for s in (1, 2):
        ckpt.save(s, _state(mesh, float(s)), config={"saved_at": s})
    ckpt.close()
    (steps / "2" / "commit_success.txt").unlink()
    assert C.saved_steps(steps) == [1]
    assert C.saved_record(steps)[::2] == (1, {"saved_at": 1})
    assert find_step_dir(run) == steps / "1"
    reopened = C.TrainCheckpointer(steps, save_every=1)
    assert reopened.all_steps() == [1]
    assert reopened.save(3, _state(mesh, 3.0))
    reopened.close()
    assert reopened.all_steps() == [1, 3] and not (steps / "2").exists()


def test_no_usable_checkpoint_is_an_error(tmp_path):
    mesh = _mesh((8,), ("fsdp",))
    ckpt = C.TrainCheckpointer(tmp_path, save_every=1)
    assert ckpt.restore_latest(C.abstract_like(_state(mesh, 0.0))) is None  # nothing yet: fresh
    ckpt.save(1, _state(mesh, 1.0))
    ckpt.wait()
    os.remove(tmp_path / "1" / "state" / "manifest.ocdbt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(C.CheckpointError, match="no checkpoint .* restores"):
            ckpt.restore_latest(C.abstract_like(_state(mesh, 0.0)))
    assert ckpt.all_steps() == [1]  # nothing moved or deleted when no step restores
    ckpt.close()


def test_changed_state_structure_moves_nothing(tmp_path):
    """A run restarted with a different state layout (say, an EMA switched on) gets a clear
    error and its checkpoints stay where they are."""
    mesh = _mesh((8,), ("fsdp",))
    ckpt = C.TrainCheckpointer(tmp_path, save_every=1)
    for s in (1, 2):
        ckpt.save(s, _state(mesh, float(s)))
    ckpt.wait()
    changed = {"before": _state(mesh, 0.0), "extra": _state(mesh, 0.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(C.CheckpointError, match="current configuration"):
            ckpt.restore_latest(C.abstract_like(changed))
    assert ckpt.all_steps() == [1, 2] and not (tmp_path / C.CORRUPT_DIR).exists()
    ckpt.close()


def test_preemption_guard_turns_sigterm_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested(0)
        os.kill(os.getpid(), signal.SIGTERM)  # the process survives: the handler sets a flag
        assert guard.requested(1) and guard.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_model_config_round_trip():
    """The meta records the model as its HF config dict (the one serialisation)."""
    from diffujax.models import GPT2Config, LlamaConfig

    llama = LlamaConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_size=32, mask_token_id=3,
                        rope_scaling=("llama3", 8.0, 1.0, 4.0, 8192))
    gpt2 = GPT2Config(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                      intermediate_size=32, mask_token_id=3, max_positions=64)
    for cfg in (llama, gpt2):
        meta = json.loads(json.dumps({"model_config": cfg.to_hf()}))
        assert C.model_config_from_meta(meta) == cfg


def test_export_step(tmp_path):
    """A training checkpoint's params -> a diffujax model checkpoint that ``store.load`` reads."""
    from diffujax.checkpoint import store
    from diffujax.config import load_config
    from diffujax.parallel.mesh import make_layout
    from diffujax.train.state import create_train_state

    run_dir = tmp_path / "run"
    cfg = load_config("configs/tiny.yaml", [f"output_dir={run_dir}", "model.init.num_layers=1"])
    model_cfg = cfg.resolve_model_config()
    state = create_train_state(cfg, model_cfg, make_layout(cfg.mesh))
    ckpt = C.TrainCheckpointer(run_dir / "checkpoints", save_every=1)
    ckpt.save(7, state, meta={"model_config": model_cfg.to_hf(),
                              "tokenizer_dir": os.path.abspath("configs/tokenizers/bytes")})
    ckpt.close()
    from diffujax.train.export import export_step

    out = export_step(run_dir, None, tmp_path / "model")
    loaded_cfg, params = store.load(out)
    assert loaded_cfg.num_layers == 1 and loaded_cfg.mask_token_id == 258
    assert _leaves_equal(params, state.params)
    assert (out / "tokenizer.json").is_file()
