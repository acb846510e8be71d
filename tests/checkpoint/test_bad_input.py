"""Bad input: a CheckpointError naming the file / tensor / key at fault, and nothing left behind
at the destination. Sources are made by breaking a directory transformers wrote (the reference);
the command-line tool is run as a subprocess (its exit code and message)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffujax.checkpoint import CheckpointError, convert, export

ROOT = pathlib.Path(__file__).resolve().parents[2]


def edit_tensors(directory, fn):
    sd = load_file(directory / "model.safetensors")
    fn(sd)
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})


def edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


def truncate(directory):
    f = directory / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def untie_head(sd):
    sd["lm_head.weight"] = sd["transformer.wte.weight"] + 1


BREAKAGES = {  # name: (how to break a copy of the GPT-2 directory, expected message regex)
    "missing_tensor": (lambda d: edit_tensors(d, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias")),
                       r"missing tensor\(s\) 'transformer\.h\.1\.mlp\.c_fc\.bias'"),
    "unexpected_tensor": (lambda d: edit_tensors(d, lambda sd: sd.update(
        {"transformer.h.0.attn.extra.weight": torch.zeros(2)})),
        r"model\.safetensors: unexpected tensor\(s\) 'transformer\.h\.0\.attn\.extra\.weight'"),
    "wrong_shape": (lambda d: edit_tensors(d, lambda sd: sd.update(
        {"transformer.h.0.mlp.c_fc.weight": torch.zeros(32, 100)})),
        r"model\.safetensors: tensor 'transformer\.h\.0\.mlp\.c_fc\.weight' has shape \(32, 100\),"
        r" but config\.json implies \(32, 128\)"),
    "integer_tensor": (lambda d: edit_tensors(d, lambda sd: sd.update(
        {"transformer.ln_f.bias": torch.zeros(32, dtype=torch.int32)})),
        r"tensor 'transformer\.ln_f\.bias' has dtype int32"),
    "unknown_architecture": (lambda d: edit_config(d, model_type="bert", architectures=["BertModel"]),
                             r"config\.json: unknown architecture \(model_type='bert'"),
    "config_missing_key": (lambda d: _drop_key(d, "n_layer"),
                           r"config\.json.*missing required key 'n_layer'"),
    "config_more_layers_than_weights": (lambda d: edit_config(d, n_layer=3),
                                        r"missing tensor\(s\) 'transformer\.h\.2\..*3 layers"),
    "config_wider_than_weights": (lambda d: edit_config(d, n_embd=64),
                                  r"model\.safetensors: tensor 'transformer\.[\w.]+' has shape \(.*\), but"
                                  r" config\.json implies"),
    "config_not_json": (lambda d: (d / "config.json").write_text("{nope"),
                        r"config\.json: not valid JSON"),
    "no_config": (lambda d: (d / "config.json").unlink(), r"config\.json: missing"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), r"no weights found"),
    "truncated_safetensors": (truncate, r"model\.safetensors: cannot read safetensors file"
                                        r" \(truncated or corrupted\?\)"),
    "tied_head_differs": (lambda d: edit_tensors(d, untie_head),
                          r"'lm_head\.weight' differs from the input embedding.*tie_word_embeddings"),
    "corrupted_bin": (lambda d: ((d / "model.safetensors").unlink(),
                                 (d / "pytorch_model.bin").write_bytes(b"\x80\x02garbage")),
                      r"pytorch_model\.bin: cannot read torch checkpoint"),
}


def _drop_key(directory, key):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.pop(key)
    (directory / "config.json").write_text(json.dumps(cfg))


def assert_fails_cleanly(tmp_path, fn, match):
    with pytest.raises(CheckpointError, match=match):
        fn()
    assert not (tmp_path / "dst").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.")]


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_convert_rejects(hf_gpt2, tmp_path, breakage):
    src = tmp_path / "src"
    shutil.copytree(hf_gpt2[0], src)
    breaker, match = BREAKAGES[breakage]
    breaker(src)
    assert_fails_cleanly(tmp_path, lambda: convert(src, tmp_path / "dst"), match)


def test_missing_index_shard(hf, tmp_path):
    src = hf.write_hf(tmp_path / "src", hf.tiny_model(hf.GPT2), "sharded")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_fails_cleanly(tmp_path, lambda: convert(src, tmp_path / "dst"),
                         rf"model\.safetensors\.index\.json: shard file\(s\) {shard.name} listed in"
                         r" the index are missing")


def test_bin_without_torch(hf_gpt2, tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(hf_gpt2[0], src)
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    assert_fails_cleanly(tmp_path, lambda: convert(src, tmp_path / "dst"),
                         r"pytorch_model\.bin: reading pytorch_model\.bin needs torch")


def test_destination_exists(hf_gpt2, tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"dst: already exists \(pass overwrite=True"):
        convert(hf_gpt2[0], tmp_path / "dst")
    assert os.listdir(tmp_path / "dst") == ["keep.txt"]
    convert(hf_gpt2[0], tmp_path / "dst", overwrite=True)
    assert not (tmp_path / "dst" / "keep.txt").exists() and (tmp_path / "dst" / ".complete").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_export_rejects_non_checkpoint(hf_gpt2, tmp_path):
    assert_fails_cleanly(tmp_path, lambda: export(hf_gpt2[0], tmp_path / "dst"),
                         r"incomplete or not a diffujax checkpoint \(no \.complete marker\)")


def test_mask_token_id_outside_vocabulary(hf_gpt2, tmp_path):
    assert_fails_cleanly(tmp_path, lambda: convert(hf_gpt2[0], tmp_path / "dst", mask_token_id=65),
                         r"mask token id 65 is outside the vocabulary \(0\.\.63, or 64 to add")


def _tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_torch_weights.py"), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.integration  # the tool in a fresh interpreter
def test_cli_tool(hf_gpt2, tmp_path):
    """The tool exits non-zero with the message on bad input, and converts + exports otherwise."""
    bad = _tool(str(tmp_path / "nowhere"), str(tmp_path / "dst"))
    assert bad.returncode != 0 and "nowhere: not a directory" in bad.stderr
    convert(hf_gpt2[0], tmp_path / "ckpt", no_mask_token=True)
    ok = _tool("--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--max-shard-size", "20KB")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert ok.stdout.strip() == str(tmp_path / "out")


# -- where convert / export may write, through the command line ----------------------------------


def _cli(*argv):
    from diffujax.cli import main

    return main([str(a) for a in argv])


def _tree(directory):
    return sorted(str(p.relative_to(directory)) for p in pathlib.Path(directory).rglob("*"))


def test_destination_overlapping_the_source_is_refused(hf_gpt2, tmp_path, capsys):
    """``--overwrite`` must never delete the source: a destination that is the source, contains
    it or lies inside it is refused, for convert and for export, and nothing is touched."""
    parent = tmp_path / "models"
    src = parent / "gpt2"
    shutil.copytree(hf_gpt2[0], src)
    assert _cli("convert", src, tmp_path / "ckpt", "--no-mask-token") == 0
    ckpt = tmp_path / "ckpt"
    before = {d: _tree(d) for d in (parent, ckpt)}
    cases = [("convert", src, src, "is the source itself"),
             ("convert", src, parent, "contains the source"),
             ("convert", src, src / "out", "lies inside the source"),
             ("export", ckpt, ckpt, "is the source itself"),
             ("export", ckpt, tmp_path, "contains the source"),
             ("export", ckpt, ckpt / "hf", "lies inside the source")]
    for command, a, b, message in cases:
        assert _cli(command, a, b, "--overwrite") == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (command, err)
    assert {d: _tree(d) for d in (parent, ckpt)} == before


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_directories_of_a_killed_run_are_removed(hf_gpt2, tmp_path):
    """A convert killed mid-write leaves ``.DST.tmp-HOST-PID-*`` (the size of the model); the next
    convert to the same destination removes those whose process is gone and says so, and leaves
    a live process's alone."""
    from diffujax import paths

    host = paths.scratch_prefix(tmp_path / "dst", "tmp").split("-")[1]  # as a writer names it
    stale = tmp_path / f".dst.tmp-{host}-{_dead_pid()}-abc123"
    stale_export = tmp_path / f".dst.export-{host}-{_dead_pid()}-xyz"
    live = tmp_path / f".dst.tmp-{host}-{os.getpid()}-live"
    other = tmp_path / f".other.tmp-{host}-{_dead_pid()}-abc"
    for d in (stale, stale_export, live, other):
        d.mkdir()
        (d / "params").write_bytes(b"\0" * 1000)
    with pytest.warns(RuntimeWarning, match=r"removed .*\.dst\.tmp-.*: a temporary directory left"
                                            r" by a killed diffujax"):
        convert(hf_gpt2[0], tmp_path / "dst")
    assert not stale.exists() and not stale_export.exists()
    assert live.exists() and other.exists()  # running, or another destination's
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["dst", live.name, other.name])


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="mamba"), r"unknown architecture \(model_type='mamba'"),
    (dict(model_type="gpt2"), r"model_type 'gpt2' contradicts architectures \['LlamaForCausalLM'\]"),
])
def test_model_type_contradicting_the_weights_is_refused(hf, tmp_path, changes, message):
    src = hf.write_hf(tmp_path / "src", hf.tiny_model(hf.LLAMA))
    edit_config(src, **changes)
    assert_fails_cleanly(tmp_path, lambda: convert(src, tmp_path / "dst"), message)
