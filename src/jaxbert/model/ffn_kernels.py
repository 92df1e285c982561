"""The feed-forward block's second half, ``y = gelu(pre) @ w``, with the GELU derivative fused into the backward
GEMM that produces it.

The backward pass of ``y = gelu(pre) @ w`` is ``d_pre = (g @ w.T) * gelu'(pre)`` and ``d_w = gelu(pre).T @ g``.
XLA runs ``g @ w.T`` as a cuBLAS GEMM that writes a ``(tokens, ffn)`` tensor, then a second pass reads it back
with ``pre`` and writes ``d_pre``: at the budget shape (32,768 tokens x 2,048) 0.53 ms of a 8.7 ms step
(``benchmarks/RESULTS.md``, "Throughput II"). cuBLASLt has a DGELU epilogue for this; XLA does not form it.

* ``xla``: the reference, jnp math; the derivative is recomputed from ``pre`` in float32 (as
  :func:`jaxbert.model.layers.gelu`'s backward does) and multiplied into XLA's GEMM output.
* ``pallas``: one Pallas (Triton) GEMM per output tile of ``d_pre`` that multiplies its float32 accumulator by
  ``gelu'(pre)`` before the single store: ``g @ w.T`` never reaches memory.
* ``pallas_interpret``: the same kernel in Pallas's interpreter (any backend; tests).

Same residuals as the unfused path: ``pre``, ``gelu(pre)`` (for ``d_w``) and ``w``. Tile sizes are fixed
(:data:`BLOCK_M` x :data:`BLOCK_N`, k-steps of :data:`BLOCK_K`); the row count is padded to the tile, the
widths must be multiples of their tiles (the presets' are: ffn 2048/3072, hidden 512/768).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .pallas_gpu import launch

Array = jax.Array

IMPLEMENTATIONS = ("xla", "pallas", "pallas_interpret")
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 64


def gelu_slope(x: Array, approximate: bool) -> Array:
    """``gelu'(x)`` in float32 (tanh approximation or exact)."""
    x = x.astype(jnp.float32)
    if approximate:
        c = math.sqrt(2.0 / math.pi)
        t = jnp.tanh(c * (x + 0.044715 * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
    cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
    return cdf + x * jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))


def fits(ffn: int, hidden: int) -> bool:
    """Whether the kernel's tiles divide the widths."""
    return ffn % BLOCK_N == 0 and hidden % BLOCK_K == 0


def gelu_matmul(pre: Array, w: Array, approximate: bool, implementation: str = "xla") -> Array:
    """``gelu(pre) @ w`` in ``pre``'s dtype: ``pre`` is ``(..., ffn)``, ``w`` ``(ffn, hidden)`` (cast to
    ``pre``'s dtype). The backward pass computes ``d_pre`` with ``implementation`` (module docstring)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"ffn implementation: expected one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "xla" and not fits(*w.shape):
        raise ValueError(f"ffn implementation {implementation}: needs ffn % {BLOCK_N} == 0 and hidden % "
                         f"{BLOCK_K} == 0, got w of shape {w.shape}")
    return _gelu_matmul(pre, w.astype(pre.dtype), approximate, implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _gelu_matmul(pre: Array, w: Array, approximate: bool, implementation: str) -> Array:
    return jax.nn.gelu(pre, approximate=approximate) @ w


def _gelu_matmul_fwd(pre, w, approximate, implementation):
    h = jax.nn.gelu(pre, approximate=approximate)
    return h @ w, (pre, h, w)


def _gelu_matmul_bwd(approximate, implementation, res, g):
    pre, h, w = res
    g = g.astype(pre.dtype)
    rows = pre.reshape(-1, pre.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    d_w = h.reshape(-1, h.shape[-1]).T @ g2
    if implementation == "xla":
        d_pre = ((g2 @ w.T).astype(jnp.float32) * gelu_slope(rows, approximate)).astype(pre.dtype)
    else:
        d_pre = _fused_backward(g2, w, rows, approximate, implementation == "pallas_interpret")
    return d_pre.reshape(pre.shape), d_w


_gelu_matmul.defvjp(_gelu_matmul_fwd, _gelu_matmul_bwd)


def _kernel(g_ref, w_ref, pre_ref, out_ref, *, approximate: bool, k_steps: int) -> None:
    """One (BLOCK_M, BLOCK_N) tile of ``(g @ w.T) * gelu'(pre)``: ``g_ref`` (BLOCK_M, hidden), ``w_ref``
    (BLOCK_N, hidden), ``pre_ref`` / ``out_ref`` (BLOCK_M, BLOCK_N)."""

    def step(k, acc):
        cols = pl.ds(pl.multiple_of(k * BLOCK_K, BLOCK_K), BLOCK_K)
        return acc + jax.lax.dot_general(g_ref[:, cols], w_ref[:, cols], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, k_steps, step, jnp.zeros((BLOCK_M, BLOCK_N), jnp.float32))
    out_ref[...] = (acc * gelu_slope(pre_ref[...], approximate)).astype(out_ref.dtype)


def _fused_backward(g: Array, w: Array, pre: Array, approximate: bool, interpret: bool) -> Array:
    """``(g @ w.T) * gelu'(pre)`` for ``g`` (n, hidden), ``w`` (ffn, hidden), ``pre`` (n, ffn)."""
    n, hidden = g.shape
    ffn = w.shape[0]
    pad = -n % BLOCK_M
    if pad:
        g = jnp.pad(g, ((0, pad), (0, 0)))
        pre = jnp.pad(pre, ((0, pad), (0, 0)))
    grid = ((n + pad) // BLOCK_M, ffn // BLOCK_N)
    out = pl.pallas_call(
        functools.partial(_kernel, approximate=approximate, k_steps=hidden // BLOCK_K),
        grid=grid,
        in_specs=[pl.BlockSpec((BLOCK_M, hidden), lambda i, j: (i, 0)),
                  pl.BlockSpec((BLOCK_N, hidden), lambda i, j: (j, 0)),
                  pl.BlockSpec((BLOCK_M, BLOCK_N), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((BLOCK_M, BLOCK_N), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((n + pad, ffn), pre.dtype),
        **launch("gelu_matmul_bwd", num_warps=4, interpret=interpret, num_stages=3),
    )(g, w, pre)
    return out[:n]
