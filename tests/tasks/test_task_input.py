"""``diffujax tasks`` held to the bad-input standard: a per-item file resumes only results
computed from the same task file, settings and checkpoint, and names a damaged record by line;
bad arguments and bad items are refused with one line (naming the argument, or the file and
item) before the model loads where possible."""

import json

import jax
import pytest

from diffujax.commands.tasks import make_encoder
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


# --- arguments and task data --------------------------------------------------------------------


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if the command gets as far as reading model weights."""
    from diffujax.checkpoint import store

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the arguments were checked")

    monkeypatch.setattr(store, "_restore", refuse)


def _error(capsys, argv) -> str:
    from diffujax.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _tasks(ckpt, data, task="piqa", *extra):
    return ["tasks", "--checkpoint", str(ckpt), "--task", task, "--data", str(data), "--mesh",
            "none", "--levels", "4", "--progress", "off", *extra]


BAD_ARGUMENTS = [
    (["--temperature", "-0.5"], "--temperature -0.5: must be >= 0"),
    (["--temperature", "nan"], "--temperature nan: must be >= 0"),
    (["--batch-size", "-2"], "--batch-size -2: must be >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--levels", "-1"], "--levels -1: must be >= 1"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--limit", "0"], "--limit 0: must be >= 1"),
    (["--top-k", "0"], "--top-k 0: must be >= 1"),
    (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--logits-temp", "0"], "--logits-temp 0.0: must be > 0"),
    (["--timeout", "-1"], "--timeout -1.0: must be > 0"),
    (["--seq-len", "1"], "--seq-len 1: must be >= 2"),
]


@pytest.mark.parametrize("extra, message", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_before_the_model_loads(tiny_ckpt, task_files, capsys,
                                                         no_weight_reads, extra, message):
    line = _error(capsys, _tasks(tiny_ckpt, task_files["piqa"], "piqa", *extra))
    assert message in line, line


def test_a_canvas_beyond_the_models_positions_is_refused(tiny_ckpt, task_files, capsys):
    line = _error(capsys, _tasks(tiny_ckpt, task_files["gsm8k"], "gsm8k", "--seq-len", "600"))
    assert "--seq-len 600: more than the model's 512 positions" in line, line


def _gz(path, data: bytes):
    import gzip

    path.write_bytes(gzip.compress(data))
    return path


BAD_ITEMS = {  # task -> (file name, content, what the line must say)
    "hellaswag": ("h.jsonl", json.dumps(dict(activity_label="w1", ctx_a="w2", ctx_b="w3",
                                             endings=["w4", 5, "w6"], label="0")) + "\n",
                  "h.jsonl:1: field 'endings' must be a list of strings, got"),
    "piqa": ("p.jsonl", json.dumps(dict(goal=["w1"], sol1="w2", sol2="w3", label=0)) + "\n",
             "p.jsonl:1: field 'goal' must be str, got ['w1']"),
    "rocstories": ("r.csv", "sentence1,sentence2,sentence3,sentence4,sentence5\n"
                            "w1,w2, ,w4,w5\n",
                   "r.csv:2: field 'sentence3' is empty: nothing to infill"),
    "humaneval": ("e.jsonl", json.dumps(dict(task_id="T/0", prompt="def f():\n", suffix="",
                                             canonical_solution="", test="", entry_point="f"))
                  + "\n", "e.jsonl:1: field 'canonical_solution' is empty: nothing to infill"),
}


@pytest.mark.parametrize("task", sorted(BAD_ITEMS))
def test_bad_items_are_named_before_the_model_loads(tiny_ckpt, tmp_path, capsys, no_weight_reads,
                                                   task):
    name, content, message = BAD_ITEMS[task]
    (tmp_path / name).write_text(content)
    line = _error(capsys, _tasks(tiny_ckpt, tmp_path / name, task))
    assert message in line, line


def test_a_truncated_or_false_gz_task_file_is_one_line(tiny_ckpt, task_files, tmp_path, capsys,
                                                       no_weight_reads):
    whole = _gz(tmp_path / "whole.jsonl.gz", task_files["piqa"].read_bytes()).read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    line = _error(capsys, _tasks(tiny_ckpt, tmp_path / "cut.jsonl.gz"))
    assert "cut.jsonl.gz: not a complete gzip file (truncated or damaged" in line, line
    (tmp_path / "plain.jsonl.gz").write_bytes(task_files["piqa"].read_bytes())
    line = _error(capsys, _tasks(tiny_ckpt, tmp_path / "plain.jsonl.gz"))
    assert "plain.jsonl.gz: not a complete gzip file" in line, line


def test_an_item_longer_than_the_model_is_named(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "l.txt").write_text("w1 w2 w3\n" + " ".join(["w5"] * 600) + "\n")
    line = _error(capsys, _tasks(tiny_ckpt, tmp_path / "l.txt", "lambada"))
    assert "item 1: a row of 601 tokens exceeds the model's 512 positions" in line, line
