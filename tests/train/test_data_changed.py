"""Training data changed between a run's checkpoint and its resume: the checkpoint records what
its data-iterator state refers to (files, sizes, modification times, document counts), a changed
corpus is refused with the list of changes (one line, exit 2, nothing written), and
``checkpoint.restart_data=true`` goes on with the new data from the start of its stream."""

import os
import shutil

import pytest
from train_runs import ROOT

from diffujax.cli import main as cli
from diffujax.train.data import data_changes

ARGS = ["--config", "configs/tiny.yaml", "optimizer.warmup_steps=1", "data.seq_len=32",
        "data.global_batch=8", "checkpoint.every_steps=2", "logging.every_steps=1",
        "logging.eval_every=0", "logging.sample_every=0"]


def _train(run_dir, corpus, steps, *extra):
    return ["train", *ARGS, f"data.sources=[{{path: '{corpus}'}}]", f"train.steps={steps}",
            f"output_dir={run_dir}", *extra]


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for name in ("loop.py", "checkpointing.py", "step.py", "export.py"):
        shutil.copyfile(ROOT / "diffujax" / "train" / name, root / f"{name}.txt")
    return root


def _snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file() and p.name != ".lock"}


def test_a_changed_corpus_is_refused_unless_restart_data(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli(_train(run_dir, corpus, 2)) == 0
    capsys.readouterr()
    with open(corpus / "loop.py.txt", "a") as f:
        f.write("\n# one more line\n")
    shutil.copyfile(corpus / "export.py.txt", corpus / "new.txt")
    os.remove(corpus / "step.py.txt")
    before = _snapshot(run_dir)

    assert cli(_train(run_dir, corpus, 4)) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("diffujax train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert "the training data changed since it was saved" in line
    assert f"1 files added: {corpus / 'new.txt'}" in line
    assert f"1 files removed: {corpus / 'step.py.txt'}" in line
    assert f"1 files modified: {corpus / 'loop.py.txt'}" in line
    assert "checkpoint.restart_data=true" in line
    assert _snapshot(run_dir) == before  # nothing written, config.yaml included

    assert cli(_train(run_dir, corpus, 4, "checkpoint.restart_data=true")) == 0
    err = capsys.readouterr().err
    assert f"resumed from {run_dir / 'checkpoints' / '2'}" in err
    assert "the training data changed since step 2" in err and "the data stream restarts" in err
    # The new checkpoint records the new data: the next resume needs no restart_data.
    assert cli(_train(run_dir, corpus, 6)) == 0
    assert "the training data changed" not in capsys.readouterr().err


def test_data_changes_names_each_kind_of_change():
    old = [{"name": "a", "documents": 3, "files": {"x": ["1", "5"], "y": ["2", "6"]}}]
    assert data_changes(old, old) == []
    assert data_changes(None, old) == []  # recorded by an earlier diffujax: nothing to compare
    same_size_touched = [{"name": "a", "documents": 3, "files": {"x": ["1", "7"], "y": ["2", "6"]}}]
    assert data_changes(old, same_size_touched) == ["source 0 (a): 1 files modified: x"]
    fewer = [{"name": "a", "documents": 2, "files": {"x": ["1", "5"]}}]
    assert data_changes(old, fewer) == ["source 0 (a): 1 files removed: y",
                                        "source 0 (a): 3 documents then, 2 now"]
    assert data_changes(old, old + old) == ["1 sources then, 2 now"]
