"""The matmul FLOPs of a traced program, read off its jaxpr (not a formula of the model).

Every ``dot_general`` costs ``2 x`` (its output's elements) ``x`` (the product of its contracted
dimensions); a ``scan`` body runs ``length`` times; other nested jaxprs (``jit``, remat, custom
derivatives) run once, and of a ``cond``'s branches the dearest is counted. The count is of the
whole (global, unsharded) program; a ``while`` body, whose trips depend on data, counts once.
"""

from __future__ import annotations

import math

from jax.extend import core


def matmul_flops(jaxpr) -> int:
    """FLOPs of the ``dot_general`` s of ``jaxpr`` (a ``Jaxpr`` or ``ClosedJaxpr``)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in contract)
        elif name == "cond":
            total += max(matmul_flops(branch) for branch in eqn.params["branches"])
        else:
            inner = sum(map(matmul_flops, core.jaxprs_in_params(eqn.params)))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total

