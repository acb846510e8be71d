"""The paper's GSM8K pipeline end to end with the preset config: ``diffujax train`` (SFT: the
question clean, SEP and PAD from the preset's data options) on a tiny model, then
``diffujax tasks --task gsm8k`` on the trained checkpoint."""

import json
import pathlib

from diffujax.cli import main
from diffujax.config import load_config

from task_toys import EOS, MASK

PRESET = pathlib.Path(__file__).resolve().parents[2] / "configs" / "diffullama_gsm8k_sft.yaml"


def test_preset_is_the_reference_sft_setup():
    cfg = load_config(PRESET)
    assert cfg.diffusion.sft and cfg.diffusion.anneal_steps == 1 and cfg.diffusion.mask_token_id == 811
    assert cfg.data.seq_len == 256
    assert (cfg.data.options["sep_id"], cfg.data.options["pad_id"]) == (9166, 258)
    assert (cfg.optimizer.peak_lr, cfg.optimizer.schedule, cfg.optimizer.warmup_steps) == \
        (1e-4, "cosine", 2000)


def test_train_then_gsm8k(tiny_ckpt, tmp_path, capsys):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(dict(question=f"w{i} w{i + 1} w{i + 2}",
                                            answer=f"w{i + 3} #### {i}")) + "\n"
                            for i in range(8)))
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", f"model.checkpoint={tiny_ckpt}", "model.dtype=float32",
                 "model.remat=none", f"diffusion.mask_token_id={MASK}",
                 f"data.sources=[{{path: {data}}}]", f"data.tokenizer={tiny_ckpt}",
                 "data.seq_len=24", "data.global_batch=8", "data.options.sep_id=60",
                 f"data.options.pad_id={EOS}", "optimizer.warmup_steps=1", "train.steps=2",
                 "checkpoint.async=false"]
    assert main(["train", "--config", str(PRESET), *overrides]) == 0
    capsys.readouterr()
    assert main(["tasks", "--checkpoint", str(out / "final"), "--task", "gsm8k", "--data",
                 str(data), "--sep-id", "60", "--pad-id", str(EOS), "--seq-len", "24",
                 "--steps", "4", "--mesh", "none", "--progress", "off", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "gsm8k" and result["items"] == 8 and result["seq_len"] == 24
    assert 0.0 <= result["metrics"]["accuracy"]["value"] <= 100.0
