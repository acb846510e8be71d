"""``diffujax convert`` from a Hugging Face Hub id, offline, out of a Hugging Face cache that the
test writes itself in the hub's layout (models--ORG--NAME/snapshots/REV + refs/main): the same
checkpoint as converting the directory; an id the cache lacks is one line naming it. No network:
HF_HUB_OFFLINE=1 throughout. Also: convert says when it adds a mask token."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffujax.checkpoint import convert, load
from diffujax.models import flatten

ROOT = Path(__file__).resolve().parents[2]
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _hf_cache(home: Path, repo_id: str, model_dir: Path) -> None:
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


def _convert(*args, home: Path, cwd: Path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HOME=str(home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "diffujax.cli", "convert", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_a_hub_id_converts_offline_from_the_cache(hf_gpt2, tmp_path):
    home = tmp_path / "hf_home"
    _hf_cache(home, "tiny-org/tiny-gpt2", hf_gpt2[0])
    run = _convert("tiny-org/tiny-gpt2", str(tmp_path / "from_hub"), home=home, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert REVISION in run.stderr  # it says which snapshot it read
    assert "mask token: added <|mask|> to the tokenizer as id" in run.stderr
    config, params = load(tmp_path / "from_hub")
    ref_config, ref_params = load(convert(hf_gpt2[0], tmp_path / "from_dir"))
    assert config == ref_config
    params, ref_params = flatten(params), flatten(ref_params)
    assert params.keys() == ref_params.keys()
    for name in params:
        np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(ref_params[name]))


@pytest.mark.integration
def test_a_hub_id_missing_from_the_cache_is_one_line(hf_gpt2, tmp_path):
    home = tmp_path / "hf_home"
    _hf_cache(home, "tiny-org/tiny-gpt2", hf_gpt2[0])
    run = _convert("tiny-org/other-model", str(tmp_path / "out"), home=home, cwd=tmp_path)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "tiny-org/other-model: not in the Hugging Face cache" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_local_directory_wins_over_a_hub_id(hf_gpt2, tmp_path, monkeypatch):
    """``org/name`` that exists here is the directory (no Hub, no cache)."""
    from diffujax.checkpoint import hub

    shutil.copytree(hf_gpt2[0], tmp_path / "tiny-org" / "tiny-gpt2")
    monkeypatch.chdir(tmp_path)
    assert not hub.is_hub_id("tiny-org/tiny-gpt2")
    assert hub.is_hub_id("tiny-org/elsewhere") and hub.is_hub_id("org/name@v1.0")
    assert not hub.is_hub_id("gs://bucket/model") and not hub.is_hub_id("/abs/path")


def test_convert_says_when_it_adds_a_mask_token(hf_gpt2, tmp_path, caplog):
    with caplog.at_level("INFO", logger="diffujax"):
        convert(hf_gpt2[0], tmp_path / "with_mask")
    notes = [r.getMessage() for r in caplog.records if "mask token" in r.getMessage()]
    vocab = load(tmp_path / "with_mask")[0].vocab_size
    assert len(notes) == 1 and f"as id {vocab - 1} (a new embedding row" in notes[0], notes
    caplog.clear()
    with caplog.at_level("INFO", logger="diffujax"):
        convert(hf_gpt2[0], tmp_path / "without", no_mask_token=True)
    assert not [r for r in caplog.records if "mask token" in r.getMessage()]
