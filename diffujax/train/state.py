"""The training state: one pytree holding everything a resumed run needs (besides the data state).

    state = create_train_state(run_cfg, model_cfg, layout)             # random init, sharded
    state = create_train_state(run_cfg, model_cfg, layout, params=p)   # from a checkpoint
    shardings = train_state_shardings(run_cfg, model_cfg, layout)     # restore targets too

Everything is derived from the two configs, so the abstract state (for orbax restore targets) and
its shardings can be rebuilt on any topology without touching device memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from diffujax.models import abstract_params, apply_fn_for, init_params, lora, param_shardings
from diffujax.parallel.mesh import Layout
from diffujax.runs.flops import train_flops_per_token
from diffujax.train.optim import make_optimizer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: number of steps taken (applied or skipped)
    params: Any  # the trained parameter tree of float32 master weights: the model's weights
    # (models.params), or with ``model.lora`` the adapters (models/lora.py)
    opt_state: Any  # optax state; its moments mirror ``params`` (same logical axes)
    rng: jax.Array  # uint32 key data of the run's base key; step keys are fold_in(rng, step)
    ema: Any  # a tree like params, or None when ``optimizer.ema_decay`` is unset
    bad_steps: jax.Array  # int32: consecutive skipped (non-finite) steps
    total_bad_steps: jax.Array  # int32: skipped steps over the whole run
    frozen: Any = None  # with ``model.lora``: the base weights (never updated); else None

    @property
    def applied_steps(self) -> jax.Array:
        """Updates actually applied: the optimizer's own step count, which drives the schedule."""
        return self.step - self.total_bad_steps

    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def optimizer_for(run_cfg, model_cfg) -> optax.GradientTransformation:
    spec = run_cfg.lora_spec(model_cfg)
    decays = None if spec is None else lora.adapter_decay_mask(model_cfg, spec)
    return make_optimizer(run_cfg.optimizer, run_cfg.train.steps, model_cfg, mask=decays)


def apply_fn_for_run(run_cfg, model_cfg):
    """The network as the train step and the evaluators call it: ``apply_fn(params, tokens,
    pattern, ...)`` over ``model_params(state)``'s tree (with LoRA: the adapted model over the
    base weights joined with the adapters)."""
    spec = run_cfg.lora_spec(model_cfg)
    return apply_fn_for(model_cfg) if spec is None else lora.apply_fn_for(model_cfg, spec)


def model_flops_per_token(run_cfg, model_cfg) -> float:
    """Model FLOPs of one training token of this run (``runs.flops``; LoRA counts no weight
    gradient for the frozen base)."""
    spec = run_cfg.lora_spec(model_cfg)
    adapters = None if spec is None else lora.adapter_params(model_cfg, spec)
    return train_flops_per_token(model_cfg, run_cfg.data.seq_len, adapters)


def init_train_state(params, optimizer: optax.GradientTransformation, *, seed: int,
                     use_ema: bool, param_dtype=jnp.float32, frozen=None) -> TrainState:
    """A step-0 state around ``params`` (cast to the master dtype; ``frozen``: LoRA's base
    weights, kept as they are); pure, to jit with out_shardings."""
    params = jax.tree.map(lambda p: p.astype(param_dtype), params)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)),
                      ema=jax.tree.map(jnp.copy, params) if use_ema else None,
                      bad_steps=zero, total_bad_steps=zero, frozen=frozen)


def _init_fn(run_cfg, model_cfg):
    optimizer = optimizer_for(run_cfg, model_cfg)
    use_ema = run_cfg.optimizer.ema_decay is not None
    spec = run_cfg.lora_spec(model_cfg)

    def init(params=None):
        if params is None:
            params = init_params(model_cfg, run_cfg.model.init_seed)
        if spec is None:
            return init_train_state(params, optimizer, seed=run_cfg.train.seed,
                                    use_ema=use_ema, param_dtype=model_cfg.param_dtype)
        # LoRA: the adapters train in float32; the base stays in the model's parameter dtype
        adapters = lora.init_adapters(model_cfg, spec, run_cfg.model.init_seed)
        frozen = jax.tree.map(lambda p: p.astype(model_cfg.param_dtype), params)
        return init_train_state(adapters, optimizer, seed=run_cfg.train.seed, use_ema=use_ema,
                                frozen=frozen)

    return init


def abstract_train_state(run_cfg, model_cfg) -> TrainState:
    """The state's structure with ``ShapeDtypeStruct`` leaves."""
    return jax.eval_shape(_init_fn(run_cfg, model_cfg), abstract_params(model_cfg))


def train_state_shardings(run_cfg, model_cfg, layout: Layout) -> TrainState:
    """``NamedSharding`` per state leaf: params, EMA and optimizer moments by their weights'
    logical axes, counters and the rng replicated. Which optimizer-state leaves mirror a weight
    is optax's answer (``tree_map_params``), not a guess from names or shapes."""
    base = param_shardings(model_cfg, layout)
    spec = run_cfg.lora_spec(model_cfg)
    weights = base if spec is None else lora.adapter_shardings(model_cfg, spec, layout)
    state = abstract_train_state(run_cfg, model_cfg)
    everywhere = layout.replicated()
    opt_state = optax.tree_map_params(
        optimizer_for(run_cfg, model_cfg), lambda _, sharding: sharding, state.opt_state, weights,
        transform_non_params=lambda _: everywhere)
    return TrainState(step=everywhere, params=weights, opt_state=opt_state, rng=everywhere,
                      ema=None if state.ema is None else weights, bad_steps=everywhere,
                      total_bad_steps=everywhere, frozen=None if spec is None else base)


def create_train_state(run_cfg, model_cfg, layout: Layout, params=None) -> TrainState:
    """A sharded step-0 state. Without ``params`` the model is initialised (seed
    ``model.init_seed``) directly in its shards; with ``params`` (e.g. from ``store.load``) they
    are cast to the master dtype and laid out as the rules say."""
    shardings = train_state_shardings(run_cfg, model_cfg, layout)
    init = _init_fn(run_cfg, model_cfg)
    with jax.set_mesh(layout.mesh):
        return jax.jit(init, out_shardings=shardings)(*([] if params is None else [params]))


def params_of(state: TrainState, ema: bool = False):
    """The trained weights: the EMA when asked for and kept, else the params."""
    return state.ema if ema and state.ema is not None else state.params


def model_params(state: TrainState, ema: bool = False):
    """The tree ``apply_fn_for_run`` takes: ``params_of``, joined with LoRA's base weights."""
    trained = params_of(state, ema)
    return trained if state.frozen is None else lora.join(state.frozen, trained)


def export_params(state: TrainState, run_cfg, model_cfg, ema: bool = False):
    """Plain model weights to save as a model checkpoint: with LoRA, the base with the adapters
    folded in (``lora.merged``)."""
    trained = params_of(state, ema)
    if state.frozen is None:
        return trained
    return lora.merged(model_cfg, run_cfg.lora_spec(model_cfg), state.frozen, trained)
