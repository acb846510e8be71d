"""``shard_map(check_vma=True)`` support for our ``pallas_call``s.

Under ``check_vma`` every ``pallas_call`` output must say over which manual mesh axes it varies.
The kernels' outputs vary wherever any input does; inputs that vary over fewer axes (the pattern
scalars, say) are cast to the union first so the kernel sees one uniform type. Outside
``shard_map`` (or with ``check_vma=False``) the union is empty and nothing changes.
"""

from __future__ import annotations

import jax
from jax.sharding import ManualAxisType


def _varying(x) -> frozenset:
    mat = getattr(jax.typeof(x), "mat", None)
    return frozenset(getattr(mat, "varying", ()) or ())


def unify(*xs):
    """``(axes, xs)``: the union of the inputs' varying axes and the inputs cast to it."""
    axes = frozenset().union(*(_varying(x) for x in xs if x is not None))
    if not axes:
        return axes, xs
    out = []
    for x in xs:
        missing = tuple(sorted(axes - _varying(x))) if x is not None else ()
        out.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
    return axes, tuple(out)


def sds(shape, dtype, axes: frozenset) -> jax.ShapeDtypeStruct:
    if not axes:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=ManualAxisType(varying=axes))
