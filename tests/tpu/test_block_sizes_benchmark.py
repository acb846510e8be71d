"""benchmarks/tpu_block_sizes.py runs (the smoke run of the one benchmark that compiles for TPU
chips; the others are in tests/test_benchmarks.py): at a short length every kernel compiles with
the larger of two candidates, which becomes the pick."""

import pathlib
import runpy

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "tpu_block_sizes.py"


def test_block_size_search_runs():
    main = runpy.run_path(str(SCRIPT))["main"]
    [result] = main(["--chips", "v5e", "--dims", "64", "--candidates", "256x256,128x128",
                     "--lengths", "256"])  # a chip this libtpu cannot describe gives []
    assert [(r["kernel"], r["block_q"], r["fits"]) for r in result["rows"]] == [
        ("fwd", 256, True), ("dq", 256, True), ("dkv", 256, True)]
    assert result["forward"] == result["backward"] == (256, 256)
