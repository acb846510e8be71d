"""The training state: one pytree holding everything a resumed run needs (besides the data state).

    state = create_train_state(run_cfg, model_cfg, mesh, rules)             # random init, sharded
    state = create_train_state(run_cfg, model_cfg, mesh, rules, params=p)   # from a checkpoint
    shardings = train_state_shardings(run_cfg, model_cfg, mesh, rules)     # restore targets too

Everything is derived from the two configs, so the abstract state (for orbax restore targets) and
its shardings can be rebuilt on any topology without touching device memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from diffujax.models import abstract_params, init_params, param_shardings
from diffujax.parallel.mesh import replicated
from diffujax.train.optim import make_optimizer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: number of steps taken (applied or skipped)
    params: Any  # the parameter tree (models.params) of float32 master weights
    opt_state: Any  # optax state; its moments mirror ``params`` (same logical axes)
    rng: jax.Array  # uint32 key data of the run's base key; step keys are fold_in(rng, step)
    ema: Any  # a tree like params, or None when ``optimizer.ema_decay`` is unset
    bad_steps: jax.Array  # int32: consecutive skipped (non-finite) steps
    total_bad_steps: jax.Array  # int32: skipped steps over the whole run

    @property
    def applied_steps(self) -> jax.Array:
        """Updates actually applied: the optimizer's own step count, which drives the schedule."""
        return self.step - self.total_bad_steps

    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def optimizer_for(run_cfg, model_cfg) -> optax.GradientTransformation:
    return make_optimizer(run_cfg.optimizer, run_cfg.train.steps, model_cfg)


def init_train_state(params, optimizer: optax.GradientTransformation, *, seed: int,
                     use_ema: bool, param_dtype=jnp.float32) -> TrainState:
    """A step-0 state around ``params`` (cast to the master dtype); pure, to jit with
    out_shardings."""
    params = jax.tree.map(lambda p: p.astype(param_dtype), params)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)),
                      ema=jax.tree.map(jnp.copy, params) if use_ema else None,
                      bad_steps=zero, total_bad_steps=zero)


def _init_fn(run_cfg, model_cfg):
    optimizer = optimizer_for(run_cfg, model_cfg)
    use_ema = run_cfg.optimizer.ema_decay is not None
    dtype = jnp.dtype(model_cfg.param_dtype)

    def init(params=None):
        if params is None:
            params = init_params(model_cfg, run_cfg.model.init_seed)
        return init_train_state(params, optimizer, seed=run_cfg.train.seed, use_ema=use_ema,
                                param_dtype=dtype)

    return init


def abstract_train_state(run_cfg, model_cfg) -> TrainState:
    """The state's structure with ``ShapeDtypeStruct`` leaves."""
    return jax.eval_shape(_init_fn(run_cfg, model_cfg), abstract_params(model_cfg))


def train_state_shardings(run_cfg, model_cfg, mesh, rules=None) -> TrainState:
    """``NamedSharding`` per state leaf: params, EMA and optimizer moments by their weights'
    logical axes, counters and the rng replicated. Which optimizer-state leaves mirror a weight
    is optax's answer (``tree_map_params``), not a guess from names or shapes."""
    weights = param_shardings(model_cfg, mesh, rules)
    state = abstract_train_state(run_cfg, model_cfg)
    everywhere = replicated(mesh)
    opt_state = optax.tree_map_params(
        optimizer_for(run_cfg, model_cfg), lambda _, sharding: sharding, state.opt_state, weights,
        transform_non_params=lambda _: everywhere)
    return TrainState(step=everywhere, params=weights, opt_state=opt_state, rng=everywhere,
                      ema=None if state.ema is None else weights, bad_steps=everywhere,
                      total_bad_steps=everywhere)


def create_train_state(run_cfg, model_cfg, mesh, rules=None, params=None) -> TrainState:
    """A sharded step-0 state. Without ``params`` the model is initialised (seed
    ``model.init_seed``) directly in its shards; with ``params`` (e.g. from ``store.load``) they
    are cast to the master dtype and laid out as the rules say."""
    shardings = train_state_shardings(run_cfg, model_cfg, mesh, rules)
    init = _init_fn(run_cfg, model_cfg)
    with jax.set_mesh(mesh):
        if params is None:
            return jax.jit(init, out_shardings=shardings)()
        return jax.jit(init, out_shardings=shardings)(params)


def params_of(state: TrainState, ema: bool = False):
    """The weights to evaluate or export: the EMA when asked for and kept, else the params."""
    return state.ema if ema and state.ema is not None else state.params
