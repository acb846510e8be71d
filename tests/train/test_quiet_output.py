"""What a tiny run prints when nothing is wrong: no warning a user cannot act on (empty
``__init__.py`` files skipped, documents split by ordinary packing), no absl line on resume, no
line twice, one format (the run's own lines; log records read the same), no libtpu error. The
resume also lists the learning-rate schedule that the longer ``train.steps`` redraws."""

import re

import pytest
from train_runs import NO_SAMPLES, run

NOISE = re.compile(r"warning|Metadata file|E0000|INVALID_ARGUMENT|Traceback"
                   r"|^\d\d:\d\d:\d\d |^(INFO|WARNING|ERROR):", re.IGNORECASE)


def _check_quiet(out: str) -> list[str]:
    lines = [line for line in out.splitlines() if line.strip()]
    assert [line for line in lines if NOISE.search(line)] == [], out
    assert len(set(lines)) == len(lines), f"a line printed twice:\n{out}"
    return lines


@pytest.mark.integration
def test_a_tiny_run_and_its_resume_print_no_noise(corpus, tmp_path):
    common = ["logging.eval_every=4", NO_SAMPLES, "checkpoint.every_steps=2"]
    first = _check_quiet(run(tmp_path, corpus, "train.steps=4", *common))
    # The corpus holds empty __init__.py files and documents longer than a block: said once, in
    # the run's report of its sources.
    assert sum("skipped" in line and "empty files" in line for line in first) == 1
    resumed = _check_quiet(run(tmp_path, corpus, "train.steps=6", *common))
    assert any(line.startswith("resumed from") for line in resumed)
    (changes,) = [line for line in resumed if line.startswith("config changes applied")]
    assert "train.steps: 4 -> 6" in changes and "learning-rate schedule redrawn" in changes
