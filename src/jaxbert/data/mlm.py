"""Masked-language-model corruption (BERT's 80/10/10), a pure jittable function of (ids, key).

Per sequence, exactly ``n = min(max(1, round(p * n_eligible)), max_predictions)`` positions are chosen
uniformly among the eligible (non-special) tokens: each eligible position gets a uniform random score and the
``max_predictions`` highest scores are taken with ``lax.top_k`` (static shapes); the first ``n`` slots are
used, the rest get weight 0. Each chosen position becomes ``[MASK]`` with probability 0.8, a random
non-special token with probability 0.1, and stays unchanged with probability 0.1.

Unused slots still hold distinct, in-bounds positions (their original tokens as targets), so a sparse MLM head
can gather them without special cases; their weight is 0.

Whole-word masking (``continuation``: a boolean table over the vocabulary, True for WordPiece "##" pieces, from
:func:`continuation_table`): a word is an eligible token that is not a continuation (or follows a special
token, or starts the row: a word cut at a chunk start is a word too) with the continuation tokens after it.
The budget stays ``n`` tokens, filled with whole words only: words are visited in a random order and each one
that still fits in the remaining budget is taken (a word longer than the remainder is skipped, so at the cap
``max_predictions`` a row gets at most ``n`` tokens, and a little fewer when no remaining word fits). The
80/10/10 replacement is drawn per token.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

_WORD_PASSES = 3  # visits of the shuffled words that fill the budget (the later ones take words skipped as too long)


class MLMBatch(NamedTuple):
    input_ids: Int[Array, "b s"]  # corrupted ids fed to the model
    positions: Int[Array, "b m"]  # positions to predict (distinct within a row)
    targets: Int[Array, "b m"]  # original ids at those positions
    weights: Float[Array, "b m"]  # 1.0 for real predictions, 0.0 for unused slots


def random_non_special(key: PRNGKeyArray, shape: tuple[int, ...], vocab_size: int,
                       special_ids: Sequence[int]) -> Int[Array, "..."]:
    """Uniform token ids from ``[0, vocab_size)`` minus ``special_ids``.

    Draws ``r`` uniformly among the ``vocab_size - k`` allowed ids and maps it to the ``r``-th allowed id:
    ``r + #{j : r >= s_j - j}`` for the sorted specials ``s_0 < s_1 < ...`` (``s_j - j`` allowed ids lie below
    ``s_j``).
    """
    specials = sorted({int(s) for s in special_ids if 0 <= int(s) < vocab_size})
    if vocab_size - len(specials) < 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no non-special token to sample")
    draw = jax.random.randint(key, shape, 0, vocab_size - len(specials), dtype=jnp.int32)
    if not specials:
        return draw
    thresholds = jnp.asarray([s - j for j, s in enumerate(specials)], jnp.int32).reshape((1,) * len(shape) + (-1,))
    return draw + (draw[..., None] >= thresholds).sum(axis=-1, dtype=jnp.int32)


def continuation_table(vocab: Sequence[str]) -> bytes:
    """One byte per token id, 1 for a WordPiece continuation piece ("##..."): whole-word masking's table, as
    hashable bytes for the static step settings (``np.frombuffer(table, np.uint8) > 0`` is the boolean table)."""
    return bytes(int(token.startswith("##") and len(token) > 2) for token in vocab)


def _whole_words(ids: Array, eligible: Array, n_mask: Array, continuation: Array, score: Array) -> Bool[Array, "b s"]:
    """Positions of whole words that make up at most ``n_mask`` tokens per row (see the module docstring)."""
    batch, seq = ids.shape
    table = jnp.asarray(continuation, bool)
    piece = jnp.take(table, ids, axis=0, mode="fill", fill_value=False)
    after_eligible = jnp.pad(eligible[:, :-1], ((0, 0), (1, 0)))
    starts = eligible & ~(piece & after_eligible)
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    word = jnp.where(eligible, jax.lax.cummax(jnp.where(starts, pos, -1), axis=1), -1)  # start of each word
    word_score = jnp.where(eligible, jnp.take_along_axis(score, jnp.maximum(word, 0), axis=1), 2.0)
    # Words in a random order (ties between words broken by their start), each word's tokens together and in
    # order; ineligible tokens last. In this order a word is the run of equal ``word`` values.
    _, word, pos = jax.lax.sort((word_score, word, pos), dimension=1, num_keys=2)
    eligible = word >= 0
    edge = jnp.full((batch, 1), -1, jnp.int32)
    first = eligible & (word != jnp.concatenate([edge, word[:, :-1]], axis=1))
    last = eligible & (word != jnp.concatenate([word[:, 1:], edge], axis=1))
    index = jnp.arange(seq, dtype=jnp.int32)[None, :]
    begin = jax.lax.cummax(jnp.where(first, index, 0), axis=1)
    end = jax.lax.cummin(jnp.where(last, index, seq), axis=1, reverse=True)
    length = end - begin + 1
    taken = jnp.zeros((batch, seq), bool)
    for _ in range(_WORD_PASSES):
        budget = n_mask[:, None] - taken.sum(axis=1, keepdims=True, dtype=jnp.int32)
        candidate = eligible & ~taken & (length <= budget)
        total = jnp.cumsum(candidate, axis=1, dtype=jnp.int32)  # candidate tokens up to here, in word order
        word_total = jax.lax.cummin(jnp.where(last & candidate, total, seq + 1), axis=1, reverse=True)
        taken = taken | (candidate & (word_total <= budget))
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None]
    return jnp.zeros((batch, seq), bool).at[rows, pos].set(taken, unique_indices=True)


def mask_tokens(ids: Int[Array, "b s"], key: PRNGKeyArray, *, special_ids: Sequence[int], mask_id: int,
                vocab_size: int, probability: float = 0.15, max_predictions: int,
                continuation: Optional[Bool[Array, " vocab"] | np.ndarray] = None) -> MLMBatch:
    """Choose and corrupt MLM positions; see the module docstring. The keyword arguments other than
    ``continuation`` are static; ``continuation`` (a boolean table over token ids) turns on whole-word masking."""
    ids = jnp.asarray(ids, jnp.int32)
    if ids.ndim != 2:
        raise ValueError(f"mask_tokens: expected ids of shape (batch, seq), got {ids.shape}")
    batch, seq = ids.shape
    if not 0 < max_predictions <= seq:
        raise ValueError(f"mask_tokens: max_predictions={max_predictions} must be in [1, seq_len={seq}]")
    k_select, k_action, k_random = jax.random.split(key, 3)

    specials = jnp.asarray(sorted({int(s) for s in special_ids}), jnp.int32).reshape(1, 1, -1)
    eligible = ~(ids[:, :, None] == specials).any(axis=-1)
    n_eligible = eligible.sum(axis=1)
    wanted = jnp.floor(probability * n_eligible.astype(jnp.float32) + 0.5).astype(jnp.int32)
    n_mask = jnp.minimum(jnp.minimum(jnp.maximum(wanted, 1), n_eligible), max_predictions)

    scores = jnp.where(eligible, jax.random.uniform(k_select, ids.shape), -1.0)
    if continuation is not None:  # chosen words first, then the other eligible positions
        chosen = _whole_words(ids, eligible, n_mask, continuation, scores)
        n_mask = chosen.sum(axis=1, dtype=jnp.int32)
        scores = jnp.where(chosen, scores + 2.0, scores)
    _, positions = jax.lax.top_k(scores, max_predictions)  # distinct positions, eligible ones first
    positions = positions.astype(jnp.int32)
    used = jnp.arange(max_predictions, dtype=jnp.int32)[None, :] < n_mask[:, None]
    targets = jnp.take_along_axis(ids, positions, axis=1)

    action = jax.random.uniform(k_action, positions.shape)
    replacement = jnp.where(action < 0.8, jnp.int32(mask_id),
                            jnp.where(action < 0.9, random_non_special(k_random, positions.shape, vocab_size,
                                                                        special_ids), targets))
    new_values = jnp.where(used, replacement, targets)
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None]
    corrupted = ids.at[rows, positions].set(new_values, unique_indices=True)
    return MLMBatch(corrupted, positions, targets, used.astype(jnp.float32))
