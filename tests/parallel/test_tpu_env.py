"""libtpu on a machine without a TPU: an ordinary command prints no ``E0000 ... INVALID_ARGUMENT``
error (libtpu's complaint that it cannot tell what this machine is), while a TPU VM's environment
is left alone and the deviceless TPU compiler still works."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffujax.parallel import tpu_env

ROOT = Path(__file__).resolve().parents[2]
NEEDS_LIBTPU = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None or
                                  tpu_env.tpu_attached(), reason="needs libtpu and no TPU")


def test_defaults_only_where_no_tpu_and_never_over_the_users():
    env = {"TPU_WORKER_ID": "3"}
    assert tpu_env.quiet_libtpu_without_tpu(env, attached=False) == [
        "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES"]
    assert env == {"TPU_WORKER_ID": "3", "TPU_ACCELERATOR_TYPE": "v5p-8",
                   "TPU_WORKER_HOSTNAMES": "localhost"}
    on_a_tpu_vm = {}
    assert tpu_env.quiet_libtpu_without_tpu(on_a_tpu_vm, attached=True) == []
    assert on_a_tpu_vm == {}


def _fresh_env() -> dict:
    """This environment as a new user's shell has it: no TPU variables, errors not filtered out,
    and libtpu's one-process lock skipped (another process here may hold it: then libtpu stops
    before the point where a fresh machine prints the error)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TPU_") and k not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS")}
    return dict(env, PYTHONPATH=str(ROOT), ALLOW_MULTIPLE_LIBTPU_LOAD="1")


def _tiny_checkpoint(root: Path) -> Path:
    from diffujax.checkpoint import save
    from diffujax.models import LlamaConfig, init_params

    config = LlamaConfig(vocab_size=264, hidden_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, intermediate_size=64, max_positions=64,
                         bos_token_id=256, eos_token_id=256, mask_token_id=258)
    save(root / "ckpt", config, init_params(config, seed=0),
         tokenizer_from=ROOT / "configs" / "tokenizers" / "bytes")
    return root / "ckpt"


@pytest.mark.integration
@NEEDS_LIBTPU
def test_an_ordinary_command_prints_no_libtpu_error(tmp_path):
    # The bare start-up mostly waits (libtpu looks for TPU workers): it runs beside the command.
    text = tmp_path / "text.txt"
    text.write_text("a few words of text to score, long enough for one block\n")
    checkpoint = _tiny_checkpoint(tmp_path)
    bare = subprocess.Popen([sys.executable, "-c", "import jax; jax.devices()"], env=_fresh_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = subprocess.run([sys.executable, "-m", "diffujax.cli", "eval", "--checkpoint",
                          str(checkpoint), "--text", str(text), "--objective",
                          "ar", "--seq-len", "16", "--blocks", "1"],
                         env=_fresh_env(), capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    _, bare_err = bare.communicate(timeout=300)
    if "E0000" not in bare_err:
        pytest.skip("this libtpu prints no error without a TPU: nothing to quiet")
    assert run.returncode == 0, run.stderr
    assert "perplexity" in run.stdout
    noise = [line for line in run.stderr.splitlines()
             if line.startswith("E0000") or "INVALID_ARGUMENT" in line or "TPU_" in line]
    assert noise == [], run.stderr


@pytest.mark.integration
@NEEDS_LIBTPU
def test_the_deviceless_tpu_compiler_still_works_after_the_defaults():
    """The CLI's defaults in place first, then a TPU program compiled for a v5e slice."""
    script = """
from diffujax.parallel.tpu_env import quiet_libtpu_without_tpu
quiet_libtpu_without_tpu()
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from diffujax.parallel.topology import parse_slice, slice_devices
devices = slice_devices(parse_slice("v5litepod-4"))
mesh = Mesh(devices, ("x",))
arg = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=NamedSharding(mesh, P("x")))
compiled = jax.jit(lambda a: (a * 2).sum()).lower(arg).compile()
print(len(devices), devices[0].platform, "all-reduce" in compiled.as_text())
print({d.platform for d in jax.devices()})
"""
    run = subprocess.run([sys.executable, "-c", script], env=_fresh_env(), capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["4 tpu True", "{'cpu'}"], run.stdout  # runs on the CPU
    assert not any(line.startswith("E0000") for line in run.stderr.splitlines()), run.stderr


def test_collective_flags_join_the_users_and_never_replace_them():
    env = {"LIBTPU_INIT_ARGS": "--xla_enable_async_all_gather=false --xla_other=1"}
    flags = tpu_env.set_collective_flags("v5p", env)
    assert flags[:2] == ["--xla_enable_async_all_gather=false", "--xla_other=1"]  # the user's
    assert flags[2:] == [f for f in tpu_env.ASYNC_COLLECTIVE_FLAGS
                         if not f.startswith("--xla_enable_async_all_gather=")]
    assert env["LIBTPU_INIT_ARGS"] == " ".join(flags)
    assert tpu_env.set_collective_flags("v5p", env) == flags  # idempotent
    assert tpu_env.set_collective_flags("v9", {}) == []  # an unknown generation sets nothing


def test_train_sets_the_flags_of_its_tpu_generation_and_logs_them(monkeypatch, caplog):
    from types import SimpleNamespace

    from diffujax.commands import train

    cfg = SimpleNamespace(plan=SimpleNamespace(topology="v5litepod-8"))
    monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
    monkeypatch.setattr(tpu_env, "tpu_attached", lambda: False)
    train._async_collectives(cfg)  # no TPU here: libtpu's flags are not this run's business
    assert "LIBTPU_INIT_ARGS" not in os.environ
    monkeypatch.setattr(tpu_env, "tpu_attached", lambda: True)
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-128")  # the VM's type wins over the config
    with caplog.at_level("INFO", logger="diffujax.commands.train"):
        train._async_collectives(cfg)
    assert os.environ["LIBTPU_INIT_ARGS"].split() == list(tpu_env.COLLECTIVE_FLAGS["v5p"])
    assert "libtpu flags (v5p)" in caplog.text
