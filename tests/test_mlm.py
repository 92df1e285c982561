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


# --- whole-word masking ---------------------------------------------------------------------------------------

CONTINUATION = np.arange(VOCAB) >= 600  # ids 600.. stand for "##" pieces: words of 1.67 tokens on average


def _words(row: np.ndarray) -> list[list[int]]:
    """The words of one row, written plainly: a non-special token that is not a continuation, or that follows
    a special token or the row start, begins a word; continuation pieces after it belong to it."""
    words: list[list[int]] = []
    for i, token in enumerate(row):
        if token in SPECIALS:
            continue
        if CONTINUATION[token] and i > 0 and row[i - 1] not in SPECIALS:
            words[-1].append(i)
        else:
            words.append([i])
    return words


def _wwm(ids, key, max_predictions=40, probability=0.15):
    return _wwm_jit(jnp.asarray(ids), key, special_ids=SPECIALS, mask_id=MASK, vocab_size=VOCAB,
                    probability=probability, max_predictions=max_predictions, continuation=CONTINUATION)


_wwm_jit = jax.jit(mask_tokens, static_argnames=("special_ids", "mask_id", "vocab_size", "probability",
                                                 "max_predictions"))


def _chosen(out, row: int) -> set[int]:
    return set(np.asarray(out.positions)[row][np.asarray(out.weights)[row] > 0].tolist())


@pytest.mark.parametrize("max_predictions, probability", [(40, 0.15), (6, 0.3)], ids=["rate", "cap"])
def test_whole_word_masking_masks_whole_words_within_the_budget(max_predictions, probability):
    ids = _ids(64, 128, seed=5)
    ids[:8, 1:4] = 700  # rows beginning with a cut word ([CLS] then continuation pieces) ...
    ids[8:16, 0:3] = 650  # ... and rows whose first tokens are continuation pieces (a chunk start)
    out = _wwm(ids, jax.random.key(5), max_predictions, probability)
    n_eligible = (~np.isin(ids, SPECIALS)).sum(1)
    budget = np.minimum(np.maximum(np.floor(probability * n_eligible + 0.5), 1), max_predictions)
    short = 0
    for row in range(ids.shape[0]):
        chosen = _chosen(out, row)
        assert len(set(np.asarray(out.positions)[row])) == max_predictions  # distinct slots
        taken = [w for w in _words(ids[row]) if chosen & set(w)]
        assert all(set(w) <= chosen for w in taken)  # every touched word is masked whole
        assert sum(len(w) for w in taken) == len(chosen) <= budget[row]
        short += len(chosen) < budget[row]
    assert short <= 2  # a word that fits the remaining budget is (nearly) always found
    changed = np.asarray(out.input_ids) != ids
    touched = np.zeros_like(changed)
    np.put_along_axis(touched, np.asarray(out.positions), np.asarray(out.weights) > 0, axis=1)
    assert not (changed & ~touched).any()
    np.testing.assert_array_equal(np.asarray(out.targets), np.take_along_axis(ids, np.asarray(out.positions), 1))
    # the cut words at the row starts are words too (checked above); make sure the case occurs here
    cut = [{1, 2, 3}] * 8 + [{0, 1, 2}] * 8
    assert any(cut[r] <= _chosen(out, r) for r in range(16))


def test_whole_word_masking_rate_and_80_10_10_per_token():
    ids = _ids(512, 128, seed=6)
    out = _wwm(ids, jax.random.key(6))
    used = np.asarray(out.weights) > 0
    eligible = (~np.isin(ids, SPECIALS)).sum()
    assert abs(used.sum() / eligible - 0.15) < 0.005
    lengths = [len(w) for r in range(64) for w in _words(ids[r]) if set(w) & _chosen(out, r)]
    assert max(lengths) > 1  # multi-piece words do get masked
    new = np.take_along_axis(np.asarray(out.input_ids), np.asarray(out.positions), axis=1)[used]
    old = np.asarray(out.targets)[used]
    n = used.sum()
    for observed, p in (((new == MASK).mean(), 0.8), ((new == old).mean(), 0.1 + 0.1 / (VOCAB - 5))):
        assert abs(observed - p) < 4 * np.sqrt(p * (1 - p) / n), (observed, p)
    # per token, not per word: some masked words are partly [MASK] and partly not
    mixed = 0
    for r in range(64):
        positions = np.asarray(out.positions)[r]
        slot = dict(zip(positions.tolist(), np.asarray(out.input_ids)[r][positions]))
        for w in _words(ids[r]):
            if len(w) > 1 and set(w) <= _chosen(out, r):
                mixed += len({slot[i] == MASK for i in w}) > 1
    assert mixed > 0


def test_whole_word_masking_is_deterministic_and_off_by_default():
    ids = _ids(8, 64, seed=7)
    a, b = _wwm(ids, jax.random.key(8)), _wwm(ids, jax.random.key(8))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(_wwm(ids, jax.random.key(9)).positions), np.asarray(a.positions))
    eager = mask_tokens(jnp.asarray(ids), jax.random.key(8), special_ids=SPECIALS, mask_id=MASK, vocab_size=VOCAB,
                        probability=0.15, max_predictions=40, continuation=CONTINUATION)
    for x, y in zip(a, eager):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # a table without continuation pieces masks the same number of tokens as token-level masking
    singles = mask_tokens(jnp.asarray(ids), jax.random.key(8), special_ids=SPECIALS, mask_id=MASK, vocab_size=VOCAB,
                          probability=0.15, max_predictions=40, continuation=np.zeros(VOCAB, bool))
    np.testing.assert_array_equal(np.asarray(singles.weights).sum(1),
                                  np.asarray(_mask(ids, jax.random.key(8)).weights).sum(1))


def test_continuation_table_marks_wordpiece_continuations():
    from jaxbert.data.mlm import continuation_table

    table = np.frombuffer(continuation_table(["[PAD]", "##", "##ing", "the", "#x", "##s"]), np.uint8)
    np.testing.assert_array_equal(table, [0, 0, 1, 0, 0, 1])
