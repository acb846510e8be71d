"""Silent damage for the fault tests: one flipped byte that orbax reads without complaint, and
orbax's own reading of a checkpoint (the judge, and the tests' reference)."""

from __future__ import annotations

import pathlib
from typing import Callable

import numpy as np
import orbax.checkpoint as ocp
from jax import tree_util


def orbax_read(path) -> dict:
    """The pytree saved at ``path`` as orbax reads it with no target: host arrays in the
    stored layout."""
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        meta = checkpointer.metadata(path).item_metadata.tree
        args = tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    finally:
        checkpointer.close()


def flip_byte(path: pathlib.Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def flip_a_byte_orbax_misses(files, read: Callable[[], list]) -> pathlib.Path:
    """Flip one byte of ``files`` (an orbax checkpoint's data files) such that ``read()`` (orbax
    reading the arrays) still succeeds but returns other values. Which byte does that depends on
    where the compressed chunks fell, so candidates are tried, orbax itself the judge."""
    clean = read()
    for path in sorted(files, key=lambda p: -p.stat().st_size):  # largest (arrays) first
        size = path.stat().st_size
        for offset in sorted({size * k // 16 for k in range(4, 13)}):
            flip_byte(path, offset)
            try:
                if any(not np.array_equal(a, b) for a, b in zip(clean, read(), strict=True)):
                    return path
            except Exception:  # noqa: BLE001 - orbax noticed: not the damage wanted here
                pass
            flip_byte(path, offset)  # undo
    raise AssertionError("no byte changes the arrays unnoticed by orbax")
