"""The checkpoint format version (``checkpoint.version``): a model checkpoint or a training step
written in another format is refused with one line naming both versions, before any array is
read, and nothing is written or moved. Reference: checkpoints written by this code, their
version edited by hand as an older (or newer) diffujax would have written it."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from train_runs import ARGS, NO_SAMPLES, ROOT

from diffujax.checkpoint import store
from diffujax.checkpoint.version import FORMAT_VERSION, FormatVersionError
from diffujax.cli import main as cli
from diffujax.models import LlamaConfig, flatten, init_params
from diffujax.train import checkpointing as C
from diffujax.train.export import export_step

TOKENIZER = ROOT / "configs" / "tokenizers" / "bytes"
MODEL = LlamaConfig(vocab_size=264, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_positions=64, mask_token_id=258,
                    bos_token_id=256, eos_token_id=256)


def _line(path, version, remedy_start):
    """The refusal, spelled out here independently of the code that writes it."""
    return (f"{path}: written by diffujax checkpoint format {version} (this diffujax reads format"
            f" {FORMAT_VERSION}); {remedy_start}")


def _listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def _refused(capsys, argv, want):
    """The command fails with the refusal as its one line on stderr."""
    assert cli(argv) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and want in err and "Traceback" not in err, err


def _set_version(record: dict, version):
    """``version`` None: the key absent, as everything before versions were checked."""
    record.pop("format")
    if version is not None:
        record["format"] = version


@pytest.fixture
def model_dir(tmp_path):
    directory = tmp_path / "model"
    store.save(directory, MODEL, init_params(MODEL, seed=0), tokenizer_from=TOKENIZER)
    return directory


@pytest.fixture
def no_weight_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the format version was checked")

    monkeypatch.setattr(store, "_restore", refuse)


def test_a_model_checkpoint_records_its_version_and_reloads(model_dir):
    recorded = json.loads((model_dir / "config.json").read_text())["diffujax"]
    assert recorded["format"] == FORMAT_VERSION
    config, params = store.load(model_dir)
    assert (config.hidden_size, config.num_layers) == (MODEL.hidden_size, MODEL.num_layers)
    want = flatten(init_params(MODEL, seed=0))
    assert all(np.array_equal(np.asarray(x), np.asarray(want[k]))
               for k, x in flatten(params).items())


@pytest.mark.parametrize("version, remedy", [
    (None, "convert the model again"), (1, "convert the model again"),
    (FORMAT_VERSION + 1, f"read it with a diffujax that reads format {FORMAT_VERSION + 1}")])
def test_a_model_checkpoint_of_another_version_is_refused_in_one_line(
        model_dir, tmp_path, capsys, no_weight_reads, version, remedy):
    config_file = model_dir / "config.json"
    hf = json.loads(config_file.read_text())
    _set_version(hf["diffujax"], version)
    config_file.write_text(json.dumps(hf))
    before = _listing(model_dir)
    want = _line(model_dir, 1 if version is None else version, remedy)
    with pytest.raises(FormatVersionError) as error:
        store.load(model_dir)
    assert str(error.value).startswith(want) and "\n" not in str(error.value)
    hf_dir = tmp_path / "hf"
    for argv in (["generate", "--checkpoint", str(model_dir), "--steps", "2"],
                 ["export", str(model_dir), str(hf_dir)]):
        _refused(capsys, argv, want)
    assert not hf_dir.exists() and _listing(model_dir) == before  # nothing written


def _training_run(tmp_path):
    """A run directory with steps 2 and 4 of a small state, as this diffujax writes them."""
    run_dir = tmp_path / "run"
    ckpt = C.TrainCheckpointer(run_dir / "checkpoints", save_every=1)
    params = init_params(MODEL, seed=0)
    for step in (2, 4):
        ckpt.save(step, {"params": params, "step": jnp.int32(step)}, data_state={"pos": step},
                  config={"train": {"steps": 8}},
                  meta={"model_config": MODEL.to_hf(),
                        "tokenizer_dir": os.fspath(TOKENIZER)})
    ckpt.close()
    return run_dir, params


def test_a_training_step_records_its_version_and_restores(tmp_path):
    run_dir, params = _training_run(tmp_path)
    assert C.read_meta(run_dir / "checkpoints" / "4")["format"] == FORMAT_VERSION
    ckpt = C.TrainCheckpointer(run_dir / "checkpoints")
    restored = ckpt.restore_latest(C.abstract_like({"params": params, "step": jnp.int32(0)}))
    ckpt.close()
    assert restored.step == 4 and restored.data_state == {"pos": 4}
    step, meta, config = C.saved_record(run_dir / "checkpoints")
    assert (step, config, meta["model_config"]) == (4, {"train": {"steps": 8}}, MODEL.to_hf())


@pytest.mark.parametrize("version, remedy", [
    (None, "export its weights with the diffujax that wrote it"),
    (FORMAT_VERSION + 1, f"read it with a diffujax that reads format {FORMAT_VERSION + 1}")])
def test_a_training_step_of_another_version_is_refused_in_one_line(tmp_path, capsys, version,
                                                                  remedy):
    """The newest step is refused: no fallback to the older step (of the same run, no more
    readable in practice), nothing quarantined, nothing exported, no run started."""
    run_dir, params = _training_run(tmp_path)
    step_dir = run_dir / "checkpoints" / "4"
    meta_file = step_dir / C.META / "metadata"
    meta = json.loads(meta_file.read_text())
    _set_version(meta, version)
    meta_file.write_text(json.dumps(meta))
    before = _listing(run_dir)
    want = _line(step_dir, 1 if version is None else version, remedy)

    ckpt = C.TrainCheckpointer(run_dir / "checkpoints")
    target = C.abstract_like({"params": params, "step": jnp.int32(0)})
    for read in (lambda: ckpt.restore_latest(target), lambda: ckpt.restore(4, target),
                 lambda: C.saved_record(run_dir / "checkpoints"),
                 lambda: export_step(run_dir, None, tmp_path / "exported")):
        with pytest.raises(FormatVersionError) as error:
            read()
        assert str(error.value).startswith(want) and "\n" not in str(error.value)
    ckpt.close()

    for argv in (["export", str(run_dir), str(tmp_path / "hf")],
                 ["train", *ARGS, f"output_dir={run_dir}", NO_SAMPLES]):
        _refused(capsys, argv, want)
    assert not (tmp_path / "exported").exists() and not (tmp_path / "hf").exists()
    def saved(listing):
        return [entry for entry in listing if entry[0].startswith("checkpoints")]

    assert saved(_listing(run_dir)) == saved(before)  # nothing moved, quarantined or rewritten
    assert not (run_dir / "final").exists()
