"""Logical axis rules: activations have names of their own, and colliding rules are errors.

The model-level check traces a real forward pass and reads every sharding constraint it puts on
an activation, so it fails if a model constrains an activation with a weight's name.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffujax.attention import causal
from diffujax.config import MeshSection, MeshShape
from diffujax.models import GPT2Config, LlamaConfig, apply_fn_for, init_params
from diffujax.parallel.logical import DEFAULT_RULES, HIDDEN, LOGITS, QUERY, logical_to_spec
from diffujax.parallel.mesh import Layout, make_mesh

SIZES = {"data": 2, "fsdp": 4, "tensor": 1}
BATCH_ON_DATA = MeshSection(rules={"activation_batch": ["data"]}).rule_table()


def test_default_table_shards_weights_and_activations_separately():
    assert logical_to_spec(HIDDEN, DEFAULT_RULES, SIZES) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("vocab", "embed"), DEFAULT_RULES, SIZES) == P(None, "fsdp")
    # The batch on `data` only: the hidden dimension of activations stays whole (with one name
    # for both it would have taken the freed `fsdp`), the weights keep their FSDP sharding.
    assert logical_to_spec(HIDDEN, BATCH_ON_DATA, SIZES) == P("data", None, None)
    assert logical_to_spec(("vocab", "embed"), BATCH_ON_DATA, SIZES) == P(None, "fsdp")


def test_two_names_on_one_mesh_axis_is_an_error():
    rules = dict(DEFAULT_RULES, vocab="fsdp")
    with pytest.raises(ValueError, match="mesh axis 'fsdp' is mapped from both 'vocab' and"
                                         " 'embed'"):
        logical_to_spec(("vocab", "embed"), tuple(rules.items()), SIZES)
    # Also when the mesh axis has size 1 here: the table is wrong for any mesh.
    with pytest.raises(ValueError, match="'fsdp'"):
        logical_to_spec(("vocab", "embed"), tuple(rules.items()), {"fsdp": 1})


def _constraints(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            yield eqn.params["sharding"].spec
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _constraints(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _constraints(sub)


@pytest.mark.parametrize("config", [
    LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=64),
    GPT2Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
               intermediate_size=64, max_positions=16),
], ids=["llama", "gpt2"])
def test_models_constrain_activations_by_activation_names(config):
    apply_fn, params = apply_fn_for(config), init_params(config)
    mesh = make_mesh(MeshSection(shape=MeshShape(2, 4, 1)))
    tokens = np.zeros((8, 16), np.int32)
    with Layout(mesh, BATCH_ON_DATA).active():
        jaxpr = jax.make_jaxpr(lambda p, x: apply_fn(p, x, causal()))(params, tokens)
    specs = list(_constraints(jaxpr.jaxpr))
    # hidden states (embedding, each block), q, logits; the scan body is traced once
    assert len(specs) >= 4
    for spec in specs:
        assert spec[0] == "data" and all(s is None for s in spec[1:]), spec
    assert {len(s) for s in specs} == {len(HIDDEN), len(QUERY), len(LOGITS)}  # all three kinds
