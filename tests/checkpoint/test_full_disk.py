"""``diffujax export`` onto a full disk (the safetensors write fails with "No space left on
device", simulated in-process): one line naming the file, a non-zero exit, no destination and no
temporary directory left."""

import errno
import os

from diffujax.checkpoint import convert, hf_write


def test_export_onto_a_full_disk_is_one_line(hf_gpt2, hf, tmp_path, capsys, monkeypatch):
    from diffujax.cli import main

    convert(hf_gpt2[0], tmp_path / "ckpt", no_mask_token=True)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(hf_write, "save_file", full)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) != 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"writing {tmp_path / 'hf'}" in lines[0] and "No space left on device" in lines[0]
    assert not (tmp_path / "hf").exists() and hf.leftovers(tmp_path, "hf") == []
