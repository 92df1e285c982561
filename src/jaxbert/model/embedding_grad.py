"""Embedding lookup ``table[ids]`` with a choice of how the backward pass accumulates the table's gradient.

* ``scatter``: what autodiff of ``jnp.take`` does: one scatter-add of every token's cotangent row into its
  table row. On a GPU the adds are atomic, and natural text repeats a few ids very often (``[MASK]`` is ~12% of
  a pretraining batch, "the", "," and "." a few per cent each): thousands of adds to the same row serialise.
* ``sorted``: sort the ids, cut the sorted rows into blocks of :data:`BLOCK` rows and sum the rows of each id
  within a block with one small matmul per block (a 0/1 matrix, segments x rows, times the block's cotangent
  rows, accumulated in float32), then scatter-add one row per (block, id). An id that fills whole blocks now
  costs one add per block; the matmuls are a few GFLOP. Exact up to float32 summation order when the cotangent
  is representable in ``grad_dtype`` (true in the encoder: the embedding sum is cast to the compute dtype right
  after the lookup, so its cotangent comes from that dtype).
* ``auto``: ``sorted`` on a single GPU, else ``scatter`` (sorting sharded ids would gather them).

Tables of a few rows (segment embeddings) use :func:`small_lookup` instead, whatever the implementation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("auto", "scatter", "sorted")
BLOCK = 128  # sorted rows per block: one (BLOCK x BLOCK) @ (BLOCK x hidden) matmul per block


def resolve(implementation: str) -> str:
    """The implementation ``auto`` stands for on this backend; other names are returned as given."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"embedding gradient: expected one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "auto":
        return implementation
    return "sorted" if jax.default_backend() == "gpu" and jax.device_count() == 1 else "scatter"


def lookup(table: Array, ids: Array, grad_dtype: jnp.dtype = jnp.float32, implementation: str = "scatter") -> Array:
    """``table[ids]`` (rows of ``table`` for an integer array ``ids``, any shape). ``grad_dtype``: the dtype the
    output's cotangent is exactly representable in (see the module docstring); only ``sorted`` uses it."""
    if resolve(implementation) == "scatter":
        return jnp.take(table, ids, axis=0)
    return _sorted_lookup(table, ids, jnp.dtype(grad_dtype))


def small_lookup(table: Array, ids: Array) -> Array:
    """``table[ids]`` for a table of a few rows, as a masked sum over the rows: the forward values are exact and
    the gradient is a plain reduction over the tokens (a scatter-add into two rows makes every add collide)."""
    hit = ids[..., None] == jnp.arange(table.shape[0], dtype=ids.dtype)
    return jnp.sum(jnp.where(hit[..., None], table, jnp.zeros((), table.dtype)), axis=-2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _sorted_lookup(table: Array, ids: Array, grad_dtype: jnp.dtype) -> Array:
    return jnp.take(table, ids, axis=0)


def _sorted_lookup_fwd(table: Array, ids: Array, grad_dtype: jnp.dtype):
    # the table itself is not kept: only its shape and dtype, as a zero-size stand-in
    return jnp.take(table, ids, axis=0), (ids, jnp.zeros((table.shape[0], 0), table.dtype))


def _sorted_lookup_bwd(grad_dtype: jnp.dtype, residuals, g: Array):
    ids, shape_of_table = residuals
    vocab = shape_of_table.shape[0]
    d_table = sorted_segment_rows(ids.reshape(-1), g.reshape(-1, g.shape[-1]).astype(grad_dtype), vocab)
    return d_table.astype(shape_of_table.dtype), None


_sorted_lookup.defvjp(_sorted_lookup_fwd, _sorted_lookup_bwd)


def sorted_segment_rows(ids: Array, rows: Array, vocab: int, block: int = BLOCK) -> Array:
    """``zeros((vocab, hidden)).at[ids].add(rows)`` in float32, summing equal ids block-wise first (see the
    module docstring). ``ids``: (n,) integers in [0, vocab); ``rows``: (n, hidden)."""
    n, hidden = rows.shape
    pad = -n % block
    # padding rows get id ``vocab``: they sort last and their sums are dropped by the final scatter
    ids = jnp.concatenate([ids.astype(jnp.int32), jnp.full((pad,), vocab, jnp.int32)])
    rows = jnp.concatenate([rows, jnp.zeros((pad, hidden), rows.dtype)])
    order = jnp.argsort(ids)
    ids, rows = ids[order].reshape(-1, block), rows[order].reshape(-1, block, hidden)
    # segment number of each row within its block: 0 for the first row, +1 wherever the id changes
    starts = jnp.concatenate([jnp.zeros_like(ids[:, :1]), (ids[:, 1:] != ids[:, :-1]).astype(jnp.int32)], axis=1)
    segment = jnp.cumsum(starts, axis=1)
    member = segment[:, None, :] == jnp.arange(block, dtype=jnp.int32)[None, :, None]  # (blocks, seg, row)
    sums = jnp.einsum("bsr,brh->bsh", member.astype(rows.dtype), rows, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)
    # each segment's id (``vocab`` for unused segment slots: dropped)
    segment_ids = jnp.max(jnp.where(member, ids[:, None, :], -1), axis=-1)
    segment_ids = jnp.where(segment_ids < 0, vocab, segment_ids)
    return jnp.zeros((vocab, hidden), jnp.float32).at[segment_ids.reshape(-1)].add(
        sums.reshape(-1, hidden), mode="drop")
