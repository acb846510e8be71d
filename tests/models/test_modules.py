"""The Flax NNX modules against the weight table, and what the module form promises.

- every family's module tree holds exactly the table's weights: the same paths, shapes, dtypes
  and logical axes (the ``out_sharding`` metadata), and a module that leaves a table weight
  unused is refused;
- the model object and the functional form (``forward`` over the plain tree) give the same
  logits, for the full and the cached forward pass;
- the layers are scanned: the traced program does not grow with depth.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffujax import models
from diffujax.attention import causal
from diffujax.models import GPT2Config, LlamaConfig, Qwen2Config, flatten
from diffujax.models.params import ParamSpec, Weights

CONFIGS = {
    "llama": LlamaConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=24, param_dtype="bfloat16"),
    "qwen2": Qwen2Config(vocab_size=40, hidden_size=16, num_layers=2, num_heads=4,
                         num_kv_heads=1, intermediate_size=24, tie_word_embeddings=True),
    "gpt2": GPT2Config(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2,
                       num_kv_heads=2, intermediate_size=64, max_positions=16),
}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_module_tree_is_the_weight_table(family):
    config = CONFIGS[family]
    model = models.build(config, seed=1)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    table = models.param_specs(config)
    assert {"/".join(map(str, path)) for path in params} == set(table)
    for path, variable in params.items():
        spec = table["/".join(map(str, path))]
        assert variable.get_value().shape == spec.shape
        assert variable.get_value().dtype == jnp.dtype(config.param_dtype)
        assert variable.get_metadata()["out_sharding"] == spec.axes
    # nothing but weights in the state (no hidden buffers a checkpoint would miss)
    assert len(jax.tree.leaves(nnx.state(model))) == len(table)


def test_initial_values_follow_the_table():
    config = CONFIGS["gpt2"]
    flat = flatten(models.init_params(config, seed=3))
    table = models.param_specs(config)
    for path, spec in table.items():
        if spec.init == "ones":
            assert np.all(np.asarray(flat[path]) == 1), path
        elif spec.init == "zeros":
            assert np.all(np.asarray(flat[path]) == 0), path
        else:  # normal(0, std): the sample's spread within 20% of std on these sizes
            assert abs(float(np.std(flat[path])) / spec.std - 1) < 0.2, path
    again = flatten(models.init_params(config, seed=3))
    other = flatten(models.init_params(config, seed=4))
    assert all(np.array_equal(flat[p], again[p]) for p in table)
    assert not np.array_equal(flat["wte/embedding"], other["wte/embedding"])


def test_a_module_that_skips_a_table_weight_is_refused():
    class Partial(nnx.Module):
        def __init__(self, weights):
            self.a = weights.param("a")
            weights.check_complete("Partial")

    specs = {"a": ParamSpec((2,), (None,)), "b": ParamSpec((2,), (None,))}
    with pytest.raises(ValueError, match=r"Partial does not use weight\(s\) \['b'\]"):
        Partial(Weights(specs, "float32", jax.random.key(0)))
    with pytest.raises(KeyError, match="'c' is not in the family's weight table"):
        Weights(specs, "float32", jax.random.key(0)).param("c")


@pytest.mark.parametrize("family", list(CONFIGS))
def test_model_object_and_functional_form_agree(family):
    config = CONFIGS[family].replace(param_dtype="float32")
    model = models.build(config, seed=2)
    params = models.init_params(config, seed=2)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, config.vocab_size)
    expected = model(tokens, causal())
    np.testing.assert_array_equal(models.forward(config, params, tokens, causal()), expected)
    cache = models.init_cache(config, 2, 8)
    logits, _ = model.decode(tokens, causal(), cache, 0)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_traced_program_does_not_grow_with_depth():
    def size(layers):
        config = CONFIGS["llama"].replace(num_layers=layers)
        params = models.abstract_params(config)
        tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda p, t: models.forward(config, p, t, causal()))(
            params, tokens)
        return len(jaxpr.jaxpr.eqns)

    assert size(2) == size(12)
