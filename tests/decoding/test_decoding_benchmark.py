"""Smoke run of benchmarks/decoding.py at its tiny size: every decoder runs, the pass counts are
what the decoders promise, and the cached block decoder commits the same tokens as the
full-recompute sampler it replaces (the same rule under the same block mask)."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_tiny_decoding_benchmark(capsys):
    spec = importlib.util.spec_from_file_location("decoding_bench",
                                                  ROOT / "benchmarks" / "decoding.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tiny", "--batch-sizes", "2", "--steps-per-block", "2", "--json"])
    rows = {r["decoder"]: r for r in json.loads(capsys.readouterr().out.splitlines()[-1])}
    assert set(rows) == {"full recompute", "cached confidence", "cached threshold", "AR + KV cache"}
    # 16 new tokens after a prompt of 8 in blocks of 4: 4 blocks of 2 passes each; the cached
    # decoder adds a prefill pass and 3 commit passes; AR: a prefill, then one pass per token
    assert rows["full recompute"]["forward_passes"] == 8
    assert rows["cached confidence"]["forward_passes"] == 1 + 8 + 3
    assert rows["AR + KV cache"]["forward_passes"] == 16
    assert rows["cached confidence"]["same_tokens"] is True
    assert all(r["tokens_per_second"] > 0 for r in rows.values())
