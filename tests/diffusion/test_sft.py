"""SFT data contract (docs/algorithms.md §4). Reference: the sequences written out by hand from the
docs/algorithms.md layout ``[BOS] + prompt + [SEP] + answer + [EOS] + [PAD]...``; and the
objective's normalisations on that layout computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np

from diffujax.diffusion import NoisedBatch, build_sft_example, loss_sums_from_logits

BOS, SEP, EOS, PAD = 1, 2, 3, 0
IDS = dict(bos_id=BOS, sep_id=SEP, eos_id=EOS, pad_id=PAD)


def sft_batch(pairs, **kwargs):
    """``(tokens [B, length], src [B, length])``, the examples stacked."""
    tokens, src = zip(*(build_sft_example(p, a, **kwargs) for p, a in pairs))
    return np.stack(tokens), np.stack(src)


def test_layout_with_padding():
    tokens, src = build_sft_example([10, 11], [20, 21, 22], length=10, **IDS)
    np.testing.assert_array_equal(tokens, [BOS, 10, 11, SEP, 20, 21, 22, EOS, PAD, PAD])
    np.testing.assert_array_equal(src, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    assert tokens.dtype == np.int32 and src.dtype == bool


def test_prompt_is_left_truncated_first():
    tokens, src = build_sft_example([10, 11, 12, 13], [20, 21], length=7, **IDS)
    np.testing.assert_array_equal(tokens, [BOS, 12, 13, SEP, 20, 21, EOS])  # oldest tokens go
    np.testing.assert_array_equal(src, [1, 1, 1, 1, 0, 0, 0])


def test_answer_is_cut_only_when_the_prompt_is_gone():
    tokens, src = build_sft_example([10, 11], [20, 21, 22, 23, 24], length=5, **IDS)
    np.testing.assert_array_equal(tokens, [BOS, SEP, 20, 21, 22])  # no room for EOS either
    np.testing.assert_array_equal(src, [1, 1, 0, 0, 0])


def test_without_separator():
    tokens, src = sft_batch([([10], [20]), ([10, 11, 12], [20, 21])], length=6, bos_id=BOS,
                            eos_id=EOS, pad_id=PAD)
    np.testing.assert_array_equal(tokens, [[BOS, 10, 20, EOS, PAD, PAD],
                                           [BOS, 11, 12, 20, 21, EOS]])
    np.testing.assert_array_equal(src, [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])


def test_padding_is_a_target_and_the_three_normalisations():
    """Answer, EOS and PAD are targets; "tokens" divides by all targets, "masked" by the noised
    ones, "sequence" averages each row's sum over its own target count. Two targets are left
    clean, so the three denominators differ."""
    tokens, src = sft_batch([([10], [20]), ([10, 11], [20, 21, 22])], length=8, **IDS)
    tokens, src = jnp.asarray(tokens), jnp.asarray(src)
    # noised: all non-src positions but row 0's last PAD and row 1's "21"
    noise = ~src & ~jnp.zeros((2, 8), bool).at[0, 7].set(True).at[1, 5].set(True)
    t = jnp.array([0.5, 0.25])
    logits = jax.random.normal(jax.random.key(0), (2, 8, 32))
    noised = NoisedBatch(t, noise, jnp.where(noise, 31, tokens))
    ce = -jax.nn.log_softmax(logits[:, :-1], axis=-1)
    ce = np.asarray(jnp.take_along_axis(ce, tokens[:, 1:, None], axis=-1)[..., 0])
    noised_targets = np.asarray(noise[:, 1:])
    # row 0 [BOS 10 SEP | 20 EOS PAD PAD PAD], row 1 [BOS 10 11 SEP | 20 21 22 EOS]
    targets = np.asarray(~src[:, 1:]).sum(axis=1)
    assert targets.tolist() == [5, 4] and noised_targets.sum(axis=1).tolist() == [4, 3]
    per_row = (ce * noised_targets).sum(axis=1) / np.asarray(t)
    expected = {"tokens": per_row.sum() / 9, "masked": per_row.sum() / 7,
                "sequence": (per_row / [5, 4]).mean()}
    assert len({round(float(v), 6) for v in expected.values()}) == 3  # distinguishable
    for normalization, value in expected.items():
        sums = jax.jit(loss_sums_from_logits, static_argnames="normalization")(
            logits, tokens, noised, src=src, normalization=normalization)
        np.testing.assert_allclose(sums.loss, value, rtol=1e-5)
