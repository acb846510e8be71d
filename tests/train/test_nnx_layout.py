"""Training checkpoints of the NNX layout (saved before the parameters became a plain tree) still
resume and export. Fixture: ``data/nnx_layout_run``, written by that version. Reference: the same
files read by orbax alone, without a target (every array as stored, in the stored layout)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from damage import orbax_read
from safetensors.numpy import load_file

from diffujax.cli import main as cli
from diffujax.config import load_config
from diffujax.models import flatten
from diffujax.parallel.mesh import make_mesh
from diffujax.train.checkpointing import TrainCheckpointer, abstract_like
from diffujax.train.state import abstract_train_state, train_state_shardings

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = pathlib.Path(__file__).with_name("data") / "nnx_layout_run"
OVERRIDES = [
    "model.init.hidden_size=16", "model.init.num_heads=2", "model.init.num_kv_heads=1",
    "model.init.intermediate_size=32", "model.init.num_layers=1", "checkpoint.every_steps=2",
    "optimizer.ema_decay=0.9", "optimizer.warmup_steps=1", "logging.every_steps=1",
    "logging.eval_every=0", "logging.sample_every=0", "data.global_batch=2", "data.seq_len=32",
    "data.sources=[{path: 'corpus/text.txt'}]", "data.tokenizer=tokenizer", "data.eval_sources=[]",
    "output_dir=."]  # paths relative to the run directory, the working directory of these runs


@pytest.fixture
def run_dir(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "run")
    return tmp_path / "run"


def _as_stored(run_dir):
    """Step 2's state as orbax reads it with no target: host arrays in the stored layout."""
    return orbax_read(run_dir / "checkpoints" / "2" / "state")


def test_restores_into_todays_state_on_another_mesh(run_dir, monkeypatch):
    """Saved on one device, restored onto 8-way fsdp: every array where today's state has it."""
    monkeypatch.chdir(run_dir)
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), OVERRIDES + ["train.steps=4"])
    model_cfg = cfg.resolve_model_config()
    mesh = make_mesh(cfg.mesh)
    target = abstract_like(abstract_train_state(cfg, model_cfg),
                           train_state_shardings(cfg, model_cfg, mesh, cfg.mesh.rule_table()))
    restored = TrainCheckpointer(run_dir / "checkpoints").restore(2, target)
    state, old = restored.state, _as_stored(run_dir)

    def check(tree, stored_tree):  # stored_tree: {"params": {... {"value": array}}}
        flat = flatten(tree)
        assert set(flat) == {p.removesuffix("/value") for p in flatten(stored_tree["params"])}
        for path, x in flat.items():
            node = stored_tree["params"]
            for name in path.split("/"):
                node = node[name]
            np.testing.assert_array_equal(np.asarray(x), node["value"])

    check(state.params, old["params"])
    check(state.ema, old["ema"])
    check(state.opt_state[1][0].mu, old["opt_state"][1][0]["mu"])
    check(state.opt_state[1][0].nu, old["opt_state"][1][0]["nu"])
    assert int(state.step) == int(old["step"]) == 2
    np.testing.assert_array_equal(np.asarray(state.rng), old["rng"])
    assert int(state.opt_state[1][0].count) == int(old["opt_state"][1][0]["count"])
    wq = state.params["layers"]["wq"]
    assert wq.sharding.mesh.shape["fsdp"] == 8 and restored.data_state is not None


def test_export_reads_the_old_layout(run_dir, tmp_path):
    assert cli(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    stored = _as_stored(run_dir)["params"]["params"]
    np.testing.assert_array_equal(exported["model.embed_tokens.weight"],
                                  stored["embed"]["value"])
    np.testing.assert_array_equal(exported["model.layers.0.self_attn.o_proj.weight"],
                                  stored["layers"]["wo"]["value"][0].reshape(-1, 16).T)


@pytest.mark.integration  # a run of the CLI as a process
def test_a_run_resumes_from_it_and_saves_in_todays_layout(run_dir):
    """On two devices (it was saved on one): steps 3 and 4 run, step 4 is saved in today's
    layout."""
    proc = subprocess.run(
        [sys.executable, "-m", "diffujax.cli", "train", "--config",
         str(ROOT / "configs" / "tiny.yaml"), *OVERRIDES, "train.steps=4"],
        cwd=run_dir, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT),
             "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert f"resumed from {run_dir / 'checkpoints' / '2'}" in out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    assert set(train) >= {3, 4} and all(np.isfinite(train[s]) for s in (3, 4))
    saved = ocp.PyTreeCheckpointer().metadata(
        run_dir / "checkpoints" / "4" / "state").item_metadata.tree
    assert set(saved["params"]) >= {"embed", "layers", "final_norm"}  # no "params" level
