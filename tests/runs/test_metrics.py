"""Training numbers: FLOP counts checked by hand against the published model sizes, the lookup of
a device's peak, throughput/ETA arithmetic on a fake clock, and the writers (JSONL, TensorBoard)."""

import json

import pytest

from diffujax.models import GPT2Config, LlamaConfig, matmul_params
from diffujax.runs.flops import (PEAK_FLOPS, attention_flops_per_token, mfu, peak_flops_per_device,
                                 train_flops_per_token)
from diffujax.runs.metrics import (RunLogger, Throughput, format_duration, format_si, read_jsonl,
                                   summary_line)

GPT2_SMALL = GPT2Config(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
                        num_kv_heads=12, intermediate_size=3072, max_positions=1024)
LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                        num_kv_heads=32, intermediate_size=11008)


def test_flops_gpt2_small_by_hand():
    # 12 layers x (q, k, v, o: 4 d^2 + fc, proj: 2 d 4d) + the tied output head d V.
    n = 12 * (4 * 768 ** 2 + 2 * 768 * 3072) + 768 * 50257
    assert matmul_params(GPT2_SMALL) == n == 123_532_032
    # Scores and values over the FULL L x L square: 2 matmuls x 2 FLOPs x L x d, x3 for training.
    attn = 3 * 2 * 2 * 12 * 1024 * 768
    assert attention_flops_per_token(GPT2_SMALL, 1024) == attn
    assert train_flops_per_token(GPT2_SMALL, 1024) == 6 * n + attn


def test_flops_llama2_7b_matches_published_size():
    n = matmul_params(LLAMA2_7B)  # everything but the 131M input embedding and the norms
    assert n == 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 4096 * 32000
    assert abs(n + 32000 * 4096 - 6.738e9) / 6.738e9 < 1e-3  # "6.74B parameters"


def test_gqa_counts_fewer_kv_params():
    gqa = LLAMA2_7B.replace(num_kv_heads=8)
    assert matmul_params(LLAMA2_7B) - matmul_params(gqa) == 32 * 2 * 4096 * (4096 - 1024)


def test_a_device_kind_picks_its_most_specific_entry():
    """jax's device kind contains the table's names: the longest one contained wins, so a v5e
    ("TPU v5 lite") is not taken for a v5p ("TPU v5") nor an H100 PCIe for an SXM H100; the
    match ignores case, and an unlisted kind has no peak (MFU is then not reported)."""
    table = PEAK_FLOPS
    for kind, entry in [("TPU v5 lite", "TPU v5 lite"), ("TPU v5", "TPU v5"),
                        ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 80GB HBM3", "H100"),
                        ("tpu V4", "TPU v4")]:
        assert peak_flops_per_device(kind) == table[entry], kind
    assert table["TPU v5 lite"] != table["TPU v5"] and table["H100 PCIe"] != table["H100"]
    assert peak_flops_per_device("cpu") is None
    assert peak_flops_per_device("TPU v99") is None


def test_mfu_is_none_without_a_peak():
    assert mfu(1e12, 8, None) is None
    assert mfu(4e12, 4, 2e12) == 0.5


def test_throughput_on_a_fake_clock():
    tp = Throughput(tokens_per_step=1000, flops_per_token=2e6, total_steps=110,
                    num_devices=2, peak_per_device=1e9)
    tp.start(10, now=100.0)
    out = tp.update(20, now=102.0)  # 10 steps in 2 s
    assert out["tokens_per_s"] == pytest.approx(5000)
    assert out["step_time_s"] == pytest.approx(0.2)
    assert out["mfu"] == pytest.approx(5000 * 2e6 / (2 * 1e9))
    assert out["eta_s"] == pytest.approx(90 * 0.2)
    tp.pause(1.0)  # an evaluation: not training time, but it recurs, so it counts in the ETA
    out = tp.update(30, now=105.0)
    assert out["tokens_per_s"] == pytest.approx(5000)
    assert out["eta_s"] == pytest.approx(80 * 0.25)
    cpu = Throughput(tokens_per_step=1, flops_per_token=1, total_steps=2, num_devices=1)
    cpu.start(0, now=0.0)
    assert "mfu" not in cpu.update(1, now=1.0)  # unknown peak: no made-up MFU


def test_formatting():
    assert format_duration(59) == "59s"
    assert format_duration(3 * 3600 + 120) == "3h02m"
    assert format_duration(2 * 86400 + 3600) == "2d01h00m"
    assert format_duration(float("inf")) == "n/a"
    assert format_si(12345) == "12.35k"
    line = summary_line(5, 10, {"loss": 1.5, "tokens_per_s": 2e6, "eta_s": 30})
    assert line == "step 5/10 | loss 1.5000 | tok/s 2.00M | mfu n/a | eta 30s"


def test_run_logger_writes_jsonl_and_tensorboard(tmp_path):
    log = RunLogger(tmp_path, total_steps=4, enabled=True)
    for step in (1, 2, 3):
        log.train(step, {"loss": 1.0 / step, "lr": 0.1, "tokens_per_s": 10.0})
    log.eval(3, {"nelbo": 2.0, "ppl_bound": 7.39})
    log.text(3, "samples", ["hello", "world"])
    log.close()
    records = read_jsonl(tmp_path / "metrics.jsonl", kind=None)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("train", 3), ("eval", 3), ("text", 3)]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # A resume from step 2 drops what the interrupted attempt logged after its checkpoint.
    log = RunLogger(tmp_path, total_steps=4, start_step=2, enabled=True, tensorboard=False)
    log.train(3, {"loss": 0.25})
    log.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_run_logger_is_silent_off_process_zero(tmp_path, capsys):
    log = RunLogger(tmp_path / "x", total_steps=4, enabled=False)
    log.train(1, {"loss": 1.0})
    log.message("hello")
    log.close()
    assert not (tmp_path / "x").exists()
    assert capsys.readouterr().err == ""


def test_truncated_last_line_is_tolerated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + '\n{"kind": "tr')
    RunLogger(tmp_path, total_steps=2, start_step=1, enabled=True, tensorboard=False).close()
    assert len(read_jsonl(path)) == 1


@pytest.mark.integration  # a fresh interpreter: torch not loaded by anything else yet
def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
    """``diffujax train`` loads tensorboardX with torch hidden (runs/tensorboardx.py: seconds of
    start-up); its event files are still written, and torch imports afterwards as usual."""
    import os
    import pathlib
    import subprocess
    import sys

    code = f"""
import pathlib, sys
from diffujax.runs.metrics import RunLogger
import diffujax.train.loop
assert "torch" not in sys.modules, "torch was imported"
log = RunLogger(pathlib.Path({str(tmp_path)!r}), total_steps=1, start_step=1, enabled=True)
log.train(1, dict(loss=2.5, grad_norm=1.0, lr=1e-3, skipped=0))
log.close()
import torch
print(torch.ones(3).sum().item())
"""
    root = pathlib.Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(root)), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "3.0"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 2.5
