"""FP8 matmuls with per-tensor current scaling (Hopper and later GPUs; emulated exactly elsewhere).

``fp8_matmul(x, w)`` computes ``x @ w`` for 16-bit ``x`` and ``w`` with both operands rounded to float8 e4m3
and, in the backward pass, the incoming gradient rounded to float8 e5m2 (more range, less precision: the usual
recipe). Each operand is scaled by ``fp8_max / amax(|operand|)`` before rounding, with the amax of the tensor
itself ("current scaling"): no state, no history, the same function of the inputs on every step.

Contract: the result has ``x``'s dtype and equals ``x @ w`` up to the float8 rounding of the operands; it is a
pure function of its inputs. Speed and quality measurements: benchmarks/RESULTS.md, "FP8 matmuls".

The quantise-dequantise pattern ``convert(f8 -> bf16) * scale`` feeding a dot is what XLA's GPU compiler
rewrites into a cuBLASLt FP8 GEMM with the scales applied in the epilogue; on CPU it computes the same rounded
values in 16 or 32 bits, so tests see the numerics the GPU runs. The forward pass keeps the e4m3 operands as
residuals for the backward pass (half the bytes of bf16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2


def quantize(x: Array, dtype: jnp.dtype) -> tuple[Array, Array]:
    """``(q, inverse_scale)`` with ``q = round_to_dtype(x * scale)``, ``scale = fp8_max / amax(|x|)``, so that
    ``q * inverse_scale`` approximates ``x``; values are clipped to the finite range first."""
    scale = scale_for(jnp.max(jnp.abs(x)).astype(jnp.float32), dtype)
    return quantize_with(x, scale, dtype), (1.0 / scale).astype(jnp.float32)


def scale_for(amax: Array, dtype: jnp.dtype) -> Array:
    """``fp8_max / amax`` (float32), or 1 where ``amax`` is 0: the scale that maps ``amax`` onto the top of the
    range of ``dtype``."""
    limit = float(jnp.finfo(dtype).max)
    return jnp.where(amax > 0.0, limit / jnp.maximum(amax, 1e-30), 1.0).astype(jnp.float32)


def quantize_with(x: Array, scale: Array, dtype: jnp.dtype) -> Array:
    """``round_to_dtype(x * scale)`` with values clipped to the finite range first (saturation)."""
    limit = float(jnp.finfo(dtype).max)
    return jnp.clip(x.astype(jnp.float32) * scale, -limit, limit).astype(dtype)


def dequantize(q: Array, inverse_scale: Array, dtype: jnp.dtype) -> Array:
    return q.astype(dtype) * inverse_scale.astype(dtype)


def dot(a: Array, b: Array, dtype: jnp.dtype, contract: tuple[tuple[int, ...], tuple[int, ...]]) -> Array:
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=dtype)


def fp8_matmul(x: Array, w: Array) -> Array:
    """``x @ w`` (``x``: ``(..., k)``, ``w``: ``(k, n)``, both of one 16-bit dtype) through e4m3 operands."""
    if x.dtype != w.dtype:
        raise TypeError(f"fp8_matmul: operands of one dtype expected, got {x.dtype} and {w.dtype}")
    # 2-D operands: the GEMM rewrite matches a plain (m, k) x (k, n) dot
    return _fp8_matmul_2d(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


@jax.custom_vjp
def _fp8_matmul_2d(x: Array, w: Array) -> Array:
    return _fp8_matmul_fwd(x, w)[0]


def _fp8_matmul_fwd(x: Array, w: Array) -> tuple[Array, tuple]:
    dtype = x.dtype
    xq, xs = quantize(x, E4M3)
    wq, ws = quantize(w, E4M3)
    y = dot(dequantize(xq, xs, dtype), dequantize(wq, ws, dtype), dtype, ((1,), (0,)))
    return y, (xq, xs, wq, ws)


def _fp8_matmul_bwd(res: tuple, g: Array) -> tuple[Array, Array]:
    xq, xs, wq, ws = res
    dtype = g.dtype
    gq, gs = quantize(g, E5M2)
    g_dq = dequantize(gq, gs, dtype)
    dx = dot(g_dq, dequantize(wq, ws, dtype), dtype, ((1,), (1,)))  # g @ w.T
    dw = dot(dequantize(xq, xs, dtype), g_dq, jnp.float32, ((0,), (0,)))  # x.T @ g, float32 accumulation
    return dx, dw.astype(dtype)


_fp8_matmul_2d.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)
