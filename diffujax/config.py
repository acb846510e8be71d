"""The run configuration: one validated dataclass tree, from YAML plus ``key=value`` overrides.

    cfg = load_config("configs/diffugpt_s.yaml", ["optimizer.peak_lr=1e-4", "mesh.shape.fsdp=8"])
    print(to_yaml(cfg))

Dotted keys reach nested fields; values are parsed as YAML scalars (``3e-4`` is accepted for a float
although YAML 1.1 reads it as a string). The sections are pydantic dataclasses: pydantic checks
types, bounds and unknown keys, each section's ``__post_init__`` what its types cannot say, and
every failure is one ``ConfigError`` line naming the full dotted key, with a suggestion for near
misses.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from typing import Annotated, Any, Literal, Mapping, Union

import pydantic
import yaml
from pydantic import (AfterValidator, BeforeValidator, Field, PlainValidator, Strict, StrictBool,
                      StrictStr, TypeAdapter, ValidationError)
from pydantic_core import PydanticCustomError
from typing_extensions import Required, TypedDict, is_typeddict

from diffujax import paths
from diffujax.attention.config import AttentionConfig
from diffujax.checkpoint.smollm2 import default_model
from diffujax.data.pipeline import PipelineOptions
from diffujax.data.sources import FORMATS
from diffujax.diffusion.blocks import effective_block_size
from diffujax.models import FAMILIES, ModelConfig, lora, weight_axes
from diffujax.parallel.logical import ACTIVATIONS, DEFAULT_RULES, check_collisions
from diffujax.parallel.topology import parse_slice


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the offending key."""


MASK_TOKEN_KEY = "diffusion.mask_token_id"  # the run config's name for the mask token


# ----------------------------------------------------------------------------- field types


def _from_text(value):
    """YAML 1.1 reads ``3e-4`` and ``1e6`` as strings; a number is meant."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _integral(value):  # 1e6 (or "1e6") is fine for a step count; 1.5 is not
    value = _from_text(value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _real(value):  # converted before the bounds are checked, so that errors show the float
    return float(value) if type(value) is int else _from_text(value)


# Scalars checked strictly (a boolean is no number, a number no string), then converted.
Int = Annotated[int, Strict(), BeforeValidator(_integral)]
Float = Annotated[float, Strict(), BeforeValidator(_real)]
_STRICT = {int: Int, float: Float, bool: StrictBool, str: StrictStr}


@functools.cache
def _strict(tp):
    """``tp`` (a field type of a lower layer's plain dataclass: the attention config, the model
    configs) with its scalars checked as strictly as the run config's own; a dataclass is read
    from a mapping of such fields (unknown keys refused) and built as itself."""
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        mirror = pydantic.create_model(
            tp.__name__, __config__=pydantic.ConfigDict(extra="forbid", from_attributes=True),
            **{f.name: (_strict(hints[f.name]), f.default) for f in dataclasses.fields(tp)})
        return Annotated[mirror, AfterValidator(lambda m: tp(**dict(m)))]
    if typing.get_origin(tp) in (Union, types.UnionType):
        return Union[tuple(_strict(arm) for arm in typing.get_args(tp))]
    return _STRICT.get(tp, tp)


_adapter = functools.cache(lambda tp: TypeAdapter(_strict(tp)))


def _validate_init(init: dict, key: str) -> dict[str, Any]:
    """``model.init`` (or ``plan.model``, ``key``): a family name plus fields of that family's
    model config, type-checked."""
    family = init.get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        raise ConfigError(f"{key}.family: {family!r} is not one of {', '.join(FAMILIES)}")
    cls = FAMILIES[family].config
    hints = typing.get_type_hints(cls)
    allowed = {f.name for f in dataclasses.fields(cls)} - {"extra_hf", "attention"}
    out = {"family": family}
    for name, value in init.items():
        if name == "family":
            continue
        if name == "block_size":  # what the run trains decides it
            raise ConfigError(f"{key}.{name}: set diffusion.block_size instead (the model"
                              " records the block size it is trained with)")
        if name not in allowed:
            raise ConfigError(_unknown(f"{key}.{name}", name, allowed))
        try:
            out[name] = _adapter(hints[name]).validate_python(value)
        except ValidationError as e:
            raise ConfigError(f"{key}.{name}: {_problem(e.errors()[0])}") from None
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
        _check(out.get(name, 0) > 0, f"{key}.{name}", "is required and must be > 0")
    out.setdefault("num_kv_heads", out["num_heads"])
    _check(out["num_heads"] % out["num_kv_heads"] == 0, f"{key}.num_kv_heads",
           "must divide num_heads")
    return out


def _init_fields(key: str):
    """The type of ``model.init`` / ``plan.model`` (at ``key``): checked by ``_validate_init``."""
    return Annotated[dict[str, Any], AfterValidator(functools.partial(_validate_init, key=key))]


def _bool_or_auto(value):
    if isinstance(value, bool) or value == "auto":
        return value
    raise PydanticCustomError("expected", "expected {expected}", {"expected": "bool or 'auto'"})


# Field metadata, ``Annotated[T, MAY_CHANGE]``: a resumed run may change this key (any key of a
# section so marked; train/resume.py). Such keys steer the steps to come without contradicting
# the saved state: the lr schedule, optimizer settings whose state keeps its shape, logging and
# saving, the mesh (restores reshard), compute-only model settings, the block sizes (a warmup-
# stable-decay run decides its decay mid-run, docs/algorithms.md §9). The rest shaped the state.
MAY_CHANGE = "may change on resume"

# Each section: frozen, unknown keys refused; ``async`` reads into ``async_save``. A section sits
# at one key, which its ``__post_init__`` checks name in full (``model.lora.dropout``).
section = pydantic.dataclasses.dataclass(frozen=True, config=pydantic.ConfigDict(
    extra="forbid", validate_by_name=True, validate_by_alias=True))


def _check(ok: bool, key: str, message: str):
    if not ok:
        raise ConfigError(f"{key}: {message}")


# --------------------------------------------------------------------------------------- sections


@section
class LoraSection:
    """``model.lora``: train low-rank adapters on the block's projections instead of every weight
    (``models/lora.py``); the base weights stay frozen."""

    rank: Int = Field(8, ge=1)
    alpha: Float = Field(16.0, gt=0)
    targets: tuple[StrictStr, ...] = ()  # projection names (q_proj, ..., down_proj); empty: all
    dropout: Float = Field(0.0, ge=0, lt=1)


Dtype = Literal["float32", "bfloat16", "float16"]


@section
class ModelSection:
    """Either ``checkpoint`` (a diffujax checkpoint dir) or ``init`` (``family`` plus model-config
    fields, for a randomly initialised model); the other fields override the model config."""

    checkpoint: StrictStr | None = None
    init: _init_fields("model.init") | None = None
    dtype: Annotated[Dtype, MAY_CHANGE] = "bfloat16"  # compute (activations)
    param_dtype: Dtype = "float32"  # master weights
    # backend, block sizes, interpret mode: ``model.attention.backend: pallas_tpu`` etc.
    attention: Annotated[_strict(AttentionConfig), MAY_CHANGE] = AttentionConfig()
    # what the backward pass recomputes per layer (models.layers.REMAT_POLICIES), least first
    remat: Annotated[Literal["none", "dots_with_attention", "dots", "full"] | None,
                     MAY_CHANGE] = None
    # the layers as one lax.scan (true) or unrolled (false: no stacked buffers of saved
    # activations, a longer program; models.layers.unrolled_layers); unset: the model config's
    scan_layers: Annotated[StrictBool | None, MAY_CHANGE] = None
    init_seed: Int = 0
    # Training dropout from the checkpoint's config (GPT-2: embd_pdrop / resid_pdrop, 0.1 in
    # HF GPT-2, as the reference trained); false trains without. Never applied in evaluation or
    # sampling. Models without dropout in their config (LLaMA) are unaffected.
    dropout: StrictBool = True
    lora: LoraSection | None = None  # set: train LoRA adapters, not the whole model
    # The train step's cross-entropy over this many positions per row at a time (the float32
    # logits of a chunk only, recomputed in the backward pass: less HBM, more time); 0: the
    # logits of the whole micro-batch at once.
    loss_chunk: Annotated[Int, MAY_CHANGE] = Field(0, ge=0)

    def __post_init__(self):
        if (self.checkpoint is None) == (self.init is None):
            raise ConfigError("model: set exactly one of 'model.checkpoint' and 'model.init'")
        self.attention.validate("model.attention")


@section
class DiffusionSection:
    mask_token_id: Int | None = None  # overrides the model config's
    anneal_steps: Int = Field(0, ge=0)  # 0: full attention from the start (docs/algorithms.md §3)
    anneal_seed: Int = 0
    # masked: over noised tokens (the reference); tokens: over target tokens (the NELBO per
    # token); sequence: LLaDA-style SFT, each sequence's loss over its answer length.
    normalization: Literal["masked", "tokens", "sequence"] = "masked"
    stratified_t: StrictBool = False
    eps: Float = Field(1e-3, ge=0, lt=1)
    segment_ids: StrictBool = False  # keep attention inside packed documents
    # SFT: the data are (prompt, answer) records, the prompt is never noised. The one switch:
    # the pipeline's mode and the sources' default fields follow from it (RunConfig.pipeline_*).
    sft: StrictBool = False
    # Block diffusion (docs/algorithms.md §9): blocks of this many positions; 0 (or
    # data.seq_len): the whole sequence, the full-sequence recipe of §2.
    block_size: Annotated[Int, MAY_CHANGE] = Field(0, ge=0)
    # [[step, N], ...]: block size N from (0-based) step `step` on; block_size before the first.
    block_schedule: Annotated[tuple[tuple[Int, ...], ...], MAY_CHANGE] = ()
    # Every row also trained with the complementary noise (Fast-dLLM v2), docs/algorithms.md §9.
    complementary_mask: Annotated[StrictBool, MAY_CHANGE] = False

    def __post_init__(self):
        previous = None
        for i, entry in enumerate(self.block_schedule):
            where = f"diffusion.block_schedule[{i}]"
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


@pydantic.with_config(pydantic.ConfigDict(extra="forbid"))
class Source(TypedDict, total=False):
    """One of ``data.sources`` / ``data.eval_sources``, read as a dict (``RunConfig.source_specs``
    fills in what it leaves out)."""

    path: Required[Any]  # a file, directory, glob or URL, or a list of them
    format: Literal[("auto",) + FORMATS]
    field: Any  # a record's text field, or SFT's [prompt, answer] fields
    mode: Literal["file", "paragraph", "lines"]
    errors: Literal["strict", "skip"]
    split: StrictStr
    data_dir: StrictStr | None
    weight: Annotated[Float, Field(gt=0)]


@section
class DataSection:
    """Generic on purpose: the data pipeline maps these onto its own options. ``sources`` is a list
    of mappings (e.g. ``{path: ..., weight: 0.7}``)."""

    sources: tuple[Source, ...] = ()
    tokenizer: StrictStr | None = None
    seq_len: Int = Field(512, gt=1)
    global_batch: Int = Field(8, gt=0)
    shuffle: StrictBool = True
    seed: Int = 0
    worker_count: Int = Field(0, ge=0)
    num_epochs: Int | None = Field(None, gt=0)  # None: repeat forever
    eval_sources: Annotated[tuple[Source, ...], MAY_CHANGE] = ()
    eval_split: Annotated[StrictStr | None, MAY_CHANGE] = None
    options: dict[str, Any] = Field(default_factory=dict)  # pipeline-specific extras

    def __post_init__(self):
        _validate_pipeline_options(self.options)


# A key of OptimizerSection that a resumed run may change (its optimizer state keeps its shape).
Steering = Annotated[Float, MAY_CHANGE]


@section
class OptimizerSection:
    peak_lr: Steering = Field(3e-4, ge=0)
    schedule: Annotated[Literal["constant", "cosine", "linear"], MAY_CHANGE] = "cosine"
    warmup_steps: Annotated[Int, MAY_CHANGE] = Field(0, ge=0)
    # steps of warmup + decay; None: train.steps
    decay_steps: Annotated[Int | None, MAY_CHANGE] = None
    min_lr_ratio: Steering = Field(0.1, ge=0, le=1)  # the decay's final lr / peak_lr
    b1: Steering = 0.9
    b2: Steering = 0.95
    eps: Steering = 1e-8
    weight_decay: Steering = 0.1
    # What decays: matrices and embeddings (norm scales and biases exempt), or every parameter
    # as the reference's single AdamW parameter group did (docs/algorithms.md §2).
    weight_decay_scope: Annotated[Literal["matrices", "all"], MAY_CHANGE] = "matrices"
    clip_norm: Annotated[Float | None, MAY_CHANGE] = 1.0  # global-norm clipping; None or 0: off
    grad_accum_steps: Annotated[Int, MAY_CHANGE] = Field(1, ge=1)  # micro-batches per step
    ema_decay: Float | None = Field(None, ge=0, lt=1)

    def __post_init__(self):
        _check(self.decay_steps is None or self.decay_steps > self.warmup_steps,
               "optimizer.decay_steps", "must exceed warmup_steps")


@section
class MeshShape:
    """Mesh axis sizes; one axis may be -1 to take the remaining devices."""

    data: Int = 1
    fsdp: Int = -1
    tensor: Int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        _check(all(s == -1 or s >= 1 for s in sizes), "mesh.shape", "axis sizes must be >= 1 or -1")
        _check(sizes.count(-1) <= 1, "mesh.shape", "at most one axis may be -1")


@section
class MeshSection:
    shape: MeshShape = Field(default_factory=MeshShape)
    # Multi-slice TPU: the data axis spans this many slices (over DCN); the others stay in a slice.
    num_slices: Int = Field(1, ge=1)
    rules: dict[str, Any] = Field(default_factory=dict)  # logical name -> mesh axes
    distributed: Annotated[bool | Literal["auto"], PlainValidator(_bool_or_auto)] = "auto"
    coordinator: StrictStr | None = None  # host:port of process 0
    num_processes: Int | None = None
    process_id: Int | None = None

    def __post_init__(self):
        names, axes = {n for n, _ in DEFAULT_RULES}, ("data", "fsdp", "tensor")
        for name, target in self.rules.items():
            if name not in names:
                raise ConfigError(_unknown(f"mesh.rules.{name}", name, names, "logical axis"))
            targets = [target] if isinstance(target, str) else [] if target is None else target
            _check(isinstance(targets, (list, tuple)) and all(t in axes for t in targets),
                   f"mesh.rules.{name}", f"{target!r} must be null, a mesh axis or a list of mesh"
                   f" axes among {axes}")
        for names in ACTIVATIONS + tuple(sorted(weight_axes(), key=str)):
            try:
                check_collisions(names, self.rule_table())
            except ValueError as e:
                raise ConfigError(f"mesh.rules: {e}") from None

    def rule_table(self) -> tuple:
        """DEFAULT_RULES with this section's overrides applied (a ``Layout``'s rules)."""
        over = {k: tuple(v) if isinstance(v, list) else v for k, v in self.rules.items()}
        return tuple((name, over.get(name, target)) for name, target in DEFAULT_RULES)


@section
class CheckpointSection:
    every_steps: Int = Field(1000, gt=0)
    keep_last: Int = Field(3, ge=1)
    keep_every: Int | None = None  # also keep every n-th step for good
    async_save: StrictBool = Field(True, alias="async")
    # Resume from a step that lacks this process's data-iterator state (deleted, or saved with
    # another process count), or whose training data changed since (files added, removed,
    # modified), by restarting the data stream; otherwise such a step is incomplete / refused.
    restart_data: StrictBool = False


WANDB_KEYS = ("project", "name", "entity", "group", "tags", "notes", "mode", "id", "dir")


@section
class LoggingSection:
    every_steps: Int = Field(10, gt=0)
    tensorboard: StrictBool = True
    eval_every: Int = 0  # 0: no periodic evaluation
    eval_batches: Int = 8
    sample_every: Int = 0
    profile_steps: tuple[Int, ...] = ()  # (first, last) step to trace, or empty
    # Weights & Biases, off unless set: {project, name, entity, group, tags, notes, mode, id}
    wandb: dict[str, Any] | None = None

    def __post_init__(self):
        if self.wandb is not None:
            unknown = sorted(set(self.wandb) - set(WANDB_KEYS))
            _check(not unknown, f"logging.wandb.{(unknown or [''])[0]}",
                   f"unknown key; known: {list(WANDB_KEYS)}")
            project = self.wandb.get("project")
            _check(isinstance(project, str) and bool(project), "logging.wandb.project",
                   "must be set (the W&B project to log to)")
        _check(len(self.profile_steps) in (0, 2), "logging.profile_steps",
               "must be empty or [first, last]")


@section
class TrainSection:
    steps: Annotated[Int, MAY_CHANGE] = Field(1000, gt=0)
    seed: Int = 0  # noise keys are fold_in(seed, step): reproducible and resume-exact
    # consecutive non-finite steps (all skipped) before the run aborts
    max_bad_steps: Annotated[Int, MAY_CHANGE] = Field(10, ge=1)


@section
class PlanSection:
    """What ``diffujax plan`` needs besides the run itself (``train`` ignores it)."""

    topology: StrictStr | None = None  # the Cloud TPU slice the run is meant for, e.g. v5p-128
    # The architecture of model.checkpoint (model.init fields), so that plan runs without it.
    model: _init_fields("plan.model") | None = None

    def __post_init__(self):
        if self.topology is not None:
            try:
                parse_slice(self.topology)
            except ValueError as e:
                raise ConfigError(f"plan.topology: {e}") from None


@section
class RunConfig:
    output_dir: Annotated[StrictStr | None, MAY_CHANGE] = None
    # No default model: an absent section is checked (and refused) like an empty one.
    model: ModelSection = Field(default_factory=dict, validate_default=True)
    diffusion: DiffusionSection = Field(default_factory=DiffusionSection)
    data: DataSection = Field(default_factory=DataSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    mesh: Annotated[MeshSection, MAY_CHANGE] = Field(default_factory=MeshSection)
    checkpoint: Annotated[CheckpointSection, MAY_CHANGE] = Field(default_factory=CheckpointSection)
    logging: Annotated[LoggingSection, MAY_CHANGE] = Field(default_factory=LoggingSection)
    train: TrainSection = Field(default_factory=TrainSection)
    plan: PlanSection = Field(default_factory=PlanSection)

    def __post_init__(self):
        accum = self.optimizer.grad_accum_steps
        _check(self.data.global_batch % accum == 0, "optimizer.grad_accum_steps",
               f"({accum}) must divide data.global_batch ({self.data.global_batch})")
        o = self.optimizer
        end = o.decay_steps or self.train.steps
        _check(o.schedule != "cosine" or end > o.warmup_steps, "optimizer.warmup_steps",
               f"({o.warmup_steps}) must be below the cosine decay's end (optimizer.decay_steps,"
               f" else train.steps: {end})")
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
        _check(model.hidden_size % model.num_heads == 0
               or getattr(model, "explicit_head_dim", None), f"{source} num_heads", f"({model.num_heads}) must divide hidden_size"
               f" ({model.hidden_size})")
        _check(model.num_heads % model.num_kv_heads == 0, f"{source} num_kv_heads",
               f"({model.num_kv_heads}) must divide num_heads ({model.num_heads})")
        _check(self.data.seq_len <= model.max_positions, "data.seq_len",
               f"({self.data.seq_len}) exceeds the model's maximum positions"
               f" ({model.max_positions})")
        rules = dict(self.mesh.rule_table())
        for name, heads in (("heads", model.num_heads), ("kv_heads", model.num_kv_heads)):
            target = rules.get(name)
            axes = (target,) if isinstance(target, str) else tuple(target or ())
            size = math.prod(getattr(self.mesh.shape, axis) for axis in axes)
            _check(size < 0 or heads % size == 0, f"mesh.shape ({'x'.join(axes)})",
                   f"size {size} must divide the model's {name.replace('_', ' ')} ({heads})")
        if self.model.lora is not None:
            lora.check(model, self.lora_spec(model))

    def lora_spec(self, model: ModelConfig) -> lora.LoraSpec | None:
        """The adapters this run trains on ``model`` (every projection of its block unless
        ``model.lora.targets``), or None (the whole model trains)."""
        c = self.model.lora
        return None if c is None else lora.LoraSpec(
            rank=c.rank, alpha=c.alpha, targets=c.targets or tuple(lora.projections(model)),
            dropout=c.dropout)

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

    def resolve_model_config(self, loaded: ModelConfig | None = None) -> ModelConfig:
        """The model config of this run: ``loaded`` (from ``model.checkpoint``) or ``model.init``,
        with this run's changes. ``block_size`` records what the model is trained as at the end
        of the run (the last block size of the schedule), so checkpoints and exports say how to
        decode it."""
        m = self.model
        changes = dict(dtype=m.dtype, param_dtype=m.param_dtype, attention=m.attention,
                       remat=m.remat, scan_layers=m.scan_layers,
                       mask_token_id=self.diffusion.mask_token_id,
                       block_size=self.block_size_at(self.train.steps - 1))
        base = loaded if loaded is not None else init_model_config(self.model.init)
        return base.replace(**{k: v for k, v in changes.items() if v is not None})



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
    try:
        return TypeAdapter(RunConfig).validate_python(raw)
    except ValidationError as e:
        raise config_error(e) from None


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw (unvalidated) config dict in place."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):  # YAML would fold a newline into a space
        raise ConfigError(f"{key}={text!r}: contains a control character (a newline, a tab...);"
                          " such a value is a typo far more often than a wish")
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


def to_dict(cfg: RunConfig) -> dict:
    """The plain (YAML-ready) form of a run config, under the YAML key names."""
    return TypeAdapter(RunConfig).dump_python(cfg, mode="json", by_alias=True)


def to_yaml(cfg: RunConfig) -> str:
    """YAML text that ``load_config`` reads back into an equal ``RunConfig``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def may_change_on_resume(key: str) -> bool:
    """Whether a resumed run may change the dotted ``key``: it, or a section above it, is marked
    ``MAY_CHANGE``. Keys this config does not have may not."""
    cls = RunConfig
    for name in key.split("."):
        hint = _field_hints(cls).get(name) if cls else None
        if hint is None:
            return False
        if MAY_CHANGE in typing.get_args(hint):
            return True
        cls = _section_of(hint)
    return False


# ------------------------------------------------------------------------------- the validator

# Pipeline options that have a config key of their own (one place per decision).
OWN_KEYS = {"seq_len": "data.seq_len", "global_batch": "data.global_batch", "seed": "data.seed",
            "shuffle": "data.shuffle", "num_epochs": "data.num_epochs",
            "worker_count": "data.worker_count", "mode": "diffusion.sft",
            "segment_ids": "diffusion.segment_ids"}


def _validate_pipeline_options(options: Mapping) -> None:
    known = {f.name for f in dataclasses.fields(PipelineOptions)} - set(OWN_KEYS)
    for name in options:
        if name in OWN_KEYS:
            raise ConfigError(f"data.options.{name}: set {OWN_KEYS[name]} instead")
        if name not in known:
            raise ConfigError(_unknown(f"data.options.{name}", name, known))


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


@functools.cache
def _field_hints(cls) -> dict[str, Any]:
    """YAML key -> type (with its ``Annotated`` metadata) of each field of a section."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = getattr(cls, "__pydantic_fields__", {})  # a section's (a Source has no aliases)
    return {getattr(fields.get(name), "alias", None) or name: hint for name, hint in hints.items()}


def _section_of(hint) -> type | None:
    """The section a field of type ``hint`` holds (``T``, ``T | None``, ``Annotated[T, ...]``,
    ``tuple[T, ...]``)."""
    if isinstance(hint, type) and (hasattr(hint, "__pydantic_fields__") or is_typeddict(hint)):
        return hint
    return next(filter(None, map(_section_of, typing.get_args(hint))), None)


# What a pydantic error type (before its first "_") expects, in the loader's words.
_EXPECTED = {"int": "an integer", "float": "a number", "bool": "a boolean (true/false)",
             "string": "a string", "dict": "a mapping", "model": "a mapping",
             "dataclass": "a mapping", "tuple": "a list", "list": "a list"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
           "less_than_equal": "<="}


def _problem(err: Mapping) -> str:
    """What is wrong with the value of one pydantic error, without its key."""
    kind, value = err["type"], err.get("input")
    if kind == "missing":
        return "is required"
    if kind == "literal_error":
        return f"{value!r} is not one of {err['ctx']['expected']}"
    if kind in _BOUNDS:
        return f"{value!r} must be {_BOUNDS[kind]} {next(iter(err['ctx'].values())):g}"
    expected = err["ctx"]["expected"] if kind == "expected" else _EXPECTED.get(kind.split("_")[0])
    if expected is None:
        return err["msg"]
    return f"expected {expected}, got {type(value).__name__} {value!r}"


UNKNOWN_KEY_ERRORS = ("extra_forbidden", "unexpected_keyword_argument")


def config_error(error: ValidationError, root: type | None = None) -> ConfigError:
    """The first of pydantic's errors (loading a config, or building a section in code) as one
    ``ConfigError`` line naming the full dotted key below ``root`` (default: ``RunConfig``).
    Unknown keys come first: a misspelt key (``modle:``) is the likelier cause of whatever else
    failed (``model`` left unset)."""
    errors = error.errors()
    err = next((e for e in errors if e["type"] in UNKNOWN_KEY_ERRORS), errors[0])
    loc = err["loc"]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, ValueError):  # a section's own check: it names the full key
        return ConfigError(str(cause))
    if err["type"] in UNKNOWN_KEY_ERRORS:
        section = root or RunConfig
        for name in loc[:-1]:
            if not isinstance(name, int):  # an index into a list of sections
                section = _section_of(_field_hints(section)[name])
        return ConfigError(_unknown(where, str(loc[-1]), _field_hints(section)))
    return ConfigError(f"{where or 'config'}: {_problem(err)}")


def init_model_config(init: Mapping) -> ModelConfig:
    """The model config a checked ``model.init`` (or ``plan.model``) describes, before a run's
    overrides (``RunConfig.resolve_model_config``)."""
    fields = dict(init)
    return FAMILIES[fields.pop("family")].config(**fields)
