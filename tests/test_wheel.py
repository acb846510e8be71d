"""``diffujax demo`` from an installed wheel: what it reads ships as package data.

Builds the wheel from a copy of the sources (setuptools, no network), unpacks it into a fresh
directory and, from a directory outside the checkout with only that copy importable, resolves the
demo's config and corpus paths and runs ``diffujax demo --help``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.integration  # a wheel build, then the demo in a fresh interpreter

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHECK = """
import pathlib, sys
import diffujax, diffujax.commands.demo as demo
site = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(diffujax.__file__).resolve().is_relative_to(site), diffujax.__file__
cfg = demo.demo_config(sys.argv[2], pathlib.Path("out"), 5)
train = pathlib.Path(cfg.data.sources[0]["path"])
held_out = pathlib.Path(cfg.data.eval_sources[0]["path"])
assert train.resolve().is_relative_to(site) and train == demo.DEMO_CORPUS, train
assert "Every morning" in train.read_text()
assert held_out.is_file() and "GNU GENERAL PUBLIC LICENSE" in held_out.read_text()
assert pathlib.Path(demo.DEFAULT_TEXT) == held_out and cfg.train.steps == 5
print("ok", cfg.model.checkpoint)
"""


def test_demo_runs_from_the_wheel(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "diffujax", src / "diffujax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)], check=True,
                   capture_output=True)
    [wheel] = (tmp_path / "dist").glob("diffujax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"diffujax/assets/smollm2_135m_demo.yaml", "diffujax/assets/gpl-3.0.txt",
            "diffujax/assets/demo_prose.txt"} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", CHECK, str(site), str(tmp_path)], cwd=elsewhere,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", str(tmp_path)]
    help_text = subprocess.run([sys.executable, "-m", "diffujax.cli", "demo", "--help"],
                               cwd=elsewhere, env=env, capture_output=True, text=True)
    assert help_text.returncode == 0, help_text.stderr
    # the default text is the one inside the unpacked wheel (argparse may wrap the long path)
    assert str(site / "diffujax" / "assets" / "gpl-3.0.txt") in "".join(help_text.stdout.split())
