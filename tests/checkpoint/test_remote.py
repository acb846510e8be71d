"""convert / export / eval with every path in a GCS bucket (the emulator of tests/gcs_emulator.py).
References: the same commands on local paths (bit-exact tensors, identical numbers) and
transformers loading the export written to the bucket."""

import json
import pathlib

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from diffujax import paths
from diffujax.checkpoint import convert, export, load
from diffujax.checkpoint.errors import CheckpointError
from diffujax.cli import main as cli


def _upload(local_dir, url):
    for p in sorted(pathlib.Path(local_dir).rglob("*")):
        if p.is_file():
            paths.copy_file(p, f"{url}/{p.relative_to(local_dir).as_posix()}")


def _download(url, local_dir):
    for p in paths.list_files(url):
        dst = pathlib.Path(local_dir) / str(p)[len(url):].lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        paths.copy_file(p, dst)
    return pathlib.Path(local_dir)


@pytest.fixture(scope="module")
def remote(gcs, hf_gpt2, tmp_path_factory):
    """The GPT-2 HF dir uploaded, converted bucket -> bucket, and the same locally."""
    src, model = hf_gpt2
    hf_url = gcs.url_for("hf")
    _upload(src, hf_url)
    ckpt_url = gcs.url_for("ckpt")
    assert str(convert(hf_url, ckpt_url, mask_token_id=62)) == ckpt_url
    local = convert(src, tmp_path_factory.mktemp("local") / "ckpt", mask_token_id=62)
    return dict(hf=hf_url, ckpt=ckpt_url, local=local, model=model, src=src, gcs=gcs)


def test_convert_reads_and_writes_the_bucket(remote):
    assert paths.is_complete(remote["ckpt"])  # marker written last
    cfg_r, params_r = load(remote["ckpt"])
    cfg_l, params_l = load(remote["local"])
    assert cfg_r == cfg_l and cfg_r.mask_token_id == 62
    leaves_r, leaves_l = jax.tree.leaves(params_r), jax.tree.leaves(params_l)
    assert len(leaves_r) == len(leaves_l) > 0
    for a, b in zip(leaves_r, leaves_l):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (paths.resolve(remote["ckpt"]) / "tokenizer.json").is_file()


def test_export_to_the_bucket_loads_in_transformers(remote, tmp_path):
    out = remote["gcs"].url_for("export")
    export(remote["ckpt"], out, max_shard_size="20KB")  # sharded: several uploads + an index
    names = {p.name for p in paths.list_files(out)}
    assert "model.safetensors.index.json" in names and "tokenizer.json" in names
    assert not any(n.startswith(".") and n != paths.COMPLETE for n in names)
    local = _download(out, tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        local, attn_implementation="eager").eval()
    ids = torch.tensor([[1, 5, 9, 2, 33, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, remote["model"](ids).logits,
                                   rtol=1e-5, atol=1e-6)
    local_export = export(remote["local"], tmp_path / "local-hf", max_shard_size="20KB")
    index = json.loads((local / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        a, b = load_file(local / shard), load_file(pathlib.Path(local_export) / shard)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_and_interrupted_destinations(remote, capsys):
    with pytest.raises(CheckpointError, match="already exists"):
        convert(remote["hf"], remote["ckpt"])
    interrupted = remote["gcs"].url_for("interrupted")
    paths.resolve(interrupted).mkdir(parents=True)
    (paths.resolve(interrupted) / "config.json").write_text("{}")  # a killed write: no marker
    assert cli(["convert", remote["hf"], interrupted]) == 1
    assert "holds an interrupted write (no .complete marker)" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"incomplete or not a diffujax checkpoint"):
        load(interrupted)
    convert(remote["hf"], interrupted, overwrite=True)
    assert paths.is_complete(interrupted)
    # A conversion that fails leaves nothing behind in the bucket.
    bad = remote["gcs"].url_for("bad-src")
    _upload(remote["src"], bad)
    (paths.resolve(bad) / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                                "vocab_size": 7}))
    dst = remote["gcs"].url_for("never")
    with pytest.raises(CheckpointError):
        convert(bad, dst)
    assert not paths.resolve(dst).exists()


def test_eval_text_from_the_bucket(remote, tmp_path, capsys):
    text = " ".join(f"w{i % 50}" for i in range(200))
    (tmp_path / "t.txt").write_text(text)
    url = remote["gcs"].url_for("text") + "/t.txt"
    paths.copy_file(tmp_path / "t.txt", url)
    args = ["--objective", "ar", "--seq-len", "16", "--blocks", "4", "--json"]
    assert cli(["eval", "--checkpoint", remote["ckpt"], "--text", url, *args]) == 0
    from_bucket = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli(["eval", "--checkpoint", str(remote["local"]), "--text", str(tmp_path / "t.txt"),
                *args]) == 0
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_bucket == local and local["tokens"] > 0
    assert cli(["eval", "--checkpoint", remote["ckpt"], "--text", url + ".missing", *args]) == 2
    assert ".missing" in capsys.readouterr().err
