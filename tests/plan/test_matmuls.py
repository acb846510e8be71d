"""``plan/matmuls.py``: matmul FLOPs read off a jaxpr, against counts by hand of small programs
(2 x output elements x contracted size per matmul; scan bodies times their length; a cond's
dearest branch)."""

import jax
import jax.numpy as jnp

from diffujax.plan.matmuls import matmul_flops


def test_batched_einsum_counts_its_contracted_axes():
    a, b = jnp.ones((3, 5, 7, 2)), jnp.ones((3, 7, 2, 4))
    jaxpr = jax.make_jaxpr(lambda a, b: jnp.einsum("bqkd,bkde->bqe", a, b))(a, b)
    assert matmul_flops(jaxpr) == 2 * (3 * 5 * 4) * (7 * 2)


def test_scan_nested_jit_and_cond():
    def body(carry, w):
        h = jax.jit(lambda c, w: c @ w)(carry, w)  # [6, 4] @ [4, 4] per step
        return jax.lax.cond(h.sum() > 0, lambda h: h @ jnp.ones((4, 4)) @ jnp.ones((4, 4)),
                            lambda h: h, h), None

    def program(x, ws):
        return jax.lax.scan(body, x, ws)[0] @ jnp.ones((4, 9))

    jaxpr = jax.make_jaxpr(program)(jnp.ones((6, 4)), jnp.ones((5, 4, 4)))
    per_step = 2 * 6 * 4 * 4 + 2 * (2 * 6 * 4 * 4)  # the jitted matmul, the dearer branch's two
    assert matmul_flops(jaxpr) == 5 * per_step + 2 * 6 * 9 * 4
