"""Masked-language-model corruption (BERT's 80/10/10), a pure jittable function of (ids, key).

Per sequence, exactly ``n = min(max(1, round(p * n_eligible)), max_predictions)`` positions are chosen
uniformly among the eligible (non-special) tokens: each eligible position gets a uniform random score and the
``max_predictions`` highest scores are taken with ``lax.top_k`` (static shapes); the first ``n`` slots are
used, the rest get weight 0. Each chosen position becomes ``[MASK]`` with probability 0.8, a random
non-special token with probability 0.1, and stays unchanged with probability 0.1.

Unused slots still hold distinct, in-bounds positions (their original tokens as targets), so a sparse MLM head
can gather them without special cases; their weight is 0.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray


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


def mask_tokens(ids: Int[Array, "b s"], key: PRNGKeyArray, *, special_ids: Sequence[int], mask_id: int,
                vocab_size: int, probability: float = 0.15, max_predictions: int) -> MLMBatch:
    """Choose and corrupt MLM positions; see the module docstring. All keyword arguments are static."""
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
