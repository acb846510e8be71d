"""Checkpoint integrity pieces in isolation: the array checksums (against a plain numpy
implementation of the same formula), the run-directory lock, rotation that keeps the newest
finite step."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffujax.train import checkpointing as C
from diffujax.checkpoint.integrity import checksums
from diffujax.runs.lock import LOCK_NAME, FileLock, RunLockError


def _numpy_checksum(x: np.ndarray) -> list[int]:
    """The documented formula, in numpy: words of the raw bits, position-weighted sums mod 2^32."""
    x = np.ascontiguousarray(x)
    size = x.dtype.itemsize
    view = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[size])
    w = view.reshape(-1).astype(np.uint64)
    i = np.arange(w.size, dtype=np.uint64)
    return [int(w.sum() % 2**32), int((w * (2 * i + 1)).sum() % 2**32)]


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def test_checksums_match_the_formula_on_any_sharding():
    rng = np.random.default_rng(0)
    host = {"w": rng.standard_normal((8, 6)).astype(np.float32),
            "h": rng.standard_normal((4, 8)).astype(ml_dtypes.bfloat16),
            "i": rng.integers(-5, 5, (3,)).astype(np.int32), "s": np.float32(2.5)}
    want = {k: _numpy_checksum(np.asarray(v)) for k, v in host.items()}
    assert checksums(host) == want  # host arrays (export)
    for shape, names, spec in (((8,), ("fsdp",), P("fsdp", None)),
                               ((2, 4), ("data", "fsdp"), P("fsdp", "data"))):
        mesh = _mesh(shape, names)
        sharded = dict(host, w=jax.device_put(host["w"], NamedSharding(mesh, spec)),
                       h=jax.device_put(host["h"], NamedSharding(mesh, P(None, names[-1]))))
        assert checksums(sharded) == want  # the same numbers whatever the layout


def test_checksums_see_one_flipped_bit_and_swapped_words():
    x = np.arange(64, dtype=np.float32)
    base = checksums({"x": x})["x"]
    flipped = x.copy()
    flipped.view(np.uint32)[37] ^= 1 << 11
    assert checksums({"x": flipped})["x"][0] != base[0]
    swapped = x.copy()
    swapped[[3, 40]] = swapped[[40, 3]]
    got = checksums({"x": swapped})["x"]
    assert got[0] == base[0] and got[1] != base[1]  # the plain sum cannot see it, the weighted can


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _State:
    w: jax.Array
    bad_steps: jax.Array


def test_rotation_never_removes_the_newest_finite_step(tmp_path):
    ckpt = C.TrainCheckpointer(tmp_path, save_every=1, keep_last=1)
    for step, bad in ((1, 0), (2, 0), (3, 1), (4, 2), (5, 3)):
        ckpt.save(step, _State(jnp.full((4,), float(step)), jnp.int32(bad)))
        ckpt.wait()
    assert ckpt.all_steps() == [2, 5]  # 2: the newest saved with a finite state
    ckpt.save(6, _State(jnp.zeros(4), jnp.int32(0)))
    ckpt.close()
    assert C.TrainCheckpointer(tmp_path).all_steps() == [6]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_run_lock(tmp_path):
    first = FileLock(tmp_path)
    first.acquire()
    owner = json.loads((tmp_path / LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(RunLockError, match=rf"in use by another diffujax train \(process"
                                           rf" {os.getpid()} on {socket.gethostname()}"):
        FileLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()

    # stale: its process is gone -> taken over, and said
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(),
                                                  "pid": _dead_pid(), "created": 0}))
    lock = FileLock(tmp_path)
    lock.acquire()
    assert lock.notes and "took over the run lock" in lock.notes[0]
    lock.release()

    # another machine's lock cannot be checked from here: refused, with what to do
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "created": 0}))
    with pytest.raises(RunLockError, match="if that machine's run has ended, delete the file"):
        FileLock(tmp_path).acquire()
