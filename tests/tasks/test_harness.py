"""The lm-evaluation-harness model. Reference: lm-eval's own ``hf`` model on the real
SmolLM2-135M (unadapted, converted without a mask token) over a custom local-jsonl task YAML
(no downloads): ``objective=ar`` log-likelihoods agree to 1e-4. On the tiny model: the
diffusion requests equal the engine's scores, rolling windows cover the document once, and
generation honours stop sequences."""

import json
import os

import numpy as np
import pytest
from lm_eval.api.instance import Instance

from diffujax.tasks.harness import DiffujaxLM

from task_toys import logits_of


def instance(kind, args, idx=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx)


@pytest.fixture(scope="module")
def tiny_lm(tiny_ckpt):
    return {objective: DiffujaxLM(checkpoint=str(tiny_ckpt), objective=objective, mesh="none",
                                  batch_size=4, levels=8, mc_num=4, rolling_draws=2,
                                  max_length=12)
            for objective in ("diffusion", "ar")}


def test_loglikelihood_requests_equal_the_engine_scores(tiny_lm):
    from diffujax.tasks.engine import Row

    requests = [instance("loglikelihood", ("w1 w2 w3", " w4 w5")),
                instance("loglikelihood", ("w7", " w8")),
                instance("loglikelihood", ("", "w9 w10"))]  # empty context: the prefix token
    lm = tiny_lm["diffusion"]
    out = lm.loglikelihood(requests)
    enc = lm.tok_encode
    rows = [Row.make(enc("w1 w2 w3"), enc("w4 w5"), 0), Row.make(enc("w7"), enc("w8"), 1),
            Row.make([lm.prefix_token_id], enc("w9 w10"), 2)]
    expected = -lm.engine.diffusion_score(rows, num_levels=8)
    np.testing.assert_allclose([ll for ll, _ in out], expected, rtol=1e-6)
    lm.args["score"] = "mc"
    try:
        mc = lm.loglikelihood(requests)
    finally:
        lm.args["score"] = "reference"
    np.testing.assert_allclose([ll for ll, _ in mc], -lm.engine.conditional_nll(rows, num_draws=4),
                               rtol=1e-6)


def test_rolling_windows_cover_the_document_once(tiny_lm, tiny_model):
    from scipy import special

    from diffujax.attention.pattern import causal

    text = " ".join(f"w{i}" for i in range(30))  # 30 tokens, windows of max_length 12
    ar = tiny_lm["ar"].loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])[0]
    ids = tiny_lm["ar"].tok_encode(text)
    prefix = tiny_lm["ar"].prefix_token_id
    # plain: lm-eval's disjoint windows (context_len=1): blocks of max_length tokens, the first
    # after the prefix token; a later block ending at b sees the tokens from b - max_length - 1
    plain = 0.0
    for start in range(0, len(ids), 12):
        end = min(start + 12, len(ids))
        context = [prefix] if start == 0 else ids[max(0, end - 13):start]
        block = ids[start:end]
        logp = special.log_softmax(logits_of(tiny_model, context + block, causal()), -1)
        plain += sum(logp[len(context) - 1 + k, t] for k, t in enumerate(block))
    assert ar == pytest.approx(plain, rel=1e-5)
    diffusion = tiny_lm["diffusion"].loglikelihood_rolling(
        [instance("loglikelihood_rolling", (text,))])[0]
    assert np.isfinite(diffusion) and diffusion < 0


def test_generate_until_honours_stop_sequences(tiny_lm):
    for lm in tiny_lm.values():
        free = lm.generate_until([instance("generate_until", ("w1 w2", dict(max_gen_toks=6)))])[0]
        words = free.split()
        assert 0 < len(words) <= 6
        stop = words[min(2, len(words) - 1)]
        cut = lm.generate_until([instance("generate_until",
                                          ("w1 w2", dict(max_gen_toks=6, until=[stop])))])[0]
        assert cut == free.split(stop)[0] and stop not in cut


@pytest.fixture(scope="module")
def smol_ar(tmp_path_factory):
    """SmolLM2 as Hugging Face has it, converted without a mask token (the unadapted model)."""
    from diffujax.checkpoint import smollm2
    from diffujax.checkpoint.convert import convert

    hf = smollm2.materialize_hf()
    return hf, convert(hf, tmp_path_factory.mktemp("smol") / "ckpt", dtype="float32",
                       no_mask_token=True)


def test_ar_loglikelihood_equals_lm_eval_hf_on_smollm2(smol_ar, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    hf_dir, ckpt = smol_ar
    items = [dict(question="The capital of France is", choices=[" Paris", " London", " Rome"],
                  label=0),
             dict(question="Question: What do bees make?\nAnswer:", choices=[" honey", " milk"],
                  label=0),
             dict(question="2 + 2 =", choices=[" 4", " five", " twenty-two"], label=0)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tmp_path / "parity.yaml").write_text(
        "task: diffujax_parity\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'items.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    scores = {}
    for model, args in [("hf", f"pretrained={hf_dir},dtype=float32,device=cpu"),
                        ("diffujax", f"checkpoint={ckpt},objective=ar,mesh=none")]:
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["diffujax_parity"],
                                      task_manager=manager, log_samples=True, batch_size=4)
        scores[model] = np.array([r[0][0] for s in out["samples"]["diffujax_parity"]
                                  for r in s["resps"]])
    assert scores["hf"].shape == (8,)
    np.testing.assert_allclose(scores["diffujax"], scores["hf"], atol=1e-4, rtol=0)


def test_diffujax_lm_eval_command_runs_a_local_task(tiny_ckpt, tmp_path, capsys):
    """``diffujax lm-eval`` hands its arguments to lm-eval's CLI with the model registered."""
    from diffujax.cli import main

    items = [dict(question="w1 w2 w3", choices=[" w4", " w5 w6"], label=i % 2) for i in range(3)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tmp_path / "tiny.yaml").write_text(
        "task: diffujax_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'items.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    out = tmp_path / "out"
    assert main(["lm-eval", "run", "--model", "diffujax", "--model_args",
                 f"checkpoint={tiny_ckpt},objective=diffusion,levels=4,mesh=none",
                 "--tasks", "diffujax_tiny", "--include_path", str(tmp_path),
                 "--output_path", str(out)]) == 0
    [result] = list(out.rglob("results_*.json"))
    acc = json.loads(result.read_text())["results"]["diffujax_tiny"]["acc,none"]
    assert acc in (0.0, 1 / 3, 2 / 3, 1.0)
