"""One uninterrupted reference run for every resume / fault test of the package (session-scoped:
built once, compared against exactly); ``train_runs`` (the sibling helper) importable whatever
pytest's import mode."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/damage.py

import train_runs  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return train_runs.make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, corpus):
    """The uninterrupted run (with samples at its last step)."""
    out_dir = tmp_path_factory.mktemp("reference")
    train_runs.run(out_dir, corpus, train_runs.WITH_SAMPLES)
    return out_dir
