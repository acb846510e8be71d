"""``diffujax lm-eval`` model arguments, checked as ``diffujax eval`` checks its options: an
unknown or misspelt key is named with the nearest known one, every bad value is named with what
it may be, before any weight is read; through the command, one line and exit status 2."""

import os
import pathlib
import subprocess
import sys

import pytest

from diffujax.inference.generation import sampler_call
from diffujax.tasks.harness import DiffujaxLM
from diffujax.tasks.runner import Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]

BAD = [  # (model_args besides the checkpoint, what the message must say)
    (dict(levles=4), "model_args levles: unknown key (did you mean levels?)"),
    (dict(mcnum=4), "model_args mcnum: unknown key (did you mean mc_num?)"),
    (dict(colour="red"), "model_args colour: unknown key; known keys: checkpoint, objective"),
    (dict(levels=0), "model_args levels=0: must be an integer >= 1"),
    (dict(mc_num=0), "model_args mc_num=0: must be an integer >= 1"),
    (dict(levels=2.5), "model_args levels=2.5: must be an integer >= 1"),
    (dict(rolling_draws=-1), "model_args rolling_draws=-1: must be an integer >= 1"),
    (dict(batch_size=0), "model_args batch_size=0: must be an integer >= 1, auto or auto:N"),
    (dict(batch_size="big"), "model_args batch_size='big': must be an integer >= 1, auto or"),
    (dict(batch_size="auto:x"), "model_args batch_size='auto:x': must be an integer >= 1"),
    (dict(batch_size=1.5), "model_args batch_size=1.5: must be an integer >= 1"),
    (dict(objective="causal"), "model_args objective='causal': must be one of diffusion, ar"),
    (dict(score="elbo"), "model_args score='elbo': must be one of reference, mc"),
    (dict(sampler="beam"), "model_args sampler='beam': must be one of ancestral, confidence"),
    (dict(sampler="topk"), "model_args sampler='topk': is now called confidence"),
    (dict(sampler="blocks"), "model_args sampler='blocks': is now called semi_ar"),
    (dict(ranking="best"), "model_args ranking='best': must be one of masked, all"),
    (dict(steps=0), "model_args steps=0: must be an integer >= 1"),
    (dict(temperature=-1.0), "model_args temperature=-1.0: must be a number >= 0"),
    (dict(temperature="hot"), "model_args temperature='hot': must be a number >= 0"),
    (dict(confidence_temperature=0), "model_args confidence_temperature=0: must be a number > 0"),
    (dict(seed=-1), "model_args seed=-1: must be an integer >= 0"),
    (dict(dtype="int8"), "model_args dtype='int8': must be one of float32, bfloat16"),
    (dict(max_length=1), "model_args max_length=1: must be an integer >= 2"),
    (dict(max_gen_toks=0), "model_args max_gen_toks=0: must be an integer >= 1"),
    (dict(mesh=3), "model_args mesh=3: must be auto, none or axis sizes"),
    (dict(add_bos_token="yes"), "model_args add_bos_token='yes': must be true or false"),
]


@pytest.fixture
def no_weight_reads(monkeypatch):
    from diffujax.checkpoint import store

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the model_args were checked")

    monkeypatch.setattr(store, "_restore", refuse)


def test_lm_evals_batch_size_gives_way_to_the_model_args(tiny_ckpt, no_weight_reads):
    """lm-eval passes its --batch_size (default 1) to every model; the model's own wins."""
    with pytest.raises(ValueError, match="batch_size=0"):
        DiffujaxLM.create_from_arg_string(f"checkpoint={tiny_ckpt},batch_size=0,mesh=none",
                                          {"batch_size": 1, "device": None})


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_model_args_are_named_before_the_model_loads(tiny_ckpt, no_weight_reads, extra,
                                                         message):
    with pytest.raises(ValueError) as caught:
        DiffujaxLM(**{"checkpoint": str(tiny_ckpt), "mesh": "none", **extra})
    assert message in str(caught.value)


def test_a_missing_checkpoint_key_is_named(no_weight_reads):
    with pytest.raises(ValueError, match="model_args checkpoint=None: is required"):
        DiffujaxLM(mesh="none")


def test_max_length_beyond_the_model_is_refused(tiny_ckpt):
    with pytest.raises(ValueError, match="max_length=600: more than the model's 512 positions"):
        DiffujaxLM(checkpoint=str(tiny_ckpt), mesh="none", max_length=600)


@pytest.mark.integration
def test_the_command_prints_one_line(tiny_ckpt, tmp_path):
    (tmp_path / "tiny.yaml").write_text(
        "task: diffujax_args\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'items.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: '{{l}}'\n")
    (tmp_path / "items.jsonl").write_text('{"q": "w1", "c": [" w2", " w3"], "l": 0}\n')
    # batch_size is also lm-eval's own (--batch_size): given in model_args it was passed twice
    proc = subprocess.run(
        [sys.executable, "-m", "diffujax.cli", "lm-eval", "run", "--model", "diffujax",
         "--model_args", f"checkpoint={tiny_ckpt},batch_size=big,mesh=none", "--tasks",
         "diffujax_args", "--include_path", str(tmp_path)], cwd=ROOT, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE, text=True)
    err = proc.stderr
    lines = [x for x in err.splitlines() if x.startswith("diffujax lm-eval: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "model_args batch_size='big': must be an integer >= 1" in lines[0]


@pytest.mark.parametrize("old, new", [("topk", "confidence"), ("blocks", "semi_ar")])
def test_the_python_entry_points_refuse_former_sampler_names(old, new):
    """``diffujax tasks``' settings and the sampler lookup of ``generate`` (which the task engine
    calls) name the new sampler; the new name is accepted."""
    with pytest.raises(ValueError, match=f"sampler '{old}' is now called '{new}'"):
        Settings(sampler=old)
    with pytest.raises(ValueError, match=f"sampler '{old}' is now called '{new}'"):
        sampler_call(old, steps=4, generated=8)
    assert Settings(sampler=new).sampler == new and sampler_call(new, steps=4, generated=8)
