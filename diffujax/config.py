"""The run configuration: one validated dataclass tree, from YAML plus ``key=value`` overrides.

    cfg = load_config("configs/diffugpt_s.yaml", ["optimizer.peak_lr=1e-4", "mesh.shape.fsdp=8"])
    print(to_yaml(cfg))

Dotted keys reach nested fields; values are parsed as YAML scalars (``3e-4`` is accepted for a float
although YAML 1.1 reads it as a string). An unknown key or a value of the wrong type is a
``ConfigError`` that names the key, with a suggestion for near misses.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal, Mapping, Union

import yaml

from diffujax import paths
from diffujax.attention.config import AttentionConfig
from diffujax.checkpoint.smollm2 import default_model
from diffujax.data.pipeline import PipelineOptions
from diffujax.data.sources import FORMATS
from diffujax.diffusion.blocks import effective_block_size
from diffujax.models import FAMILIES, ModelConfig, lora, weight_axes
from diffujax.parallel.logical import ACTIVATIONS, DEFAULT_RULES, check_collisions
from diffujax.parallel.topology import parse_slice
from diffujax.plain import to_plain


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the offending key."""


MASK_TOKEN_KEY = "diffusion.mask_token_id"  # the run config's name for the mask token


# --------------------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """``model.lora``: train low-rank adapters on the block's projections instead of every weight
    (``models/lora.py``); the base weights stay frozen."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()  # projection names (q_proj, ..., down_proj); empty: all of them
    dropout: float = 0.0

    def validate(self, key: str):
        _check(self.rank >= 1, f"{key}.rank", f"{self.rank} must be >= 1")
        _check(self.alpha > 0, f"{key}.alpha", f"{self.alpha} must be > 0")
        _check(0 <= self.dropout < 1, f"{key}.dropout", f"{self.dropout} must be in [0, 1)")

    def spec(self, model: ModelConfig) -> lora.LoraSpec:
        """The adapters for ``model``: every projection of its block unless ``targets``."""
        targets = self.targets or tuple(lora.projections(model))
        return lora.LoraSpec(rank=self.rank, alpha=self.alpha, targets=targets,
                             dropout=self.dropout)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Either ``checkpoint`` (a diffujax checkpoint dir) or ``init`` (``family`` plus model-config
    fields, for a randomly initialised model); the other fields override the model config."""

    checkpoint: str | None = None
    init: dict[str, Any] | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # compute (activations)
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # master weights
    # backend, block sizes, interpret mode: ``model.attention.backend: pallas_tpu`` etc.
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    remat: Literal["none", "full", "dots"] | None = None
    init_seed: int = 0
    # Training dropout from the checkpoint's config (GPT-2: embd_pdrop / resid_pdrop, 0.1 in
    # HF GPT-2, as the reference trained); false trains without. Never applied in evaluation or
    # sampling. Models without dropout in their config (LLaMA) are unaffected.
    dropout: bool = True
    lora: LoraSection | None = None  # set: train LoRA adapters, not the whole model
    # The train step's cross-entropy over this many positions per row at a time (the float32
    # logits of a chunk only, recomputed in the backward pass: less HBM, more time); 0: the
    # logits of the whole micro-batch at once.
    loss_chunk: int = 0

    def validate(self, key: str):
        _check(self.loss_chunk >= 0, f"{key}.loss_chunk",
               f"{self.loss_chunk} must be >= 1 (or 0: no chunks)")
        if (self.checkpoint is None) == (self.init is None):
            raise ConfigError(f"{key}: set exactly one of '{key}.checkpoint' and '{key}.init'")
        if self.init is not None:
            object.__setattr__(self, "init", _validate_init(self.init, f"{key}.init"))


@dataclasses.dataclass(frozen=True)
class DiffusionSection:
    mask_token_id: int | None = None  # overrides the model config's
    anneal_steps: int = 0  # 0: full attention from the start (docs/algorithms.md §3)
    anneal_seed: int = 0
    # masked: over noised tokens (the reference); tokens: over target tokens (the NELBO per
    # token); sequence: LLaDA-style SFT, each sequence's loss over its answer length.
    normalization: Literal["masked", "tokens", "sequence"] = "masked"
    stratified_t: bool = False
    eps: float = 1e-3
    segment_ids: bool = False  # keep attention inside packed documents
    # SFT: the data are (prompt, answer) records, the prompt is never noised. The one switch:
    # the pipeline's mode and the sources' default fields follow from it (RunConfig.pipeline_*).
    sft: bool = False
    # Block diffusion (docs/algorithms.md §9): blocks of this many positions; 0 (or
    # data.seq_len): the whole sequence, the full-sequence recipe of §2.
    block_size: int = 0
    # [[step, N], ...]: block size N from (0-based) step `step` on; block_size before the first.
    block_schedule: tuple[tuple[int, ...], ...] = ()
    # Every row also trained with the complementary noise (Fast-dLLM v2), docs/algorithms.md §9.
    complementary_mask: bool = False

    def validate(self, key: str):
        _check(0.0 <= self.eps < 1.0, f"{key}.eps", "must lie in [0, 1)")
        _check(self.anneal_steps >= 0, f"{key}.anneal_steps", "must be >= 0")
        _check(self.block_size >= 0, f"{key}.block_size",
               f"{self.block_size} must be >= 1 (or 0: the whole sequence)")
        previous = None
        for i, entry in enumerate(self.block_schedule):
            where = f"{key}.block_schedule[{i}]"
            _check(len(entry) == 2, where, f"{list(entry)} must be a pair [step, block_size]")
            step, size = entry
            _check(step >= 0, where, f"step {step} must be >= 0")
            _check(previous is None or step > previous, where,
                   f"step {step} must come after the previous entry's step {previous}"
                   " (steps strictly increasing)")
            _check(size >= 1, where, f"block size {size} must be >= 1")
            previous = step

    def block_size_at(self, step: int) -> int:
        """The block size in force at (0-based) training step ``step``, as configured (0 or the
        sequence length mean the whole sequence: see ``RunConfig.block_size_at``)."""
        size = self.block_size
        for start, scheduled in self.block_schedule:
            if step >= start:
                size = scheduled
        return size

    def block_sizes(self) -> tuple[int, ...]:
        """Every block size the run may train with, in the order they come into force."""
        return (self.block_size,) + tuple(size for _, size in self.block_schedule)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Generic on purpose: the data pipeline maps these onto its own options. ``sources`` is a list
    of mappings (e.g. ``{path: ..., weight: 0.7}``) whose keys the pipeline validates."""

    sources: tuple[dict[str, Any], ...] = ()
    tokenizer: str | None = None
    seq_len: int = 512
    global_batch: int = 8
    shuffle: bool = True
    seed: int = 0
    worker_count: int = 0
    num_epochs: int | None = None  # None: repeat forever
    eval_sources: tuple[dict[str, Any], ...] = ()
    eval_split: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # pipeline-specific extras

    def validate(self, key: str):
        _check(self.seq_len > 1, f"{key}.seq_len", "must be > 1")
        _check(self.global_batch > 0, f"{key}.global_batch", "must be > 0")
        _check(self.worker_count >= 0, f"{key}.worker_count", "must be >= 0")
        _check(self.num_epochs is None or self.num_epochs > 0, f"{key}.num_epochs",
               "must be > 0 (or unset: endless)")
        for name in ("sources", "eval_sources"):
            for i, spec in enumerate(getattr(self, name)):
                _validate_source(spec, f"{key}.{name}[{i}]")
        _validate_pipeline_options(self.options, f"{key}.options")


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    peak_lr: float = 3e-4
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 0
    decay_steps: int | None = None  # steps of warmup + decay; None: train.steps
    min_lr_ratio: float = 0.1  # final lr of the decay, as a fraction of peak_lr
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # What decays: matrices and embeddings (norm scales and biases exempt), or every parameter
    # as the reference's single AdamW parameter group did (docs/algorithms.md §2).
    weight_decay_scope: Literal["matrices", "all"] = "matrices"
    clip_norm: float | None = 1.0  # global-norm clipping; None or 0: off
    grad_accum_steps: int = 1  # micro-batches per step
    ema_decay: float | None = None

    def validate(self, key: str):
        _check(self.peak_lr >= 0, f"{key}.peak_lr", "must be >= 0")
        _check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{key}.min_lr_ratio", "must lie in [0, 1]")
        _check(self.grad_accum_steps >= 1, f"{key}.grad_accum_steps", "must be >= 1")
        _check(self.ema_decay is None or 0.0 <= self.ema_decay < 1.0, f"{key}.ema_decay",
               "must lie in [0, 1)")
        _check(self.decay_steps is None or self.decay_steps > self.warmup_steps,
               f"{key}.decay_steps", "must exceed warmup_steps")


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Mesh axis sizes; one axis may be -1 to take the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def validate(self, key: str):
        sizes = dataclasses.astuple(self)
        _check(all(s == -1 or s >= 1 for s in sizes), key, "axis sizes must be >= 1 or -1")
        _check(sizes.count(-1) <= 1, key, "at most one axis may be -1")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    shape: MeshShape = dataclasses.field(default_factory=MeshShape)
    # Multi-slice TPU: the data axis spans this many slices (over DCN); the others stay in a slice.
    num_slices: int = 1
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)  # logical name -> mesh axes
    distributed: Union[bool, Literal["auto"]] = "auto"
    coordinator: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None

    def validate(self, key: str):
        names, axes = {n for n, _ in DEFAULT_RULES}, ("data", "fsdp", "tensor")
        for name, target in self.rules.items():
            if name not in names:
                raise ConfigError(_unknown(f"{key}.rules.{name}", name, names, "logical axis"))
            targets = [target] if isinstance(target, str) else [] if target is None else target
            if not isinstance(targets, (list, tuple)) or any(t not in axes for t in targets):
                raise ConfigError(f"{key}.rules.{name}: {target!r} must be null, a mesh axis or a"
                                  f" list of mesh axes among {axes}")
        for names in ACTIVATIONS + tuple(sorted(weight_axes(), key=str)):
            try:
                check_collisions(names, self.rule_table())
            except ValueError as e:
                raise ConfigError(f"{key}.rules: {e}") from None
        _check(self.num_slices >= 1, f"{key}.num_slices", "must be >= 1")

    def rule_table(self) -> tuple:
        """DEFAULT_RULES with this section's overrides applied (for ``axis_rules``)."""
        over = {k: tuple(v) if isinstance(v, list) else v for k, v in self.rules.items()}
        return tuple((name, over.get(name, target)) for name, target in DEFAULT_RULES)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 1000
    keep_last: int = 3
    keep_every: int | None = None  # also keep every n-th step for good
    async_save: bool = dataclasses.field(default=True, metadata={"key": "async"})
    # Resume from a step that lacks this process's data-iterator state (deleted, or saved with
    # another process count), or whose training data changed since (files added, removed,
    # modified), by restarting the data stream; otherwise such a step is incomplete / refused.
    restart_data: bool = False

    def validate(self, key: str):
        _check(self.every_steps > 0, f"{key}.every_steps", "must be > 0")
        _check(self.keep_last >= 1, f"{key}.keep_last", "must be >= 1")


WANDB_KEYS = ("project", "name", "entity", "group", "tags", "notes", "mode", "id", "dir")


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    every_steps: int = 10
    tensorboard: bool = True
    eval_every: int = 0  # 0: no periodic evaluation
    eval_batches: int = 8
    sample_every: int = 0
    profile_steps: tuple[int, ...] = ()  # (first, last) step to trace, or empty
    # Weights & Biases, off unless set: {project, name, entity, group, tags, notes, mode, id}
    wandb: dict[str, Any] | None = None

    def validate(self, key: str):
        _check(self.every_steps > 0, f"{key}.every_steps", "must be > 0")
        if self.wandb is not None:
            w = self.wandb
            _check(isinstance(w, dict), f"{key}.wandb", "must be a mapping like {project: NAME}")
            unknown = sorted(set(w) - set(WANDB_KEYS))
            _check(not unknown, f"{key}.wandb.{(unknown or [''])[0]}",
                   f"unknown key; known: {list(WANDB_KEYS)}")
            _check(isinstance(w.get("project"), str) and bool(w["project"]),
                   f"{key}.wandb.project", "must be set (the W&B project to log to)")
        _check(len(self.profile_steps) in (0, 2), f"{key}.profile_steps",
               "must be empty or [first, last]")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 1000
    seed: int = 0  # noise keys are fold_in(seed, step): reproducible and resume-exact
    max_bad_steps: int = 10  # consecutive non-finite steps (all skipped) before the run aborts

    def validate(self, key: str):
        _check(self.steps > 0, f"{key}.steps", "must be > 0")
        _check(self.max_bad_steps >= 1, f"{key}.max_bad_steps", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class PlanSection:
    """What ``diffujax plan`` needs besides the run itself (``train`` ignores it)."""

    topology: str | None = None  # the Cloud TPU slice the run is meant for, e.g. v5p-128
    # The architecture of model.checkpoint (model.init fields), so that plan runs without it.
    model: dict[str, Any] | None = None

    def validate(self, key: str):
        if self.topology is not None:
            try:
                parse_slice(self.topology)
            except ValueError as e:
                raise ConfigError(f"{key}.topology: {e}") from None
        if self.model is not None:
            object.__setattr__(self, "model", _validate_init(self.model, f"{key}.model"))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    output_dir: str | None = None
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    diffusion: DiffusionSection = dataclasses.field(default_factory=DiffusionSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    plan: PlanSection = dataclasses.field(default_factory=PlanSection)

    def validate(self, key: str):
        accum = self.optimizer.grad_accum_steps
        _check(self.data.global_batch % accum == 0, "optimizer.grad_accum_steps",
               f"({accum}) must divide data.global_batch ({self.data.global_batch})")
        o = self.optimizer
        _check(o.schedule != "cosine" or (o.decay_steps or self.train.steps) > o.warmup_steps,
               "optimizer.warmup_steps", f"({o.warmup_steps}) must be below the cosine decay's"
               f" end (optimizer.decay_steps, else train.steps: {o.decay_steps or self.train.steps})")
        seq_len = self.data.seq_len
        sizes = [("diffusion.block_size", self.diffusion.block_size)] + [
            (f"diffusion.block_schedule[{i}]", size)
            for i, (_, size) in enumerate(self.diffusion.block_schedule)]
        for name, size in sizes:
            _check(size <= seq_len, name,
                   f"block size {size} exceeds data.seq_len ({seq_len})")
        if self.model.init is not None:  # a checkpoint's model is checked once its config is read
            self.check_model(self.resolve_model_config(), "model.init")

    # -- the model this run trains -----------------------------------------------------------

    def model_checkpoint(self) -> str | None:
        """``model.checkpoint`` as an absolute path; ``default`` is the embedded
        SmolLM2-135M-Instruct (materialised and converted on first use, ``diffujax
        default-model``)."""
        path = self.model.checkpoint
        if path == "default":
            return str(default_model())  # materialised (once per machine) only when asked for
        return None if path is None else os.fspath(paths.resolve(path))

    def tokenizer_dir(self) -> str:
        path = self.data.tokenizer or self.model_checkpoint()
        if path is None:
            raise ConfigError("data.tokenizer is required when the model is initialised from"
                              " model.init")
        return os.fspath(paths.resolve(path))

    def check_model(self, model: ModelConfig, source: str) -> None:
        """Refuse a model config this run cannot train (``source`` names where it came from):
        a mask token outside the vocabulary or equal to EOS, heads that do not divide the hidden
        size or the mesh's tensor axis, sequences longer than the model's positions."""
        checked_mask_token(model, "diffusion.mask_token_id" if self.diffusion.mask_token_id
                           is not None else f"{source} mask_token_id")
        _check(model.hidden_size % model.num_heads == 0 or getattr(model, "explicit_head_dim", None),
               f"{source} num_heads", f"({model.num_heads}) must divide hidden_size"
               f" ({model.hidden_size})")
        _check(model.num_heads % model.num_kv_heads == 0, f"{source} num_kv_heads",
               f"({model.num_kv_heads}) must divide num_heads ({model.num_heads})")
        positions = getattr(model, "max_positions", None)
        _check(positions is None or self.data.seq_len <= positions, "data.seq_len",
               f"({self.data.seq_len}) exceeds the model's maximum positions ({positions})")
        rules = dict(self.mesh.rule_table())
        for name, heads in (("heads", model.num_heads), ("kv_heads", model.num_kv_heads)):
            target = rules.get(name)
            axes = (target,) if isinstance(target, str) else tuple(target or ())
            size = 1
            for axis in axes:
                size *= getattr(self.mesh.shape, axis)
            _check(size < 0 or heads % size == 0, f"mesh.shape ({'x'.join(axes)})",
                   f"size {size} must divide the model's {name.replace('_', ' ')} ({heads})")
        if self.model.lora is not None:
            lora.check(model, self.model.lora.spec(model))

    def lora_spec(self, model: ModelConfig) -> lora.LoraSpec | None:
        """The adapters this run trains on ``model``, or None (the whole model trains)."""
        return None if self.model.lora is None else self.model.lora.spec(model)

    # -- what the data pipeline gets -----------------------------------------------------------

    def source_specs(self, eval_split: bool = False) -> list[dict]:
        """``data.sources`` (or ``eval_sources``) with their defaults filled in: SFT sources read
        (prompt, answer) fields unless a source names its own."""
        d = self.data
        if self.diffusion.sft:
            default_field = (d.options.get("prompt_field", "prompt"),
                             d.options.get("answer_field", "answer"))
        else:
            default_field = "text"
        return [dict({"format": "auto", "field": default_field, "mode": "file",
                      "errors": "strict", "split": "train", "data_dir": None, "weight": 1.0},
                     **spec) for spec in (d.eval_sources if eval_split else d.sources)]

    def pipeline_options(self, eval_split: bool = False) -> dict[str, Any]:
        """Keyword arguments of the data pipeline's ``PipelineOptions``. Evaluation is one pass,
        in order, forward-only on one training micro-batch at a time (a size known to fit)."""
        d = self.data
        batch = d.global_batch // self.optimizer.grad_accum_steps if eval_split else d.global_batch
        return dict(d.options, seq_len=d.seq_len, global_batch=batch, seed=d.seed,
                    shuffle=d.shuffle and not eval_split,
                    num_epochs=1 if eval_split else d.num_epochs,
                    mode="sft" if self.diffusion.sft else "pretrain",
                    segment_ids=self.diffusion.segment_ids,
                    worker_count=0 if eval_split else d.worker_count)

    def block_size_at(self, step: int) -> int:
        """The block size training step ``step`` runs with (docs/algorithms.md §9): 0 for the
        whole sequence (the full-sequence recipe), else ``N < data.seq_len``."""
        return effective_block_size(self.diffusion.block_size_at(step), self.data.seq_len)

    def model_overrides(self) -> dict[str, Any]:
        """Changes this run makes to the model config it loads or initialises. ``block_size``
        records what the model is trained as at the end of the run (the last block size of
        the schedule), so checkpoints and exports say how to decode it."""
        m = self.model
        out = dict(dtype=m.dtype, param_dtype=m.param_dtype, attention=m.attention,
                   remat=m.remat, mask_token_id=self.diffusion.mask_token_id,
                   block_size=self.block_size_at(self.train.steps - 1))
        return {k: v for k, v in out.items() if v is not None}

    def resolve_model_config(self, loaded: ModelConfig | None = None) -> ModelConfig:
        """The model config of this run: ``loaded`` (from ``model.checkpoint``) or ``model.init``,
        with the overrides applied."""
        base = loaded if loaded is not None else init_model_config(self.model.init)
        return base.replace(**self.model_overrides())


# ------------------------------------------------------------------------------ loading, dumping


def load_config(path: str | os.PathLike | None = None, overrides=()) -> RunConfig:
    """Read a YAML file (or start from defaults when ``path`` is None), apply ``key=value``
    overrides in order, validate, and return the ``RunConfig``."""
    raw: dict = {}
    if path is not None:
        source = paths.resolve(path)  # a file or a URL
        if not source.is_file():
            raise ConfigError(f"{path}: no such config file")
        raw = yaml.safe_load(source.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw)


def from_dict(raw: Mapping) -> RunConfig:
    return _build(RunConfig, raw, "")


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw (unvalidated) config dict in place."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    value = yaml.safe_load(text) if text.strip() else None
    node = raw
    *parents, leaf = key.split(".")
    for i, name in enumerate(parents):
        child = node.get(name)
        if child is None:
            child = node[name] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parents[:i + 1])!r} is not a section")
        node = child
    node[leaf] = value


def to_dict(cfg) -> dict:
    """The plain (YAML-ready) form of a config dataclass, using the YAML key names."""
    return to_plain(cfg, field_key=_key)


def to_yaml(cfg: RunConfig) -> str:
    """YAML text that ``load_config`` reads back into an equal ``RunConfig``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


# ------------------------------------------------------------------------------- the validator

SOURCE_KEYS = ("path", "format", "field", "mode", "errors", "split", "data_dir", "weight")
# Pipeline options that have a config key of their own (one place per decision).
OWN_KEYS = {"seq_len": "data.seq_len", "global_batch": "data.global_batch", "seed": "data.seed",
            "shuffle": "data.shuffle", "num_epochs": "data.num_epochs",
            "worker_count": "data.worker_count", "mode": "diffusion.sft",
            "segment_ids": "diffusion.segment_ids"}


def _validate_source(spec, key: str) -> None:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key}: expected a mapping with a 'path', got {spec!r}")
    if "path" not in spec:
        raise ConfigError(f"{key}: each source needs a 'path' (got keys {sorted(spec)})")
    for name in spec:
        if name not in SOURCE_KEYS:
            raise ConfigError(_unknown(f"{key}.{name}", str(name), SOURCE_KEYS))
    fmt = spec.get("format", "auto")
    _check(fmt == "auto" or fmt in FORMATS, f"{key}.format",
           f"{fmt!r} is not one of auto, {', '.join(FORMATS)}")
    _check(spec.get("mode", "file") in ("file", "paragraph", "lines"), f"{key}.mode",
           f"{spec.get('mode')!r} is not one of 'file', 'paragraph', 'lines'")
    _check(spec.get("errors", "strict") in ("strict", "skip"), f"{key}.errors",
           f"{spec.get('errors')!r} is not one of 'strict', 'skip'")
    weight = spec.get("weight", 1.0)
    _check(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0,
           f"{key}.weight", f"{weight!r} must be a number > 0")


def _validate_pipeline_options(options: Mapping, key: str) -> None:
    known = {f.name for f in dataclasses.fields(PipelineOptions)} - set(OWN_KEYS)
    for name in options:
        if name in OWN_KEYS:
            raise ConfigError(f"{key}.{name}: set {OWN_KEYS[name]} instead")
        if name not in known:
            raise ConfigError(_unknown(f"{key}.{name}", str(name), known))



def _key(field: dataclasses.Field) -> str:
    return field.metadata.get("key", field.name)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def checked_mask_token(model: ModelConfig, key: str = MASK_TOKEN_KEY) -> int:
    """``model``'s mask token, the one check of it: ``ConfigError`` naming ``key`` (where the
    value came from) when the model has none, it lies outside the vocabulary, or it is EOS."""
    mask, vocab = model.mask_token_id, model.vocab_size
    if mask is None:
        raise ConfigError(f"{key}: the model has no mask token; set {MASK_TOKEN_KEY}"
                          f" (0..vocab_size-1)")
    _check(0 <= mask < vocab, key, f"{mask} is outside the vocabulary (0..{vocab - 1})")
    _check(mask != model.eos_token_id, key,
           f"{mask} is the EOS token; the mask token must be a token of its own")
    return int(mask)


def _check(ok: bool, key: str, message: str):
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _unknown(full_key: str, name: str, known, what: str = "config key") -> str:
    msg = f"unknown {what} {full_key!r}"
    # Same words in another order (lr_peak / peak_lr) first, then spelling near misses.
    close = [k for k in sorted(known) if sorted(k.split("_")) == sorted(name.split("_"))]
    close = close or difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    if close:
        prefix = full_key[: len(full_key) - len(name)]
        msg += f" (did you mean {prefix + close[0]!r}?)"
    else:
        msg += f"; expected one of {', '.join(sorted(known))}"
    return msg


def _build(cls, raw, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}"
                          f" {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        full = _join(prefix, str(name))
        if name not in fields:
            raise ConfigError(_unknown(full, str(name), fields))
        field = fields[name]
        kwargs[field.name] = _coerce(hints[field.name], value, full)
    for name, field in fields.items():  # absent sections are built (and validated) from defaults
        if field.name not in kwargs and dataclasses.is_dataclass(hints[field.name]):
            kwargs[field.name] = _build(hints[field.name], {}, _join(prefix, name))
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        try:
            obj.validate(prefix)
        except ConfigError:
            raise
        except ValueError as e:  # sections defined outside this module (attention) say ValueError
            raise ConfigError(str(e)) from None
    return obj


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp, value, key: str):
    """``value`` converted to type ``tp``, or a ConfigError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail(expected=None):
        raise ConfigError(f"{key}: expected {expected or _type_name(tp)}, got"
                          f" {type(value).__name__} {value!r}")

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None:
            return None if type(None) in args else fail()
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(arm, value, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        fail(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
    if tp is bool:
        return value if isinstance(value, bool) else fail("a boolean (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, (float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:
                fail("an integer")
            if number.is_integer():  # "1e6" and 1.0e6 are fine for a step count
                return int(number)
        fail("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
        fail("a number")
    if tp is str:
        return value if isinstance(value, str) else fail("a string")
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            fail("a list")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            fail("a mapping")
        item = args[1] if args else Any
        return {str(k): _coerce(item, v, _join(key, str(k))) for k, v in value.items()}
    raise TypeError(f"config field {key!r} has a type the loader does not handle: {tp}")


def init_model_config(init: Mapping) -> ModelConfig:
    """The model config a checked ``model.init`` (or ``plan.model``) describes, before a run's
    overrides (``RunConfig.resolve_model_config``)."""
    fields = dict(init)
    return FAMILIES[fields.pop("family")].config(**fields)


def _validate_init(init: Mapping, key: str) -> dict[str, Any]:
    """``model.init``: a family name plus fields of that family's model config, type-checked."""
    init = dict(init)
    family = init.get("family")
    if family not in FAMILIES:
        raise ConfigError(f"{key}.family: {family!r} is not one of {', '.join(FAMILIES)}")
    cls = FAMILIES[family].config
    hints = typing.get_type_hints(cls)
    allowed = {f.name for f in dataclasses.fields(cls)} - {"extra_hf", "attention"}
    out = {"family": family}
    for name, value in init.items():
        if name == "family":
            continue
        if name == "block_size":  # what the run trains decides it
            raise ConfigError(f"{_join(key, name)}: set diffusion.block_size instead (the model"
                              " records the block size it is trained with)")
        if name not in allowed:
            raise ConfigError(_unknown(_join(key, name), name, allowed))
        out[name] = _coerce(hints[name], value, _join(key, name))
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
        _check(out.get(name, 0) > 0, _join(key, name), "is required and must be > 0")
    out.setdefault("num_kv_heads", out["num_heads"])
    _check(out["num_heads"] % out["num_kv_heads"] == 0, _join(key, "num_kv_heads"),
           "must divide num_heads")
    return out
