"""A LoRA run as the user runs it (``diffujax train model.lora=...``, adapter dropout on): killed
and resumed it logs the uninterrupted run's losses exactly; ``diffujax export`` writes the merged model (loaded by
transformers) or, with ``--adapter``, a PEFT adapter that ``peft`` loads onto the base model's
export with the merged model's logits. References: the uninterrupted run, transformers and
peft."""

import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from train_runs import NO_SAMPLES, ROOT, losses, run, start, wait_for_step

pytestmark = pytest.mark.integration  # runs of the CLI as processes

LORA = ("model.lora={rank: 4, alpha: 8, targets: [q_proj, v_proj, down_proj], dropout: 0.1}",
        "train.steps=12", "logging.eval_every=0", NO_SAMPLES)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "diffujax.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory, corpus):
    out_dir = tmp_path_factory.mktemp("lora_reference")
    run(out_dir, corpus, *LORA)
    return out_dir


def test_sigkill_then_resume_is_exact(lora_reference, corpus, tmp_path):
    proc = start(tmp_path, corpus, *LORA)
    wait_for_step(proc, tmp_path, 7, checkpoint=5)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    out = run(tmp_path, corpus, *LORA)
    assert "resumed from" in out
    assert losses(tmp_path) == losses(lora_reference)


def test_merged_and_adapter_exports_agree(lora_reference, tmp_path):
    import transformers
    from peft import PeftModel

    base_run = tmp_path / "base_run"  # the base model of the run, as a checkpoint of step 0
    merged, adapter, base = tmp_path / "merged", tmp_path / "adapter", tmp_path / "base"
    done = cli("export", lora_reference, merged)
    assert done.returncode == 0, done.stderr
    done = cli("export", lora_reference, adapter, "--adapter")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors"]
    # The base weights: the frozen tree of the run's checkpoint, exported as a plain model.
    from diffujax.checkpoint import export, store
    from diffujax.train.export import read_step_weights
    weights = read_step_weights(lora_reference, None)
    store.save(base_run, weights.model_cfg, weights.frozen,
               tokenizer_from=weights.meta["tokenizer_dir"])
    export(base_run, base)

    tokens = torch.tensor(np.random.default_rng(0).integers(0, 256, (2, 24)))
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(merged)(tokens).logits
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        plain = model(tokens).logits
        got = PeftModel.from_pretrained(model, adapter)(tokens).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    assert np.abs(plain.numpy() - want.numpy()).max() > 1e-4  # the adapters changed something


def test_adapter_of_a_full_run_is_refused(reference, tmp_path):
    done = cli("export", reference, tmp_path / "adapter", "--adapter")
    assert done.returncode == 1
    assert "not a LoRA run (model.lora unset)" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "adapter").exists()
