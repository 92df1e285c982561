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

Same residuals as the unfused path: ``pre``, ``gelu(pre)`` (for ``d_w``) and ``w``. Tiles: ``block_m`` x
``block_n`` outputs per program, k-steps of ``block_k`` (:class:`KernelOptions`); the row count is padded to
the tile; ffn must be a multiple of ``block_n`` and hidden of ``block_k`` (checked; the defaults :data:`BLOCK_N`
and :data:`BLOCK_K` divide the presets' ffn 2048/3072 and hidden 512/768). The model's ``impl.ffn=xla`` does not call
this module: it keeps the unfused ``activation`` + matmul path.

Measured on an H200 (``benchmarks/kernels/check_ffn.py``, RESULTS.md "Throughput II, fifth session"): exact to
bf16, but slower than the unfused path: forward + backward 1.41 ms (default tiles) / 0.94 ms (64x128x64, 4 warps,
4 stages) against 0.78 ms at 2048 x 512; the Triton GEMM loses more to cuBLAS than the fused pass saves.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..config import FFN_KERNEL_MULTIPLES
from .pallas_gpu import launch

Array = jax.Array

IMPLEMENTATIONS = ("xla", "pallas", "pallas_interpret")
BLOCK_N, BLOCK_K = FFN_KERNEL_MULTIPLES  # what the widths must be multiples of (the default tiles)


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Launch settings of the kernel; they change speed, never results."""

    block_m: int = 128  # output rows per program
    block_n: int = BLOCK_N  # output columns per program (must divide ffn)
    block_k: int = BLOCK_K  # reduction step (must divide hidden)
    num_warps: int = 4
    num_stages: int = 3


def gelu_slope(x: Array, approximate: bool) -> Array:
    """``gelu'(x)`` in float32 (tanh approximation or exact)."""
    x = x.astype(jnp.float32)
    if approximate:
        c = math.sqrt(2.0 / math.pi)
        t = jnp.tanh(c * (x + 0.044715 * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
    cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
    return cdf + x * jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))


def gelu_matmul(pre: Array, w: Array, approximate: bool, implementation: str = "xla",
                options: KernelOptions = KernelOptions()) -> Array:
    """``gelu(pre) @ w`` in ``pre``'s dtype: ``pre`` is ``(..., ffn)``, ``w`` ``(ffn, hidden)`` (cast to
    ``pre``'s dtype). The backward pass computes ``d_pre`` with ``implementation`` (module docstring)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"ffn implementation: expected one of {IMPLEMENTATIONS}, got {implementation!r}")
    ffn, hidden = w.shape
    if implementation != "xla" and (ffn % options.block_n or hidden % options.block_k):
        raise ValueError(f"ffn implementation {implementation}: needs ffn % {options.block_n} == 0 and hidden % "
                         f"{options.block_k} == 0 (block_n must divide ffn, block_k hidden), got ffn={ffn}, "
                         f"hidden={hidden} with {options}")
    return _gelu_matmul(pre, w.astype(pre.dtype), approximate, implementation, options)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _gelu_matmul(pre: Array, w: Array, approximate: bool, implementation: str, options: KernelOptions) -> Array:
    return jax.nn.gelu(pre, approximate=approximate) @ w


def _gelu_matmul_fwd(pre, w, approximate, implementation, options):
    h = jax.nn.gelu(pre, approximate=approximate)
    return h @ w, (pre, h, w)


def _gelu_matmul_bwd(approximate, implementation, options, res, g):
    pre, h, w = res
    g = g.astype(pre.dtype)
    rows = pre.reshape(-1, pre.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    d_w = h.reshape(-1, h.shape[-1]).T @ g2
    if implementation == "xla":
        d_pre = ((g2 @ w.T).astype(jnp.float32) * gelu_slope(rows, approximate)).astype(pre.dtype)
    else:
        d_pre = _fused_backward(g2, w, rows, approximate, implementation == "pallas_interpret", options)
    return d_pre.reshape(pre.shape), d_w


_gelu_matmul.defvjp(_gelu_matmul_fwd, _gelu_matmul_bwd)


def _kernel(g_ref, w_ref, pre_ref, out_ref, *, approximate: bool, options: KernelOptions, k_steps: int) -> None:
    """One (block_m, block_n) tile of ``(g @ w.T) * gelu'(pre)``: ``g_ref`` (block_m, hidden), ``w_ref``
    (block_n, hidden), ``pre_ref`` / ``out_ref`` (block_m, block_n)."""
    bk = options.block_k

    def step(k, acc):
        cols = pl.ds(pl.multiple_of(k * bk, bk), bk)
        return acc + jax.lax.dot_general(g_ref[:, cols], w_ref[:, cols], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, k_steps, step, jnp.zeros((options.block_m, options.block_n), jnp.float32))
    out_ref[...] = (acc * gelu_slope(pre_ref[...], approximate)).astype(out_ref.dtype)


def _fused_backward(g: Array, w: Array, pre: Array, approximate: bool, interpret: bool,
                    options: KernelOptions) -> Array:
    """``(g @ w.T) * gelu'(pre)`` for ``g`` (n, hidden), ``w`` (ffn, hidden), ``pre`` (n, ffn)."""
    n, hidden = g.shape
    ffn = w.shape[0]
    bm, bn = options.block_m, options.block_n
    pad = -n % bm
    if pad:
        g = jnp.pad(g, ((0, pad), (0, 0)))
        pre = jnp.pad(pre, ((0, pad), (0, 0)))
    out = pl.pallas_call(
        functools.partial(_kernel, approximate=approximate, options=options, k_steps=hidden // options.block_k),
        grid=((n + pad) // bm, ffn // bn),
        in_specs=[pl.BlockSpec((bm, hidden), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, hidden), lambda i, j: (j, 0)),
                  pl.BlockSpec((bm, bn), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((n + pad, ffn), pre.dtype),
        **launch("gelu_matmul_bwd", num_warps=options.num_warps, interpret=interpret,
                 num_stages=options.num_stages),
    )(g, w, pre)
    return out[:n]
