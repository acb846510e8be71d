"""Test session setup: 8 simulated CPU devices, a persistent compilation cache, a repo-local cache
for the embedded default model (so it is materialised once per machine, not per test)."""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("DIFFUJAX_CACHE", str(ROOT / ".cache" / "diffujax"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_compilation_cache_dir", str(ROOT / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gcs():
    """The GCS emulator (tests/gcs_emulator.py), started on first use, stopped at the end."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gcs_emulator", ROOT / "tests" / "gcs_emulator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    emulator = module.Emulator()
    yield emulator
    emulator.stop()
