"""``diffujax demo``'s pieces that need no training: its config (block diffusion on the bundled
prose), the infill canvas a block model can condition on, and the bundled infill on the real
SmolLM2 tokenizer. The demo end to end is minutes of CPU training: README, "Quickstart"."""

import pathlib
import sys

import numpy as np
import pytest

from diffujax.commands import demo
from diffujax.checkpoint import store
from diffujax.data.tokenizer import load_tokenizer
from diffujax.readability import readability
from diffujax.runtime import LoadedModel, load_for_inference

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from word_tokenizer import save_word_checkpoint  # noqa: E402


def test_the_demo_adapts_in_blocks_on_its_prose(tmp_path):
    cfg = demo.demo_config(tmp_path / "ckpt", tmp_path / "out", None)
    assert [s["path"] for s in cfg.data.sources] == [str(demo.DEMO_CORPUS)]
    assert [s["path"] for s in cfg.data.eval_sources] == [str(demo.DEFAULT_TEXT)]
    assert 0 < cfg.diffusion.block_size < cfg.data.seq_len
    # the criterion the demo prints accepts the text it trains on, paragraph by paragraph
    paragraphs = [p for p in demo.DEMO_CORPUS.read_text().split("\n\n") if len(p) > 100]
    assert len(paragraphs) >= 10
    for paragraph in paragraphs:
        assert readability(paragraph).readable(), paragraph[:60]
    short = demo.demo_config(tmp_path / "ckpt", tmp_path / "out", 20)
    assert short.train.steps == 20 and short.diffusion.anneal_steps == 10


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    ckpt = save_word_checkpoint(tmp_path_factory.mktemp("demo_ckpt"), words=20, block_size=4)
    return load_for_inference(str(ckpt))


def test_infill_canvas_keeps_span_and_suffix_in_one_block(word_model):
    # BOS w1 w2 w3 | M M w4 w5 | ...: blocks of 4
    ids, src, span = demo.infill_canvas(word_model, "w1 w2 w3", 2, "w4 w5")
    np.testing.assert_array_equal(ids, [22, 1, 2, 3, 21, 21, 4, 5])
    assert span == slice(4, 6) and src.tolist() == [True] * 4 + [False] * 2 + [True] * 2
    # the span's block would not see w6: refused
    with pytest.raises(ValueError, match="do not lie in one block of 4"):
        demo.infill_canvas(word_model, "w1 w2 w3", 2, "w4 w5 w6")
    with pytest.raises(ValueError, match="one block of 4"):
        demo.infill_canvas(word_model, "w1 w2", 2, "w4")  # span positions 3..4 straddle blocks


def test_the_bundled_infill_fits_one_block_of_the_demo(tmp_path):
    """On SmolLM2's own tokenizer and the demo config's block size (the embedded model)."""
    from diffujax.checkpoint.smollm2 import default_model

    checkpoint = default_model()
    config, _ = store.read_meta(checkpoint)
    block = demo.demo_config(checkpoint, tmp_path, None).diffusion.block_size
    model = LoadedModel(config.replace(block_size=block), None, None,
                        load_tokenizer(checkpoint), None, None)
    ids, _, span = demo.infill_canvas(model, demo.INFILL_PROMPT, demo.INFILL_LENGTH,
                                         demo.INFILL_SUFFIX)
    assert span.stop < len(ids)  # there is a suffix, inside the span's block


@pytest.mark.integration  # a fresh interpreter running the demo: about a minute on 2 cores
def test_the_demo_without_adaptation_runs_end_to_end(tmp_path):
    """``diffujax demo --train-steps 0``: every step but the adaptation, on the embedded model;
    its AR samples are measured readable, the infill is skipped, the export reloads."""
    import os
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "diffujax.cli", "demo", "--train-steps", "0",
                          "--blocks", "2", "--draws", "2", "--output-dir", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "why the bound starts far above the AR perplexity" in out
    assert "3. adapting" not in out and "AR with KV cache" in out
    assert f"{demo.SAMPLE_DRAWS} of {demo.SAMPLE_DRAWS} samples readable" in out
    assert "infill: skipped" in out and "transformers reloads it" in out


@pytest.mark.parametrize("stop", ["disk full", "signal"])
def test_a_stopped_adaptation_says_how_to_resume_the_demo(tmp_path, monkeypatch, capsys, stop):
    """The loop's advice when a run stops, "run the same command again", would start a new demo
    in a new temporary directory: the demo's error adds the ``--output-dir`` that resumes this
    one, and adds nothing when the user gave one."""
    from diffujax.cli import main as cli
    from diffujax.runs.metrics import WriterError

    def train(config):
        if stop == "disk full":
            raise WriterError("checkpoint 40 could not be written (no space left on device);"
                              " free the space and run the same command again to resume")
        return 130  # SIGINT: the loop saved a checkpoint and said so

    monkeypatch.setattr(demo, "default_model", lambda: tmp_path / "ckpt")
    monkeypatch.setattr(demo, "score", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo, "train", train)
    monkeypatch.setattr(demo.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "fresh"))
    for given, advice in ((None, f"add --output-dir {tmp_path / 'fresh'} to the same command"),
                          (tmp_path / "mine", None)):
        status = cli(["demo"] + (["--output-dir", str(given)] if given else []))
        err = capsys.readouterr().err
        assert status == (2 if stop == "disk full" else 130) and "Traceback" not in err, err
        lines = [x for x in err.splitlines() if x.startswith("diffujax demo:")]
        assert len(lines) == 1, err
        assert ("run the same command again" in lines[0]) == (stop == "disk full")
        assert (advice in lines[0]) if advice else "--output-dir" not in lines[0], lines[0]
