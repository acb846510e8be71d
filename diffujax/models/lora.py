"""Low-rank adapters (LoRA) on the NNX model, through qwix.

A ``LoraSpec`` names the block's projections to adapt (``targets``: the ``Dense`` submodules,
``q_proj`` ... ``down_proj`` / GPT-2's ``c_fc`` ``c_proj``), the rank ``r`` and ``alpha``. qwix
intercepts each targeted projection's einsum and adds ``(alpha / r) * (x @ A) @ B``, reading the
adapters from the projection module: ``kernel_lora_a`` (the kernel's contracted axes, then ``r``)
and ``kernel_lora_b`` (``r``, then the kernel's output axes). qwix creates adapters lazily in a
first call, which a scanned stack of layers cannot do; so diffujax creates them itself, stacked on
the ``layers`` axis like every block weight, in the shapes qwix reads, and asks qwix only for the
interception (``skip_nnx_init``). A adapters start He-uniform, B at zero: the adapted model starts
as the base model.

Training holds two plain trees: the base weights (frozen) and the adapters (trained); ``join``
makes the one tree the adapted model merges with. ``merged`` folds the adapters into the base
(``W + (alpha / r) * A @ B``: the export that loads in transformers), and ``peft_tensors`` writes
them as a PEFT LoRA adapter.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from diffujax.models import abstract_model, family_of, param_specs
from diffujax.models.configs import ConfigError, ModelConfig
from diffujax.models.params import Params, flatten, nest
from diffujax.parallel.mesh import Layout

BLOCK = "layers"  # the stacked block whose projections can be adapted
SUFFIXES = ("_lora_a", "_lora_b")  # qwix's names: the kernel's name plus these


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0  # on the adapters' input, in training


def projections(config: ModelConfig) -> dict[str, str]:
    """The block's adaptable projections: name -> kernel path."""
    out = {}
    for path in param_specs(config):
        parts = path.split("/")
        if parts[0] == BLOCK and parts[-1] == "kernel":
            out[parts[-2]] = path
    return out


def check(config: ModelConfig, lora: LoraSpec, key: str = "model.lora") -> None:
    """Refuse a spec the model cannot take, naming the key."""
    known = projections(config)
    unknown = [t for t in lora.targets if t not in known]
    if not lora.targets or unknown:
        raise ConfigError(f"{key}.targets: {unknown or '[]'} not among the {config.family}"
                          f" block's projections {sorted(known)}")
    if len(set(lora.targets)) != len(lora.targets):
        raise ConfigError(f"{key}.targets: {list(lora.targets)} names a projection twice")
    table = param_specs(config)
    smallest = min(min(math.prod(p), math.prod(q)) for p, q in
                   (_split(table[known[t]].shape[1:], _equations(config)[t]) for t in lora.targets))
    if not 1 <= lora.rank <= smallest:
        raise ConfigError(f"{key}.rank {lora.rank}: must be 1..{smallest} (the smallest side of"
                          " the targeted kernels)")
    if not lora.alpha > 0:
        raise ConfigError(f"{key}.alpha {lora.alpha}: must be > 0")


@functools.cache
def _equations(config: ModelConfig) -> dict[str, str]:
    """Each projection's einsum equation (read off the built module)."""
    block = getattr(abstract_model(config), BLOCK)
    return {path[-1]: module.equation for path, module in nnx.iter_modules(block)
            if hasattr(module, "equation")}


def _split(kernel_shape, equation: str):
    """A kernel's shape split into (contracted axes, output axes): the kernels' equations all
    put the contracted axes first (``bld,dhk->blhk``, ``blhk,hkd->bld``)."""
    lhs, rhs = equation.split("->")[0].split(",")
    contracted = [c in lhs for c in rhs]
    n = contracted.index(False)
    if any(contracted[n:]):
        raise ValueError(f"kernel of {equation!r} does not put its contracted axes first")
    return tuple(kernel_shape[:n]), tuple(kernel_shape[n:])


def adapter_shapes(config: ModelConfig, lora: LoraSpec) -> dict[str, tuple[tuple, tuple]]:
    """Every adapter's path -> (shape, logical axes): for a kernel ``[layers, *contracted,
    *output]``, ``A`` is ``[layers, *contracted, r]`` and ``B`` ``[layers, r, *output]``."""
    table, known = param_specs(config), projections(config)
    out = {}
    for target in lora.targets:
        kernel = table[known[target]]
        (n, *_), axes = kernel.shape, kernel.axes
        contracted, output = _split(kernel.shape[1:], _equations(config)[target])
        k = len(contracted)
        out[known[target] + "_lora_a"] = ((n, *contracted, lora.rank),
                                           (axes[0], *axes[1:1 + k], None))
        out[known[target] + "_lora_b"] = ((n, lora.rank, *output),
                                           (axes[0], None, *axes[1 + k:]))
    return out


def adapter_params(config: ModelConfig, lora: LoraSpec) -> int:
    """How many parameters the adapters have."""
    return sum(math.prod(shape) for shape, _ in adapter_shapes(config, lora).values())


def init_adapters(config: ModelConfig, lora: LoraSpec, seed: int = 0) -> Params:
    """Fresh adapters as a plain tree: ``A`` He-uniform over its contracted axes (one draw per
    layer), ``B`` zeros, in the model's parameter dtype."""
    dtype = jnp.dtype(config.param_dtype)
    shapes = adapter_shapes(config, lora)
    keys = dict(zip(shapes, jax.random.split(jax.random.key(seed), len(shapes))))

    def init(path, shape):
        if path.endswith("_lora_b"):
            return jnp.zeros(shape, dtype)
        fan_in = math.prod(shape[1:-1])  # He-uniform: variance 2 / fan_in, as qwix's default
        bound = math.sqrt(6.0 / fan_in)
        return jax.random.uniform(keys[path], shape, jnp.float32, -bound, bound).astype(dtype)

    return nest({path: init(path, shape) for path, (shape, _) in shapes.items()})


def _provider(lora: LoraSpec):
    targets = "|".join(lora.targets)
    return qwix.LoraProvider(module_path=f"{BLOCK}/.*({targets})", rank=lora.rank,
                             alpha=lora.alpha, dropout=lora.dropout)


@functools.cache
def adapted_graphdef(config: ModelConfig, lora: LoraSpec) -> nnx.GraphDef:
    """The adapted model's graph (qwix's intercepting model class, the adapters among the
    projections' variables), split once per (config, spec)."""
    model = abstract_model(config)
    shapes = adapter_shapes(config, lora)
    for path, (shape, axes) in shapes.items():
        *parents, name = path.split("/")
        module = model
        for part in parents:
            module = getattr(module, part)
        setattr(module, name, nnx.LoRAParam(jax.ShapeDtypeStruct(shape, config.param_dtype),
                                            out_sharding=axes, eager_sharding=False))
    tokens = jnp.zeros((1, 1), jnp.int32)
    model = qwix.apply_lora_to_model(model, _provider(lora), tokens, skip_nnx_init=True,
                                     rngs=nnx.Rngs(0))
    return nnx.split(model)[0]


def adapter_shardings(config: ModelConfig, lora: LoraSpec, layout: Layout) -> Params:
    """A ``NamedSharding`` per adapter, from its logical axes through the layout's rules."""
    return nest({path: layout.sharding(axes, shape)
                 for path, (shape, axes) in adapter_shapes(config, lora).items()})


def adapter_decay_mask(config: ModelConfig, lora: LoraSpec) -> Params:
    """Every adapter decays (they are matrices)."""
    return nest({path: True for path in adapter_shapes(config, lora)})


def join(base: Params, adapters: Params) -> Params:
    """The one tree the adapted model holds: the base weights and the adapters beside their
    kernels."""
    return nest({**flatten(base), **flatten(adapters)})


def split(tree: Params) -> tuple[Params, Params]:
    """Inverse of ``join``: (base, adapters)."""
    flat = flatten(tree)
    adapters = {p: v for p, v in flat.items() if p.endswith(SUFFIXES)}
    return nest({p: v for p, v in flat.items() if p not in adapters}), nest(adapters)


def forward(config: ModelConfig, lora: LoraSpec, params: Params, tokens, pattern,
            positions=None, dropout_key=None, split_head: bool = False):
    """The adapted model's logits; ``params``: ``join(base, adapters)``. The adapters are cast
    to the compute dtype, as the projections cast their kernels. ``dropout_key`` (training):
    the adapters drop out their input at ``lora.dropout``; without it nothing is dropped.
    ``split_head``: ``(hidden, head)`` as ``models.forward`` (the head has no adapters)."""
    dtype = jnp.dtype(config.dtype)
    flat = {p: v.astype(dtype) if p.endswith(SUFFIXES) else v for p, v in flatten(params).items()}
    if dropout_key is None:
        lora = dataclasses.replace(lora, dropout=0.0)
    model = nnx.merge(adapted_graphdef(config, lora), nest(flat))
    return model(tokens, pattern, positions, dropout_key, split_head)


def apply_fn_for(config: ModelConfig, lora: LoraSpec):
    """``apply_fn(params, tokens, pattern, positions=None, dropout_key=None)`` of the adapted
    model, ``params`` the joined tree (``models.apply_fn_for``'s form)."""
    return functools.partial(forward, config, lora)


def merged(config: ModelConfig, lora: LoraSpec, base: Params, adapters: Params) -> Params:
    """The base weights with the adapters folded in, ``W + (alpha / r) * A @ B`` (computed in
    float32, stored in each kernel's dtype): a plain model of ``config``."""
    flat, adapter = dict(flatten(base)), flatten(adapters)
    for target in lora.targets:
        path = projections(config)[target]
        a = jnp.asarray(adapter[path + "_lora_a"], jnp.float32)
        b = jnp.asarray(adapter[path + "_lora_b"], jnp.float32)
        n, r = a.shape[0], lora.rank
        delta = jnp.einsum("lpr,lrq->lpq", a.reshape(n, -1, r), b.reshape(n, r, -1))
        kernel = flat[path]
        flat[path] = (jnp.asarray(kernel, jnp.float32)
                      + lora.alpha / r * delta.reshape(kernel.shape)).astype(kernel.dtype)
    return nest(flat)


class AdapterExportError(ValueError):
    """Adapters that a PEFT LoRA file cannot hold as they are."""


def peft_tensors(config: ModelConfig, lora: LoraSpec, adapters: Params,
                 naming: str = "transformers") -> tuple[dict[str, np.ndarray], list[str]]:
    """The adapters as a PEFT LoRA adapter's tensors (``base_model.model.<module>.lora_A.weight``
    ``[r, in]``, ``lora_B.weight`` ``[out, r]``, per layer) and its ``target_modules``. The
    projection must be one torch ``Linear`` of the Hugging Face model (GPT-2's fused ``c_attn``
    and ``Conv1D`` layers are not)."""
    kmap = family_of(config).keymap(config, naming)
    flat = {p: np.asarray(v, np.float32) for p, v in flatten(adapters).items()}
    tensors, modules = {}, []
    for target in lora.targets:
        path = projections(config)[target]
        entry = next((e for e in kmap.entries if path in e.paths), None)
        if entry is None or len(entry.paths) != 1 or not entry.transpose:
            raise AdapterExportError(
                f"adapter on {target}: the {config.family} Hugging Face layer holding it"
                f" ({entry.name if entry else 'none'}) is not one torch Linear, so PEFT cannot"
                " load it; export the merged model instead")
        module = entry.name.removesuffix(".weight")
        modules.append(module.rsplit(".", 1)[-1])
        a, b = flat[path + "_lora_a"], flat[path + "_lora_b"]
        n, r = a.shape[0], lora.rank
        for i in range(n):
            name = "base_model.model." + module.format(i=i)
            tensors[name + ".lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            tensors[name + ".lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    return tensors, modules


def peft_config(lora: LoraSpec, target_modules: list[str], base_model: str | None) -> dict:
    """``adapter_config.json`` of a PEFT LoRA adapter for a causal LM."""
    return dict(peft_type="LORA", task_type="CAUSAL_LM", r=lora.rank, lora_alpha=lora.alpha,
                target_modules=sorted(target_modules), lora_dropout=lora.dropout, bias="none",
                fan_in_fan_out=False, use_rslora=False, base_model_name_or_path=base_model,
                inference_mode=True)
