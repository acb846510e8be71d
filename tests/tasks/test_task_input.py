"""``diffujax tasks`` held to the bad-input standard: a per-item file resumes only results
computed from the same task file, settings and checkpoint, and names a damaged record by line;
bad arguments and bad items are refused with one line (naming the argument, or the file and
item) before the model loads where possible."""

import json

import jax
import pytest

from diffujax.tasks.command import make_encoder
from diffujax.tasks.engine import Engine
from diffujax.tasks.runner import Settings, TaskRunner, run_task

SEED = 3


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model, batch_size=4, seed=SEED)


def _runner(engine, task="siqa"):
    return TaskRunner(engine, make_encoder(engine.model), task,
                      Settings(seed=SEED, num_levels=4, seq_len=24))


def _copy(src, dst):
    dst.write_bytes(src.read_bytes())
    return str(dst)


# --- per-item files ------------------------------------------------------------------------------


def test_a_per_item_file_of_another_task_file_is_refused(engine, task_files, tmp_path):
    data, log = _copy(task_files["siqa"], tmp_path / "siqa.jsonl"), tmp_path / "items.jsonl"
    run_task(_runner(engine), data, limit=2, per_item=str(log), progress=False)
    lines = (tmp_path / "siqa.jsonl").read_text().splitlines()
    edited = json.loads(lines[0])
    edited["label"] = str(1 + int(edited["label"]) % 3)  # another gold answer for item 0
    (tmp_path / "siqa.jsonl").write_text("\n".join([json.dumps(edited)] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"items.jsonl was computed from other settings or data"
                                         r" \(data_sha256 differ\)"):
        run_task(_runner(engine), data, per_item=str(log), progress=False)


@pytest.mark.parametrize("damage, where", [
    (lambda r: {k: v for k, v in r.items() if k != "correct"}, ":2: damaged record (missing"
                                                                " correct)"),
    (lambda r: dict(r, index="0"), ":2: damaged record (index '0' is not an item number)"),
    (lambda r: [r], ":2: damaged record (a list, not a record)"),
    (lambda r: "{not json", ":2: damaged record (not JSON)"),
])
def test_a_damaged_per_item_record_is_named_by_line(engine, task_files, tmp_path, damage, where):
    data, log = str(task_files["siqa"]), tmp_path / "items.jsonl"
    run_task(_runner(engine), data, limit=2, per_item=str(log), progress=False)
    header, first, second = log.read_text().splitlines()
    bad = damage(json.loads(first))
    log.write_text("\n".join([header, bad if isinstance(bad, str) else json.dumps(bad),
                              second]) + "\n")
    with pytest.raises(ValueError, match="^" + str(log).replace(".", r"\.") +
                       where.replace("(", r"\(").replace(")", r"\)")):
        run_task(_runner(engine), data, per_item=str(log), progress=False)
    assert log.read_text().splitlines()[2] == second  # nothing was dropped


def test_the_cli_refuses_a_per_item_file_of_another_checkpoint(tiny_ckpt, task_files, tmp_path,
                                                              capsys):
    from diffujax.cli import main

    from diffujax.checkpoint import save, store

    config, params = store.load(tiny_ckpt)  # other weights: the same model, negated
    other = tmp_path / "other"
    save(other, config, jax.tree.map(lambda x: -x, params), tokenizer_from=tiny_ckpt)
    args = ["tasks", "--task", "piqa", "--data", str(task_files["piqa"]), "--mesh", "none",
            "--levels", "4", "--progress", "off", "--per-item", str(tmp_path / "items.jsonl")]
    assert main(args + ["--checkpoint", str(tiny_ckpt), "--limit", "2"]) == 0
    capsys.readouterr()
    assert main(args + ["--checkpoint", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "items.jsonl was computed from other settings or data" in err[0]
    assert "(checkpoint_sha256 differ)" in err[0], err
