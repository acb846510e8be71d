"""``model.scan_layers: false`` (``layers.unrolled_layers``): the layers as a Python loop over
their split weights in place of ``lax.scan``.

- the scanned model is the reference: the unrolled one gives its logits and the gradient of the
  diffusion train loss, to float32 rounding, for tiny LLaMA (GQA, RoPE) and GPT-2 (with its
  training dropout, whose per-layer keys must reach the same layers), with no remat and under
  ``dots`` (each layer's recompute);
- it is unrolled: the traced program has no ``scan`` (the scanned one has);
- the run config's ``model.scan_layers`` reaches the model config (unset: the model's default,
  scanned).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffujax.attention import annealed
from diffujax.config import load_config
from diffujax.models import init_params

from tiny_families import CONFIGS as TINY, forward_and_loss

# three layers: the loop's middle layer has neighbours on both sides
CONFIGS = {name: c.replace(num_layers=3) for name, c in TINY.items()}


def _logits_and_loss(family: str, scan: bool, remat: str):
    """``(apply, loss)``: the model's forward on fixed tokens and the diffusion train loss (GPT-2
    with its dropout) under a half-annealed pattern, as functions of the weights."""
    return forward_and_loss(CONFIGS[family].replace(scan_layers=scan, remat=remat),
                            annealed(jnp.int32(7), jnp.int32(3), jnp.float32(0.5)))


@pytest.mark.parametrize("remat", ["none", "dots"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_unrolled_layers_give_the_scans_logits_and_gradient(family, remat):
    params = init_params(CONFIGS[family], seed=0)
    (apply_scan, loss_scan), (apply_unrolled, loss_unrolled) = (
        _logits_and_loss(family, scan, remat) for scan in (True, False))
    np.testing.assert_allclose(jax.jit(apply_unrolled)(params), jax.jit(apply_scan)(params),
                               rtol=1e-5, atol=1e-5)
    expected = jax.tree.leaves(jax.jit(jax.grad(loss_scan))(params))
    got = jax.tree.leaves(jax.jit(jax.grad(loss_unrolled))(params))
    scale = max(float(np.max(np.abs(e))) for e in expected)
    assert scale > 0
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        # float32 rounding of the largest entry (GPT-2's key bias: zero up to rounding)
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6 * scale)


def test_the_unrolled_program_has_no_scan():
    params = init_params(CONFIGS["gpt2"], seed=0)
    for scan in (True, False):
        _, loss = _logits_and_loss("gpt2", scan, "none")
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        assert ("scan[" in jaxpr) == scan, scan


def test_the_run_config_sets_scan_layers():
    cfg = load_config("configs/tiny.yaml", ["model.scan_layers=false"])
    assert cfg.model.scan_layers is False
    assert cfg.resolve_model_config().scan_layers is False
    assert load_config("configs/tiny.yaml").resolve_model_config().scan_layers is True
