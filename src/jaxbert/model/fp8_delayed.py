"""FP8 matmuls with delayed scaling: scales from an amax history of earlier steps; the current amax recorded.

Current scaling (:mod:`jaxbert.model.fp8`) reduces each operand to its amax before it can quantise it: an extra
memory-bound pass over every activation and gradient. Delayed scaling takes the scale from the amaxes of the
previous steps instead, so quantising is a multiply and a cast that XLA can fuse into the op producing the
operand; the operand's amax is still computed (a reduction over the same values, fusable into that pass) and
recorded for the next steps.

* State: :class:`Fp8History`, float32 ``(layers, SITES, 3, length)``: for every encoder layer, each of its six
  FP8 matmuls (:data:`SITE_NAMES`) and each operand (x, w, and the incoming gradient g) the amaxes of the last
  ``length`` optimizer steps, newest first. It lives in the training state (``TrainState.fp8``), not in the
  model: the optimizer never sees it, exported weights do not carry it, checkpoints save it with the rest of the
  training state.
* Scales: ``fp8_max / (max(history) * 2**margin)`` (x, w: e4m3; g: e5m2), 1 for an all-zero history. Operands are
  clipped to the finite range (saturation).
* Recording: :func:`delayed_matmul` takes its three scales as an input, and its custom backward pass returns, as
  the "cotangent" of those scales, the current amaxes of (x, w, g). That value is a statistic, not a derivative:
  it rides the gradient so that the amax of g, which exists only in the backward pass, comes out of the one
  ``jax.grad`` call with everything else. The train step takes the max over its micro-batches and rolls it into
  the history (:meth:`Fp8History.record`) once per optimizer step.

With a history whose maximum equals the current amax, the result is bit-identical to current scaling's
:func:`jaxbert.model.fp8.fp8_matmul` (the same scales, rounding and dequantise-and-dot pattern that XLA's GPU
compiler rewrites into a cuBLASLt FP8 GEMM).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .fp8 import E4M3, E5M2, dequantize, dot, quantize_with, scale_for

SITE_NAMES = ("q", "k", "v", "out", "ffn_in", "ffn_out")  # the FP8 matmuls of one encoder layer, in this order
SITES = len(SITE_NAMES)
OPERANDS = ("x", "w", "g")  # x, w rounded to e4m3; g (the incoming gradient) to e5m2
_DTYPES = (E4M3, E4M3, E5M2)


def _absmax(x: Array) -> Array:
    return jnp.max(jnp.abs(x)).astype(jnp.float32)



def scales_from_amax(amax: Float[Array, "... 3"], margin: float = 0.0) -> Float[Array, "... 3"]:
    """The (x, w, g) scales for amaxes ``(..., 3)``: ``fp8_max / (amax * 2**margin)`` in each operand's format."""
    return jnp.stack([scale_for(amax[..., i] * 2.0**margin, dtype) for i, dtype in enumerate(_DTYPES)], axis=-1)


class Fp8History(eqx.Module):
    """Amax histories of the delayed-scaling matmuls of a stack of encoder layers (not trained)."""

    amax: Float[Array, "layers sites 3 length"]  # newest first

    @classmethod
    def create(cls, layers: int, length: int) -> "Fp8History":
        """An all-zero history: scale 1 for every operand until the first step has been recorded."""
        return cls(jnp.zeros((layers, SITES, len(OPERANDS), length), jnp.float32))

    def scales(self, margin: float = 0.0) -> Float[Array, "layers sites 3"]:
        """The scales the next step uses: from the largest amax of the history."""
        return scales_from_amax(jnp.max(self.amax, axis=-1), margin)

    def record(self, amax: Float[Array, "layers sites 3"]) -> "Fp8History":
        """The history with ``amax`` (one step's) as its newest entry and the oldest dropped."""
        rolled = jnp.roll(self.amax, 1, axis=-1)
        return Fp8History(rolled.at[..., 0].set(amax.astype(jnp.float32)))


def delayed_matmul(x: Array, w: Array, scales: Float[Array, "3"]) -> Array:
    """``x @ w`` (``x``: ``(..., k)``, ``w``: ``(k, n)``, one 16-bit dtype) through float8 operands quantised with
    the given (x, w, g) ``scales``. The gradient with respect to ``scales`` is the current (amax(x), amax(w),
    amax(g)), not a derivative (see the module docstring)."""
    if x.dtype != w.dtype:
        raise TypeError(f"delayed_matmul: operands of one dtype expected, got {x.dtype} and {w.dtype}")
    y = _delayed_2d(x.reshape(-1, x.shape[-1]), w, scales.astype(jnp.float32))
    return y.reshape(*x.shape[:-1], w.shape[-1])


@jax.custom_vjp
def _delayed_2d(x: Array, w: Array, scales: Array) -> Array:
    return _delayed_fwd(x, w, scales)[0]


def _delayed_fwd(x: Array, w: Array, scales: Array) -> tuple[Array, tuple]:
    dtype = x.dtype
    inverse = (1.0 / scales).astype(jnp.float32)
    xq, wq = quantize_with(x, scales[0], E4M3), quantize_with(w, scales[1], E4M3)
    y = dot(dequantize(xq, inverse[0], dtype), dequantize(wq, inverse[1], dtype), dtype, ((1,), (0,)))
    return y, (xq, wq, scales, jnp.stack([_absmax(x), _absmax(w)]))


def _delayed_bwd(res: tuple, g: Array) -> tuple[Array, Array, Array]:
    xq, wq, scales, amax_xw = res
    dtype = g.dtype
    inverse = (1.0 / scales).astype(jnp.float32)
    g_dq = dequantize(quantize_with(g, scales[2], E5M2), inverse[2], dtype)
    dx = dot(g_dq, dequantize(wq, inverse[1], dtype), dtype, ((1,), (1,)))  # g @ w.T
    dw = dot(dequantize(xq, inverse[0], dtype), g_dq, jnp.float32, ((0,), (0,)))  # x.T @ g, float32 accumulation
    return dx, dw.astype(dtype), jnp.concatenate([amax_xw, _absmax(g)[None]])


_delayed_2d.defvjp(_delayed_fwd, _delayed_bwd)
