"""Test session setup: 8 simulated CPU devices, a persistent compilation cache, a repo-local cache
for the embedded default model (so it is materialised once per machine, not per test), and the
``integration`` mark on every test that uses a fixture which starts processes.

Both caches may be shared by concurrent test processes (``pytest -n``): the model is
materialised into a temporary directory renamed into place, a process that loses the race uses
the winner's (``checkpoint/smollm2.py``); a compilation-cache entry read while another process
writes it fails to deserialize, and JAX then warns and compiles instead."""

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

# Fixtures that start processes: the GCS emulator (below) and tests/train's reference run of
# ``diffujax train`` (tests/train/conftest.py, and test_remote_run.py's in the bucket).
PROCESS_FIXTURES = {"gcs", "reference"}


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by mark
def pytest_collection_modifyitems(items):
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


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
