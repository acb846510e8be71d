"""JAX's bundled splash attention (Pallas TPU) behind the diffujax attention contract.

When to prefer it (an expectation, not a measurement: docs/kernels.md):

- ``causal`` / ``full``, with or without segment ids: splash is Google's tuned production kernel
  (static block-sparsity tables, fused variants); it is the default of ``backend="auto"`` on TPU
  for these kinds.
- block diffusion (``block_size`` / ``stream_len``, docs/algorithms.md §9), causal/full inside
  the blocks: ``BlockMask``, a mask splash computes in-kernel (``is_open`` on the tile), its
  block tables (closed tiles skipped, open ones unmasked) built on the host from the same rule;
  no mask block is stored. ``auto`` picks splash for these as for plain causal/full.
- ``annealed`` (inside blocks too): splash has no in-kernel hash, so the pattern goes in as a
  dense ``[1, L, L]`` boolean mask shared by every head (``dense_annealed=True``). That reads
  about ``L^2`` mask bytes per head and pass and cannot skip future blocks while the ratio is
  above 0; the in-kernel-hash kernel (``diffujax.attention.tpu``) avoids both, so ``auto`` sends
  annealed patterns there.

Its forward tags the output and log-sum-exp it keeps for the backward with one name,
``residuals.SPLASH``, so that a remat policy can save them (``models.layers.REMAT_POLICIES``).

Contract differences handled here: splash takes no softmax scale (q is pre-scaled, in f32 then
cast back to q's dtype), works per example on ``[H, L, D]`` (vmapped over the batch), and needs
the length to be a multiple of its blocks, which are multiples of 128. Inside ``shard_map`` it
needs ``check_vma=False`` (its mask tables are unvarying constants next to varying q/k/v).

Under a mesh (``diffujax.attention.attention``), the causal/full kernel (blocks included) is built
once for all heads with its block tables split into the head shards
(``make_splash_mha(head_shards=...)``) and handed to ``shard_map`` with the kernel's own
``manual_sharding_spec``, so each device runs its heads with its part of the tables; the annealed
dense mask is built per device inside the map.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import NamedSharding, PartitionSpec as P

from diffujax.attention import residuals
from diffujax.attention.pattern import AttentionPattern, dense_mask, is_open
from diffujax.attention.tiles import TileRule

DEFAULT_BLOCK = 512


def _blocks(seq_len: int, block: int) -> sa.BlockSizes:
    if seq_len % 128:
        raise ValueError(f"splash attention needs a length that is a multiple of 128, got "
                         f"{seq_len}; use backend='pallas_tpu' (pads internally) instead")
    b = block
    while seq_len % b:  # largest multiple of 128 <= block dividing the length
        b -= 128
    return sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                         block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


@functools.cache
def _host_thread() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="splash_mask")


def _on_host(fn):
    """``fn()`` evaluated eagerly on the default backend, outside the caller's trace and mesh:
    splash builds its tables while a jit is traced, possibly for an abstract TPU mesh on which
    nothing can run; both contexts are thread-local, so another thread has neither."""
    return _host_thread().submit(fn).result()


class BlockMask(sa.Mask):
    """A static blocked pattern (kind causal / full, ``block_size`` > 0, one or two streams) as a
    splash mask that the kernel computes (``pattern.is_open`` on the tile's indices: splash
    evaluates ``mask_function`` in-kernel for any mask carrying it and ``q_sequence``), so no
    mask block is stored. Splash reads the mask on the host, tile by tile, to build its block
    tables from the same rule (``_on_host``)."""

    def __init__(self, pattern: AttentionPattern, seq_len: int):
        if pattern.kind == "annealed" or not pattern.blocked:
            raise ValueError(f"BlockMask takes blocked causal/full patterns, got {pattern}")
        self.pattern = AttentionPattern(pattern.kind, block_size=pattern.block_size,
                                        stream_len=pattern.stream_len)
        self._shape = (seq_len, seq_len)
        self.q_sequence = np.arange(seq_len, dtype=np.int32)

    def mask_function(self, q_idx, k_idx):
        return is_open(self.pattern, q_idx, k_idx)

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def __getitem__(self, idx) -> np.ndarray:
        q_slice, k_slice = (slice(*s.indices(n)) for s, n in zip(idx, self._shape))
        q_idx = self.q_sequence[q_slice][:, None]
        k_idx = np.arange(k_slice.start, k_slice.stop, dtype=np.int32)[None]
        return _on_host(lambda: np.asarray(self.mask_function(q_idx, k_idx)))

    def _key(self):
        return (self.pattern.kind, self.pattern.block_size, self.pattern.stream_len, self._shape)

    def __eq__(self, other):
        return isinstance(other, BlockMask) and self._key() == other._key()

    def __hash__(self):
        return hash((BlockMask, self._key()))


def static_mask(pattern: AttentionPattern, seq_len: int) -> sa.Mask:
    """The splash mask of a pattern without a hash (kind causal / full, in blocks or not)."""
    if pattern.kind == "annealed":
        raise ValueError("an annealed pattern has no static splash mask")
    if pattern.blocked:
        return BlockMask(pattern, seq_len)
    shape = (seq_len, seq_len)
    return sa.CausalMask(shape) if pattern.kind == "causal" else sa.FullMask(shape)


@functools.lru_cache(maxsize=32)
def static_kernel(kind: str, seq_len: int, heads: int, block: int, interpret: bool,
                  head_shards: int = 1, block_size: int = 0,
                  stream_len: int = 0) -> sa.SplashAttentionKernel:
    """The kernel of a causal/full pattern (``block_size`` / ``stream_len``: its blocks) for
    ``heads`` query heads (all of them, not one shard's), its block tables split into
    ``head_shards`` (the shards of a ``shard_map`` over heads: pass the kernel in with
    ``kernel.manual_sharding_spec``)."""
    mask = static_mask(AttentionPattern(kind, block_size=block_size, stream_len=stream_len),
                       seq_len)
    return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=_blocks(seq_len, block),
                              head_shards=head_shards, q_seq_shards=1, interpret=bool(interpret),
                              residual_checkpoint_name=residuals.SPLASH)


def _dynamic_kernel(mask, block_sizes, interpret):
    # A mask computed on the device (per shard inside shard_map): the one-device form is the
    # right one here, the [1, L, L] mask being the local (and global) mask of every head.
    kernel = sa.make_splash_mha_single_device(mask, block_sizes=block_sizes, interpret=interpret,
                                              residual_checkpoint_name=residuals.SPLASH)
    # Built under jit, the ``is_dynamic_mask`` flag of the mask tables becomes a traced bool
    # (a pytree leaf passed through jnp.array) which splash then tests in Python: restore it.
    fix = lambda info: None if info is None else info._replace(is_dynamic_mask=True)
    kernel.fwd_mask_info = fix(kernel.fwd_mask_info)
    kernel.dq_mask_info = fix(kernel.dq_mask_info)
    kernel.dkv_mask_info = fix(kernel.dkv_mask_info)
    return kernel


def apply_kernel(q, k, v, pattern: AttentionPattern, kernel=None, *, block: int = DEFAULT_BLOCK,
                 interpret: bool = False):
    """q ``[B, L, H, D]``, k/v ``[B, L, KVH, D]`` -> ``[B, L, H, D]`` on one device's operands.
    ``kernel``: a ``static_kernel`` (causal/full), or ``None`` for the annealed pattern (dense
    mask built here)."""
    seq_len, d = q.shape[1], q.shape[3]
    if kernel is None:
        plain = dataclasses.replace(pattern, segment_ids=None)  # segments go in as SegmentIds
        kernel = _dynamic_kernel(dense_mask(plain, seq_len)[None], _blocks(seq_len, block),
                                 interpret)
    qs = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype)
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (qs, k, v))  # [B, heads, L, D]
    if pattern.segment_ids is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        seg = jnp.asarray(pattern.segment_ids, jnp.int32)
        out = jax.vmap(lambda a, b_, c, s: kernel(a, b_, c, segment_ids=sa.SegmentIds(s, s)))(
            qh, kh, vh, seg)
    return jnp.swapaxes(out, 1, 2)


def splash_attention(q, k, v, pattern: AttentionPattern, *, block: int = DEFAULT_BLOCK,
                     dense_annealed: bool = False, interpret: bool = False, layout=None):
    """q ``[B, L, H, D]``, k/v ``[B, L, KVH, D]`` -> ``[B, L, H, D]`` via splash attention, on
    one device, or under ``shard_map`` with a ``sharded.KernelLayout`` (what
    ``diffujax.attention.attention`` passes on a mesh)."""
    if k.shape[1] != q.shape[1]:
        raise ValueError("splash_attention here is self-attention only")
    if pattern.kind == "annealed" and not dense_annealed:
        raise ValueError("splash has no in-kernel annealed pattern; pass dense_annealed=True "
                         "to feed it a dense [1, L, L] mask, or use backend='pallas_tpu'")
    _blocks(q.shape[1], 128)  # the length check, before any kernel is built
    TileRule(pattern.kind, pattern.block_size, pattern.stream_len, q.shape[1])  # two streams
    local = functools.partial(apply_kernel, block=block, interpret=interpret)
    if pattern.kind == "annealed":  # dense mask, built per device from the replicated scalars
        return local(q, k, v, pattern) if layout is None else layout.run(local, q, k, v, pattern)
    shards = 1 if layout is None else layout.head_shards
    kernel = static_kernel(pattern.kind, q.shape[1], q.shape[2], block, interpret, shards,
                           block_size=pattern.block_size, stream_len=pattern.stream_len)
    if layout is None:
        return local(q, k, v, pattern, kernel)
    spec = kernel.manual_sharding_spec(NamedSharding(layout.mesh, P(layout.heads or None, None)))
    return layout.run(local, q, k, v, pattern, extra=(kernel,), extra_specs=(spec,))
