"""``pretokenize`` held to the bad-input standard: values that cannot work (a block length of 0
never finished a block: the run hung), an output path that is a file or cannot be written, a
tokenizer path holding no tokenizer, a full disk: one line naming the option or file, exit
status 1, nothing half-written. A killed run's temporary shard is removed by the rerun, whose
output equals an uninterrupted run's."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from diffujax.data.pretokenize import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _argv(tokenizer, out, corpus, *extra, shards="2", layout=("--seq-len", "16")):
    return ["--tokenizer", str(tokenizer), "--out", str(out), "--shards", shards, *layout,
            "--mode", "paragraph", *extra, str(corpus)]


def _one_line(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]  # (INFO lines may precede)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("extra, message", [
    (dict(layout=("--seq-len", "0")), "--seq-len 0: must be >= 2"),
    (dict(layout=("--seq-len", "-4")), "--seq-len -4: must be >= 2"),
    (dict(shards="0"), "--shards 0: must be >= 1"),
    (dict(shards="-1"), "--shards -1: must be >= 1"),
])
def test_values_that_cannot_work_are_refused(sp_dir, corpus_dir, tmp_path, capsys, extra,
                                             message):
    line = _one_line(capsys, _argv(sp_dir, tmp_path / "out", corpus_dir, **extra))
    assert message in line, line
    assert not (tmp_path / "out").exists()


def test_other_bad_options_are_refused(sp_dir, corpus_dir, tmp_path, capsys):
    line = _one_line(capsys, _argv(sp_dir, tmp_path / "o", corpus_dir, "--workers", "0"))
    assert "--workers 0: must be >= 1" in line


def test_an_output_path_that_is_a_file_or_read_only(sp_dir, corpus_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = _one_line(capsys, _argv(sp_dir, tmp_path / "file", corpus_dir))
    assert f"--out {tmp_path / 'file'}: is a file, not a directory" in line
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    (tmp_path / "ro").mkdir(mode=0o555)
    line = _one_line(capsys, _argv(sp_dir, tmp_path / "ro", corpus_dir))
    assert f"--out {tmp_path / 'ro'}: cannot write there (Permission denied)" in line


def test_a_read_only_output_directory(sp_dir, corpus_dir, tmp_path, capsys, monkeypatch):
    """As a user without write access meets it (simulated: the tests may run as root)."""
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    line = _one_line(capsys, _argv(sp_dir, tmp_path / "ro", corpus_dir))
    assert f"--out {tmp_path / 'ro'}: cannot write there (Permission denied)" in line


@pytest.mark.parametrize("content, message", [
    (None, "no tokenizer.json or tokenizer.model in"),
    ("hello\n", "tokenizer.model: not a sentencepiece model"),
    ('{"x": 1', "tokenizer.json: not a tokenizer.json"),
])
def test_a_tokenizer_path_without_a_tokenizer(corpus_dir, tmp_path, capsys, content, message):
    tok = tmp_path / "tok"
    tok.mkdir()
    if content is not None:
        name = "tokenizer.json" if content.startswith("{") else "tokenizer.model"
        (tok / name).write_text(content)
    line = _one_line(capsys, _argv(tok, tmp_path / "out", corpus_dir))
    assert message in line, line


def test_a_full_disk_is_one_line_and_leaves_no_partial_shard(sp_dir, corpus_dir, tmp_path,
                                                             capsys, monkeypatch):
    from array_record.python import array_record_module

    real = array_record_module.ArrayRecordWriter

    class FullDisk:
        """The real writer, until the disk fills at the third record."""

        def __init__(self, *args):
            self.writer, self.count = real(*args), 0

        def write(self, data):
            self.count += 1
            if self.count == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.writer.write(data)

        def close(self):
            return self.writer.close()

    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", FullDisk)
    out = tmp_path / "out"
    line = _one_line(capsys, _argv(sp_dir, out, corpus_dir))
    assert f"writing {out / 'data-00000-of-00002.array_record'} failed: No space left" in line
    assert sorted(p.name for p in out.iterdir()) == []  # no shard, no temporary, no metadata


KILL_IN_SHARD_0 = """
import os, signal, sys
from diffujax.data import pretokenize
real = pretokenize._tokenize_into
def killed(*args):
    real(*args)
    os.kill(os.getpid(), signal.SIGKILL)  # shard 0 is in its temporary file, not renamed yet
pretokenize._tokenize_into = killed
sys.exit(pretokenize.main(sys.argv[1:]))
"""


@pytest.mark.integration
def test_a_killed_runs_temporary_shard_is_removed_by_the_rerun(sp_dir, corpus_dir, tmp_path):
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert main(_argv(sp_dir, clean, corpus_dir)) == 0
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SHARD_0,
                           *_argv(sp_dir, out, corpus_dir)], env=env, cwd=ROOT, timeout=120,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stdout
    left = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert left and all(n.startswith(".data-00000-of-00002.array_record.tmp-") for n in left)
    assert main(_argv(sp_dir, out, corpus_dir)) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    for p in clean.iterdir():
        if p.suffix == ".array_record":
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name
