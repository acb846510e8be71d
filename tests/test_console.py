"""What the command line shows: log records reach stderr, `--debug` turns a one-line error into a
traceback, progress bars appear on a terminal (forced here with DIFFUJAX_PROGRESS=1) and never in
pipes. Each case runs the real CLI in a fresh interpreter, as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def start(*args, env=None, module="diffujax.cli") -> subprocess.Popen:
    """The CLI started in a fresh interpreter; ``finish`` waits for it. Independent runs of a
    test start together: each is mostly one core's interpreter start-up."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cli(*args, env=None, module="diffujax.cli"):
    return finish(start(*args, env=env, module=module))


@pytest.mark.integration  # the CLI in a fresh interpreter
def test_bad_input_is_one_line_and_debug_adds_the_traceback(tmp_path):
    missing = tmp_path / "no-such-model"
    plain = start("export", str(missing), str(tmp_path / "out"))
    debugs = [start(*argv, str(missing), str(tmp_path / "out"))
              for argv in (("--debug", "export"), ("export", "--debug"))]  # before or after it
    plain = finish(plain)
    assert plain.returncode != 0
    lines = plain.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and str(missing) in lines[0]
    for debug in map(finish, debugs):
        assert debug.returncode == plain.returncode
        assert "Traceback (most recent call last)" in debug.stderr
        assert debug.stderr.strip().splitlines()[-1] == lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.integration  # the CLI in a fresh interpreter
def test_train_config_error_debug_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_key: 1\n")
    plain, debug = start("train", "--config", str(bad)), start("--debug", "train", "--config",
                                                              str(bad))
    plain, debug = finish(plain), finish(debug)
    assert plain.returncode == 2 and len(plain.stderr.strip().splitlines()) == 1
    assert "no_such_key" in plain.stderr
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


@pytest.mark.integration  # the CLI in a fresh interpreter
def test_log_records_are_shown_once(tmp_path):
    """pretokenize logs through `logging` (INFO): the records reach stderr once, as bare lines
    like the commands' own (with --debug: time, level and logger name), even when a library has
    configured the root logger (absl does so as soon as orbax is imported)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(30)} | {"<unk>": 30, "<eos>": 31}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    text = tmp_path / "a.txt"
    text.write_text(" ".join(f"w{i % 30}" for i in range(400)))
    args = ["--tokenizer", str(tok_dir), "--shards", "2", "--seq-len", "16", str(text)]
    message = "pretokenize: 2 of 2 shards to write"
    # As documented: python -m diffujax.data.pretokenize (the module is __main__ then).
    done = start("--out", str(tmp_path / "a"), *args, module="diffujax.data.pretokenize")
    debug = start("--out", str(tmp_path / "c"), *args, "--debug",
                  module="diffujax.data.pretokenize")
    # Imported, after a library called logging.basicConfig().
    code = ("import logging, sys; logging.basicConfig(); "
            "from diffujax.data.pretokenize import main; sys.exit(main(sys.argv[1:]))")
    imported = subprocess.Popen([sys.executable, "-c", code, "--out", str(tmp_path / "b"), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
    done, debug, imported = finish(done), finish(debug), finish(imported)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(message) == 1 and message in done.stderr.splitlines()
    assert debug.returncode == 0, debug.stderr
    assert debug.stderr.count(message) == 1 and " INFO __main__: " + message in debug.stderr
    assert imported.returncode == 0, imported.stderr
    assert imported.stderr.count(message) == 1 and message in imported.stderr.splitlines()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    sys.path.insert(0, str(REPO / "tests" / "checkpoint"))
    try:
        from conftest import GPT2, tiny_model, write_hf, write_tokenizer
    finally:
        sys.path.pop(0)
    d = tmp_path_factory.mktemp("hf")
    write_hf(d, tiny_model(GPT2))
    write_tokenizer(d)
    return d


@pytest.mark.integration  # the CLI in a fresh interpreter
def test_progress_bars_on_convert_export_eval(tiny_hf, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(200)))
    forced = {"DIFFUJAX_PROGRESS": "1"}
    conv = cli("convert", str(tiny_hf), str(ckpt), "--no-mask-token", env=forced)
    assert conv.returncode == 0, conv.stderr
    assert "read: 100%" in conv.stderr and "tensor" in conv.stderr
    exp = start("export", str(ckpt), str(out), env=forced)  # export and eval read ckpt at once
    ev = start("eval", "--checkpoint", str(ckpt), "--text", str(text), "--objective", "ar",
               "--seq-len", "16", "--batch-size", "8", env=forced)
    exp, ev = finish(exp), finish(ev)
    assert exp.returncode == 0, exp.stderr
    assert "write: 100%" in exp.stderr
    assert ev.returncode == 0, ev.stderr
    # The whole file is scored by default: 200 tokens -> 12 blocks of 16 -> 2 batches of 8.
    assert "eval ar: 100%" in ev.stderr and "2/2" in ev.stderr
    assert "(12 x 16 tokens, the whole file but its last partial block)" in ev.stdout


def test_bars_only_on_a_terminal_unless_forced(monkeypatch):
    from diffujax import console

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    for tty, setting, shown in ((False, None, False), (True, None, True), (False, "1", True),
                                (True, "0", False)):
        monkeypatch.setattr(sys, "stderr", Stream(tty))
        if setting is None:
            monkeypatch.delenv("DIFFUJAX_PROGRESS", raising=False)
        else:
            monkeypatch.setenv("DIFFUJAX_PROGRESS", setting)
        assert console.progress_enabled() is shown
    # off (the last setting): the items pass through, nothing touches the stream (it has no write)
    assert list(console.progress([1, 2], total=2)) == [1, 2]
    with console.progress(total=2) as bar:
        bar.update(2)


def test_eval_blocks_default_to_the_whole_file(tmp_path):
    from diffujax.inference.perplexity import read_blocks

    class Words:  # one token per character
        def encode(self, text):
            return [ord(c) for c in text]

    text = tmp_path / "t.txt"
    text.write_text("x" * 50)
    assert read_blocks(Words(), str(text), 16).shape == (3, 16)  # 48 of 50 tokens
    assert read_blocks(Words(), str(text), 16, 2).shape == (2, 16)
    assert read_blocks(Words(), str(text), 16, 9).shape == (3, 16)


def test_diffujax_warnings_read_like_its_log_lines(capsys, monkeypatch):
    """After setup_logging a warning raised in diffujax's code is one ``warning: ...`` line; a
    library's goes to Python's own display; --debug gives Python's display back for both."""
    import warnings

    from diffujax import console

    python_display = []
    monkeypatch.setattr(console, "_python_showwarning",
                        lambda message, category, filename, *rest: python_display.append(filename))
    own = str(REPO / "diffujax" / "train" / "evaluation.py")
    other = "/somewhere/else/lib.py"
    try:
        console.setup_logging(debug=False)
        warnings.showwarning("no full batch", UserWarning, own, 49)
        warnings.showwarning("a library's", DeprecationWarning, other, 7)
        assert capsys.readouterr().err == "warning: no full batch\n"
        assert python_display == [other]
        console.setup_logging(debug=True)
        warnings.showwarning("no full batch", UserWarning, own, 49)
        assert python_display == [other, own] and capsys.readouterr().err == ""
    finally:
        console.setup_logging(debug=False)
