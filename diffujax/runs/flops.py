"""FLOP and MFU arithmetic: pure functions of a model config and a device kind, shared by the
training logs (``metrics``), the run planner and the benchmarks (no writer, no logging backend).

- ``train_flops_per_token(config, seq_len)``: model FLOPs of one training token (forward and
  backward): ``6 * N`` for the matmul parameters ``N`` (attention and MLP projections and the
  output head; embedding look-ups, norms and biases are not matmuls) plus attention scores and
  values, counted over the FULL ``L x L`` square because a diffusion LM attends bidirectionally
  (MaxText halves them for causal models; we must not). Rematerialisation is not counted: this is
  MFU, not hardware FLOPs utilisation.
- ``peak_flops_per_device()``: dense bf16 peak of the accelerator, or None (CPU, unknown) so that
  MFU is reported as ``n/a`` rather than a made-up number.
"""

from __future__ import annotations

import jax

from diffujax.models import ModelConfig, matmul_params


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs of q.k^T and p.v for one token: 2 matmuls x 2 FLOPs x L keys x H x D per layer
    forward, times 3 for forward + backward; full bidirectional (not halved)."""
    return 3.0 * 4.0 * config.num_layers * seq_len * config.num_heads * config.head_dim


def train_flops_per_token(config: ModelConfig, seq_len: int,
                          adapter_params: int | None = None) -> float:
    """``6 N`` + attention; with LoRA (``adapter_params``: the adapters' parameter count) the
    frozen weights take no weight gradient, so ``4 N`` (forward and the activations' gradient)
    plus ``6`` per adapter parameter."""
    if adapter_params is None:
        return 6.0 * matmul_params(config) + attention_flops_per_token(config, seq_len)
    return (4.0 * matmul_params(config) + 6.0 * adapter_params
            + attention_flops_per_token(config, seq_len))


# Dense bf16 peak FLOP/s per device (per chip for TPUs), from the vendors' spec sheets. Matched
# against ``jax.Device.device_kind``; the longest matching key wins ("TPU v5 lite" before "TPU v5").
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5"
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM / HBM3
    "H200": 989e12,
}


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
    """Peak FLOP/s of one device, None when unknown (CPU, unlisted accelerators)."""
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    kind = device_kind.lower()
    matches = [k for k in PEAK_FLOPS if k.lower() in kind]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def mfu(flops_per_s: float, num_devices: int, peak_per_device: float | None) -> float | None:
    if not peak_per_device or num_devices <= 0:
        return None
    return flops_per_s / (num_devices * peak_per_device)
