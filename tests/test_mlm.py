"""MLM masking: exact counts, 80/10/10 statistics, no special token touched, jit == no-jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbert.data.mlm import mask_tokens, random_non_special

SPECIALS = (0, 1, 2, 3, 4)  # pad unk cls sep mask
MASK = 4
VOCAB = 1000


def _ids(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    """Random text tokens with [CLS] first, a few [SEP]s inside and [PAD] tails of random length."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, size=(batch, seq))
    ids[:, 0] = 2
    seps = rng.integers(1, seq, size=(batch, 3))
    np.put_along_axis(ids, seps, 3, axis=1)
    for row, pad in enumerate(rng.integers(0, seq // 2, size=batch)):
        if pad:
            ids[row, seq - pad:] = 0
    return ids.astype(np.int32)


def _mask(ids, key, max_predictions=40, probability=0.15, jit=True):
    fn = _mask_jit if jit else mask_tokens
    return fn(jnp.asarray(ids), key, special_ids=SPECIALS, mask_id=MASK, vocab_size=VOCAB,
              probability=probability, max_predictions=max_predictions)


_mask_jit = jax.jit(mask_tokens, static_argnames=("special_ids", "mask_id", "vocab_size", "probability",
                                                  "max_predictions"))


def test_counts_positions_and_specials():
    ids = _ids(64, 128)
    with jax.numpy_rank_promotion("raise"):
        out = _mask(ids, jax.random.key(0))
    weights, positions = np.asarray(out.weights), np.asarray(out.positions)
    n_eligible = (~np.isin(ids, SPECIALS)).sum(1)
    expected = np.minimum(np.maximum(np.floor(0.15 * n_eligible + 0.5), 1), 40)
    np.testing.assert_array_equal(weights.sum(1), expected)
    for row in range(ids.shape[0]):
        assert len(set(positions[row])) == positions.shape[1]  # distinct slots
        used = positions[row][weights[row] > 0]
        assert not np.isin(ids[row, used], SPECIALS).any()  # never a special position
    np.testing.assert_array_equal(np.asarray(out.targets), np.take_along_axis(ids, positions, axis=1))
    # everything outside the used positions is untouched
    changed = np.asarray(out.input_ids) != ids
    touched = np.zeros_like(changed)
    np.put_along_axis(touched, positions, weights > 0, axis=1)
    assert not (changed & ~touched).any()
    assert out.input_ids.dtype == jnp.int32 and out.weights.dtype == jnp.float32


def test_80_10_10_within_sampling_error():
    ids = _ids(256, 128, seed=1)
    out = _mask(ids, jax.random.key(1))
    used = np.asarray(out.weights) > 0
    new = np.take_along_axis(np.asarray(out.input_ids), np.asarray(out.positions), axis=1)[used]
    old = np.asarray(out.targets)[used]
    n = used.sum()
    masked, kept = (new == MASK).mean(), (new == old).mean()
    replaced = 1.0 - masked - kept
    for observed, p in ((masked, 0.8), (replaced, 0.1 * (1 - 1 / (VOCAB - 5))), (kept, 0.1 + 0.1 / (VOCAB - 5))):
        assert abs(observed - p) < 4 * np.sqrt(p * (1 - p) / n), (observed, p)
    random_tokens = new[(new != MASK) & (new != old)]
    assert not np.isin(random_tokens, SPECIALS).any()
    eligible = (~np.isin(ids, SPECIALS)).sum()
    assert abs(n / eligible - 0.15) < 0.005  # exact per-row rounding keeps the total at 15%


def test_jit_matches_eager_and_is_deterministic():
    ids = _ids(4, 32, seed=2)
    eager = _mask(ids, jax.random.key(3), max_predictions=6, jit=False)
    jitted = _mask(ids, jax.random.key(3), max_predictions=6)
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = _mask(ids, jax.random.key(4), max_predictions=6)
    assert not np.array_equal(np.asarray(other.positions), np.asarray(eager.positions))


def test_all_special_row_is_left_alone():
    ids = np.array([[2, 3, 0, 0, 0, 0, 0, 0], [2, 7, 8, 9, 10, 11, 12, 3]], np.int32)
    out = _mask(ids, jax.random.key(0), max_predictions=4, probability=0.15)
    np.testing.assert_array_equal(np.asarray(out.weights)[0], 0)
    np.testing.assert_array_equal(np.asarray(out.input_ids)[0], ids[0])
    assert np.asarray(out.weights)[1].sum() == 1  # round(0.15 * 6) = 1


def test_random_tokens_cover_the_non_special_ids_uniformly():
    specials = (0, 5, 6, 11)  # not contiguous, as in published vocabularies ([PAD]=0, [UNK]=100, ...)
    draw = jax.jit(random_non_special, static_argnums=(1, 2, 3))
    draws = np.asarray(draw(jax.random.key(0), (60000,), 12, specials))
    allowed = [i for i in range(12) if i not in specials]
    counts = np.bincount(draws, minlength=12)
    assert set(np.flatnonzero(counts)) == set(allowed)
    expected = len(draws) / len(allowed)
    assert np.all(np.abs(counts[allowed] - expected) < 5 * np.sqrt(expected))


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_predictions"):
        _mask(_ids(2, 16), jax.random.key(0), max_predictions=17)
    with pytest.raises(ValueError, match="shape"):
        _mask(np.zeros(16, np.int32), jax.random.key(0), max_predictions=2)
