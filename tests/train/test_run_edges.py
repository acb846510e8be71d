"""Edges of a training run, each refused or stopped with one line and a non-zero exit: an
``output_dir`` with a control character in it, data that runs out before the first step (no
untrained ``final/``)."""

import pytest
from train_runs import ROOT, cli_error

ARGS = ["--config", "configs/tiny.yaml", "optimizer.warmup_steps=1", "data.seq_len=32",
        "data.global_batch=8", "logging.every_steps=1", "logging.eval_every=0",
        "logging.sample_every=0"]


@pytest.mark.parametrize("name", ["run\nother", "run\tx", "run\r"])
def test_an_output_dir_with_a_control_character_is_refused(tmp_path, capsys, name):
    line = cli_error(capsys, ["train", *ARGS, f"output_dir={tmp_path / name}"])
    assert f"output_dir={str(tmp_path / name)!r}: contains a control character" in line
    assert list(tmp_path.iterdir()) == []


def test_an_output_dir_with_a_newline_in_the_config_file_is_refused(tmp_path, capsys):
    """The YAML file's escapes give the value a real newline: refused where it is resolved."""
    config = tmp_path / "run.yaml"
    config.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace(
        "output_dir: runs/tiny", f'output_dir: "{tmp_path}/run\\nother"'))
    line = cli_error(capsys, ["train", "--config", str(config), *ARGS[2:]])
    wanted = f"{tmp_path}/run\nother"  # the value YAML reads: with a real newline
    assert f"output_dir={wanted!r}: contains a control character" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_data_that_runs_out_before_step_1_writes_no_model(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a short document\n")  # far less than 8 x 32 tokens
    run_dir = tmp_path / "run"
    line = cli_error(capsys, ["train", *ARGS, f"data.sources=[{{path: '{corpus}'}}]",
                           "data.num_epochs=1", "train.steps=5", f"output_dir={run_dir}"])
    assert "the data ran out before step 1" in line and "data.global_batch" in line
    assert not (run_dir / "final").exists()
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
