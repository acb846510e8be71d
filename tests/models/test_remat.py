"""Rematerialisation policies of the scanned layers (``layers.REMAT_POLICIES``).

- every policy gives the gradient of the diffusion train loss that ``none`` (no remat) gives, to
  float32 rounding: tiny LLaMA (GQA) and GPT-2 (with training dropout, whose masks the
  recompute must redraw identically), on the CPU default (``xla``) and on the Pallas TPU kernel
  in interpret mode, where the names live in the kernel's ``custom_vjp`` forward rule;
- on that kernel the policy does what it claims, seen in the compiled program: the forward kernel
  (interpret mode lowers it to a loop named after it) runs once under ``none`` and
  ``dots_with_attention``, twice under ``dots`` and ``full`` (recomputed in the backward pass);
  the backward kernels run once under each. ``tests/plan/test_remat_compile.py`` checks the same
  on the real TPU compiler for both TPU kernels;
- an unknown policy is refused by name.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffujax.attention import AttentionConfig, annealed, full
from diffujax.models import init_params
from diffujax.models.layers import REMAT_POLICIES, scan_layers

from tiny_families import CONFIGS, forward_and_loss

BACKENDS = {"xla": AttentionConfig(backend="xla"),
            "pallas_tpu": AttentionConfig(backend="pallas_tpu", interpret=True)}
# Half the CPU compile time of the interpret-mode kernels; XLA's own passes (dead code removed)
# still run.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CASES = [("llama", "xla"), ("gpt2", "xla"), ("llama", "pallas_tpu")]


def _compiled_gradient(family: str, backend: str, remat: str):
    """The jitted gradient of the diffusion loss (the train step's; GPT-2 with its dropout),
    compiled, with its inputs: under a half-annealed pattern, or full attention on the kernel
    (whose interpret-mode hash compiles slowly on CPU)."""
    config = CONFIGS[family].replace(attention=BACKENDS[backend], remat=remat)
    params = init_params(config, seed=0)
    pattern = (full() if backend == "pallas_tpu"
               else annealed(jnp.int32(7), jnp.int32(3), jnp.float32(0.5)))
    _, loss = forward_and_loss(config, pattern)
    return jax.jit(jax.grad(loss)).lower(params).compile(FAST_COMPILE), params


@pytest.mark.parametrize("family,backend", CASES, ids=[f"{f}-{b}" for f, b in CASES])
def test_every_policy_gives_the_gradient_of_none(family, backend):
    expected = None
    for remat in REMAT_POLICIES:  # "none" first
        compiled, params = _compiled_gradient(family, backend, remat)
        got = jax.tree.leaves(compiled(params))
        if expected is None:
            expected, scale = got, max(float(np.max(np.abs(e))) for e in got)
        # float32 rounding of the largest entry: a weight whose gradient is zero in exact
        # arithmetic (GPT-2's key bias, under the softmax) holds rounding noise only
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6 * scale, err_msg=remat)
        if backend == "pallas_tpu":
            assert _kernel_runs(compiled.as_text()) == {
                "fwd": 2 if remat in ("dots", "full") else 1, "dq": 1, "dkv": 1}, remat


def _kernel_runs(hlo: str) -> dict:
    """Loops of the interpret-mode flash kernels in a compiled CPU program, by kernel."""
    loops = re.findall(r'= .* while\(.*op_name="[^"]*/diffujax_flash_(\w+)/while"', hlo)
    return {kind: loops.count(kind) for kind in ("fwd", "dq", "dkv")}


def test_an_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match=r"remat policy 'dots_attention' is not one of \('none',"
                                         r" 'dots_with_attention', 'dots', 'full'\)"):
        scan_layers(None, None, jnp.zeros(2), remat="dots_attention")
