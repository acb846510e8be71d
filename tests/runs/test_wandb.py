"""W&B beside TensorBoard and metrics.jsonl, in offline mode: the run directory W&B writes holds
exactly the values the run logged (read back with a plain reader of W&B's record log, not through
wandb), a resumed run continues the same W&B run, and bad settings are one config error.
Reference: the values passed to the logger, and metrics.jsonl written beside them."""

import json
import pathlib
import struct
import time

import pytest

from diffujax.config import ConfigError, load_config
from diffujax.runs.metrics import RunLogger, read_jsonl


TINY = str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def _wandb_records(path):
    """Protobuf records of a ``run-ID.wandb`` file: a 7-byte ``:W&B`` header, then a LevelDB-style
    log (32 KiB blocks; 7-byte chunk headers: crc, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _history(run_dir, timeout=30.0):
    """History rows (flat keys) once W&B's writer process has written the run's exit record."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_wandb_records(next(run_dir.glob("run-*.wandb"))))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, "W&B never finished writing the run"
        time.sleep(0.1)
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "wandb-dir" / "wandb"


@pytest.mark.integration  # W&B writes through its own service process
def test_offline_run_holds_the_logged_values(tmp_path, offline):
    out = tmp_path / "run"
    settings = {"project": "diffujax-test", "name": "tiny", "tags": ["ci"]}
    logger = RunLogger(out, total_steps=4, tensorboard=False, wandb=settings,
                       run_config={"train": {"steps": 4}})
    for step in (1, 2, 3):
        logger.train(step, {"loss": 5.0 / step, "lr": 1e-3 * step, "tokens_per_s": 100.0 + step})
    logger.eval(3, {"nelbo": 4.25, "ppl_bound": 70.1})
    logger.text(3, "samples", ["first sample", "second"])
    logger.close()

    (run_dir,) = offline.glob("offline-run-*")
    rows = _history(run_dir)
    train = [r for r in rows if "train/loss" in r]
    assert [(r["step"], r["train/loss"], r["train/lr"], r["perf/tokens_per_s"]) for r in train] == [
        (s, 5.0 / s, 1e-3 * s, 100.0 + s) for s in (1, 2, 3)]
    (ev,) = [r for r in rows if "eval/nelbo" in r]
    assert (ev["step"], ev["eval/nelbo"], ev["eval/ppl_bound"]) == (3, 4.25, 70.1)
    (sample,) = [r for r in rows if "samples/_type" in r]
    assert sample["step"] == 3 and sample["samples/_type"] == "table-file"
    table = json.loads((run_dir / "files" / sample["samples/path"]).read_text())
    assert table["data"] == [[3, 0, "first sample"], [3, 1, "second"]]
    # The same numbers as metrics.jsonl, written beside them.
    assert [r["loss"] for r in read_jsonl(out / "metrics.jsonl")] == [r["train/loss"]
                                                                       for r in train]
    run_id = json.loads((out / "wandb.json").read_text())["id"]
    assert run_dir.name.endswith(run_id)

    # A resumed run (same output_dir) logs into the same W&B run.
    again = RunLogger(out, total_steps=4, start_step=3, tensorboard=False,
                      wandb=settings)
    again.train(4, {"loss": 1.0})
    again.close()
    # (W&B names a second directory "...-ID-1" when both start within one second: read the ids
    # off the record logs, ``run-ID.wandb``.)
    logs = list(offline.glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and {p.stem.removeprefix("run-") for p in logs} == {run_id}


@pytest.mark.parametrize("override,error", [
    ("logging.wandb={name: x}", "logging.wandb.project: must be set"),
    ("logging.wandb={project: p, team: x}", "logging.wandb.team: unknown key"),
])
def test_bad_wandb_settings_are_one_config_error(override, error):
    with pytest.raises(ConfigError, match=error):
        load_config(TINY, [override])
    assert load_config(TINY, []).logging.wandb is None  # off by default
    assert load_config(TINY, ["logging.wandb={project: p}"]).logging.wandb == {"project": "p"}
