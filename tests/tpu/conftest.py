"""TPU compile tests without a TPU: libtpu's compiler on abstract topology descriptions.

``jax.experimental.topologies`` describes a TPU slice on a CPU-only host; programs lowered with
``ShapeDtypeStruct`` arguments carrying ``NamedSharding`` s over its devices compile with the real
TPU compiler (Mosaic kernels included) and can be inspected (``as_text``, ``memory_analysis``),
not run. Shared helpers live in ``tpu_testlib.py`` (put on the path here, as the suite runs with
``--import-mode=importlib``). libtpu's warnings about TPU_WORKER_HOSTNAMES / accelerator type are
harmless here.
"""

import os
import sys

import jax
import pytest

# Several test processes (or agents) may load libtpu at once: skip its single-process lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _no_persistent_cache_for_tpu_programs():
    """Compile-only TPU executables cannot be read back from the persistent cache (a compiler
    without a client cannot deserialize them: every read would warn), so none is written."""
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
