"""What ``eval`` and ``generate`` share: a converted checkpoint ready for inference, on one device
or laid out over the training mesh.

    model = load_for_inference(ckpt)                                # one device, no mesh
    model = load_for_inference(ckpt, layout=make_layout(section))   # over a mesh
    with model.active():                                            # the layout while tracing
        out = jitted(model.params, model.put_batch(rows))
    host = model.fetch(out)

With a mesh, each parameter is restored straight into the ``NamedSharding`` the logical rules give
it (no host ever holds the whole model), and batches are global arrays split over the batch axes
(``data`` x ``fsdp`` under the default rules) with a row count that is a multiple of
``batch_shards()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import ValidationError

from diffujax.checkpoint.store import load, read_meta
from diffujax.config import MeshSection, MeshShape, config_error
from diffujax.data.tokenizer import load_tokenizer
from diffujax.models import ModelConfig, apply_fn_for, cached_fn_for
from diffujax.parallel.mesh import (AXES, Layout, make_layout, maybe_initialize_distributed,
                                    to_host)


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    apply_fn: Callable  # apply_fn(params, tokens, pattern) -> logits
    params: Any
    tokenizer: Any
    layout: Layout | None = None  # the mesh and its logical rules; None: all on one device
    # cached_fn(params, tokens, pattern, cache, offset) -> (logits, cache): the decoders' pass
    # (one function object per model, so the jitted decoders compile once)
    cached_fn: Callable | None = None

    def __post_init__(self):
        if self.cached_fn is None:
            self.cached_fn = cached_fn_for(self.config)

    def mask_token_id(self) -> int:
        if self.config.mask_token_id is None:
            raise ValueError("the checkpoint has no mask token: convert it without --no-mask-token"
                             " (or with --mask-token-id N) to use the diffusion objective")
        return int(self.config.mask_token_id)

    def active(self):
        """Context for tracing and running compiled calls: the layout, so the models' activation
        constraints apply (nothing to do without a mesh)."""
        return contextlib.nullcontext() if self.layout is None else self.layout.active()

    def batch_shards(self) -> int:
        """How many ways a batch is split over devices: batch sizes must be multiples of it."""
        return 1 if self.layout is None else self.layout.batch_shards

    def put_batch(self, rows: np.ndarray) -> jax.Array:
        """``rows [B, ...]``, which every process holds whole, as one array split over the batch
        axes (each process contributes only its own block, so no data crosses hosts)."""
        if self.layout is None:
            return jnp.asarray(rows)
        if len(rows) % self.batch_shards():
            raise ValueError(f"{len(rows)} rows do not split evenly over"
                             f" {self.batch_shards()} batch shards")
        index, count = self.layout.data_shard()
        block = len(rows) // count
        local = np.asarray(rows)[index * block:(index + 1) * block]
        return self.layout.make_global_batch({"rows": local})["rows"]

    @staticmethod
    def fetch(x) -> np.ndarray:
        return to_host(x)


def pad_rows(rows: np.ndarray, multiple: int) -> np.ndarray:
    """``rows`` padded with copies of row 0 up to a multiple of ``multiple`` rows (the caller
    drops the padding from the results)."""
    pad = -len(rows) % multiple
    return np.concatenate([rows, np.repeat(rows[:1], pad, 0)]) if pad else rows


def load_for_inference(checkpoint: str, *, dtype: str | None = None,
                       layout: Layout | None = None) -> LoadedModel:
    """Load parameters, config and tokenizer of a diffujax checkpoint directory: on the first
    device, or with a ``layout`` each parameter read straight into its shards."""
    shardings = None
    if layout is not None:
        shardings = lambda path, spec: layout.sharding(spec.axes, spec.shape)  # noqa: E731
    config, params = load(checkpoint, dtype=dtype, shardings=shardings)
    tokenizer = load_tokenizer(checkpoint)
    tokenizer.check_model_vocab(config.vocab_size)
    return LoadedModel(config, apply_fn_for(config), params, tokenizer, layout)


# ----------------------------------------------------------------------- command-line options


class ArgumentError(ValueError):
    """A command-line value outside its valid range (the message names the option)."""


def require(ok: bool, option: str, value, valid: str) -> None:
    """``--option VALUE: must be VALID`` unless ``ok``."""
    if not ok:
        raise ArgumentError(f"{option} {value}: must be {valid}")


def require_at_least(args, **lows) -> None:
    """``require`` each named argument (``seq_len`` is ``--seq-len``) to be unset or >= its low."""
    for name, low in lows.items():
        value = getattr(args, name)
        require(value is None or value >= low, f"--{name.replace('_', '-')}", value, f">= {low}")


def checkpoint_config(args) -> ModelConfig:
    """The model config of ``--checkpoint`` (its config.json only: cheap, before any weight is
    read), so arguments can be checked against it."""
    return read_meta(args.checkpoint)[0]


def parse_mesh(text: str):
    """``--mesh`` -> ``"auto"``, ``None`` (no mesh) or a ``MeshShape``."""
    text = text.strip().lower()
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    sizes = [(axis.strip(), size) for axis, _, size in (i.partition("=") for i in text.split(","))]
    if len(dict(sizes)) < len(sizes):
        raise ValueError(f"--mesh {text!r}: an axis is given twice")
    try:
        return MeshShape(**dict.fromkeys(AXES, 1) | dict(sizes))  # axes left out: 1
    except ValidationError as e:
        raise ValueError(f"--mesh {text!r}: {config_error(e, MeshShape)}") from None


def layout_from_args(args):
    """The ``Layout`` of the ``--mesh`` / ``--distributed`` options, None for one device. Joins
    the multi-host job first, so call it before anything else touches a device."""
    shape = parse_mesh(args.mesh)
    distributed = {"auto": "auto", "true": True, "false": False}[args.distributed]
    maybe_initialize_distributed(MeshSection(distributed=distributed))
    if shape == "auto":
        if jax.device_count() == 1:
            return None
        shape = MeshSection().shape  # all devices on fsdp: parameters sharded like in training
    if shape is None:
        if jax.process_count() > 1:
            raise ValueError("--mesh none runs on one device, not across the hosts of a"
                             " multi-host job: give mesh axis sizes")
        return None
    return make_layout(MeshSection(shape=shape, distributed=distributed))


def load_from_args(args) -> LoadedModel:
    """The checkpoint of ``args`` (``--checkpoint``, ``--dtype``, mesh options) ready to run."""
    return load_for_inference(args.checkpoint, dtype=args.dtype, layout=layout_from_args(args))
