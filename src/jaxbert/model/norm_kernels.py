"""LayerNorm, with an optional residual add in front: ``s = x + h``, ``y = LayerNorm(s)``, in two implementations.

* ``xla``: jnp math; the reference. :func:`reference_layer_norm` keeps today's custom VJP (float32 statistics,
  a backward pass that keeps only the input and two float32 numbers per row); the add is left to XLA.
* ``pallas``: one Pallas kernel (Triton backend, GPU) per direction over blocks of rows. The forward pass reads
  ``x`` and ``h`` once and writes ``s``, ``y`` and the row statistics; the backward pass reads ``s``, the two
  cotangents and the statistics once and writes ``ds = g_s + LN'(g_y)`` (the cotangent of both ``x`` and ``h``)
  and per-program partial sums of ``d_scale`` / ``d_bias``, which XLA adds up afterwards.
* ``pallas_interpret``: the same kernels run by Pallas's interpreter, on any backend (for tests).
* ``auto``: ``pallas`` on a single GPU for 16-bit inputs, else ``xla``. (A Pallas call has no sharding rule:
  under a multi-device mesh XLA would gather its operands, so ``auto`` leaves sharded runs on XLA.)

Rows are all leading axes flattened; a block is ``block_rows`` rows by the width rounded up to a power of two
(Triton's block shapes are powers of two), with loads and stores masked at both edges.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .pallas_gpu import launch, plgpu  # Triton's masked load/store

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret")
BLOCK_ELEMENTS = 4096  # rows per block = this / padded width (1024 wide: 4 rows; 256 wide: 16), at least 1
BACKWARD_PROGRAMS = 512  # the backward grid is about this many programs, each looping over several blocks


def resolve(implementation: str, dtype: jnp.dtype) -> str:
    """The implementation ``auto`` stands for, given the input dtype; other names are returned as given."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"norm implementation: expected one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "auto":
        return implementation
    single_gpu = jax.default_backend() == "gpu" and jax.device_count() == 1
    return "pallas" if single_gpu and plgpu is not None and dtype in (jnp.bfloat16, jnp.float16) else "xla"


def layer_norm(x: Array, scale: Array, bias: Array, eps: float, implementation: str = "xla") -> Array:
    """LayerNorm over the last axis with float32 statistics; the output has ``x``'s dtype."""
    return add_layer_norm(x, None, scale, bias, eps, implementation)[1]


def add_layer_norm(x: Array, h: Optional[Array], scale: Array, bias: Array, eps: float,
                   implementation: str = "xla") -> tuple[Array, Array]:
    """``(s, LayerNorm(s))`` with ``s = x + h`` in ``x``'s dtype (``s = x`` when ``h`` is None)."""
    implementation = resolve(implementation, x.dtype)
    if h is not None:
        h = h.astype(x.dtype)
    if implementation == "xla":
        s = x if h is None else x + h
        return s, reference_layer_norm(s, scale, bias, eps)
    interpret = implementation == "pallas_interpret"
    if h is None:
        return x, _norm(x, scale, bias, eps, interpret)
    return _add_norm(x, h, scale, bias, eps, interpret)


# --------------------------------------------------------------------------------------------- the reference


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def reference_layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    """LayerNorm in jnp. The backward pass keeps ``x`` (compute dtype) and two float32 numbers per row, and
    recomputes the normalised values; autodiff would keep float32 copies of the whole activation instead."""
    return _reference_fwd(x, scale, bias, eps)[0]


def _reference_fwd(x: Array, scale: Array, bias: Array, eps: float) -> tuple[Array, tuple]:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + eps)
    y = (x32 - mean) * rstd * scale + bias
    return y.astype(x.dtype), (x, mean, rstd, scale)


def _reference_bwd(eps: float, res: tuple, g: Array) -> tuple[Array, Array, Array]:
    x, mean, rstd, scale = res
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g32 = g.astype(jnp.float32)
    rows = tuple(range(x.ndim - 1))
    d_scale, d_bias = jnp.sum(g32 * xhat, axis=rows), jnp.sum(g32, axis=rows)
    gs = g32 * scale
    dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


reference_layer_norm.defvjp(_reference_fwd, _reference_bwd)


# ------------------------------------------------------------------------------------------ the Pallas kernels


def _layout(width: int) -> tuple[int, int, int]:
    """(padded width, rows per block, warps per program) for a row width."""
    padded = 1 << (width - 1).bit_length()
    block_rows = max(1, BLOCK_ELEMENTS // padded)
    return padded, block_rows, 8 if block_rows * padded >= 4096 else 4



def _load(ref, mask: Array) -> Array:
    return plgpu.load(ref, mask=mask, other=0.0).astype(jnp.float32)


def _block(n: int, width: int, padded: int, block_rows: int, block: Array):
    """Row and column indices of a block, the row and column validity, and the 2-D mask."""
    rows = block * block_rows + jnp.arange(block_rows)
    cols = jnp.arange(padded)
    row_ok, col_ok = rows < n, cols < width
    return rows, cols, row_ok, col_ok, row_ok[:, None] & col_ok[None, :]


def _forward_kernel(*refs, has_h: bool, eps: float, width: int, padded: int, block_rows: int) -> None:
    if has_h:
        x_ref, h_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, s_ref = refs
    else:
        x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref = refs
    rows, cols, row_ok, col_ok, mask = _block(x_ref.shape[0], width, padded, block_rows, pl.program_id(0))
    tile = (rows[:, None], cols[None, :])
    s = _load(x_ref.at[tile], mask)
    if has_h:  # the sum is rounded to the input dtype first, as the XLA path stores it
        s = (s + _load(h_ref.at[tile], mask)).astype(s_ref.dtype)
        plgpu.store(s_ref.at[tile], s, mask=mask)
        s = s.astype(jnp.float32)
    mean = s.sum(axis=1) / width
    centred = jnp.where(mask, s - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt((centred * centred).sum(axis=1) / width + eps)
    y = centred * rstd[:, None] * _load(scale_ref.at[cols], col_ok)[None, :] + _load(bias_ref.at[cols], col_ok)[None, :]
    plgpu.store(y_ref.at[tile], y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref.at[rows], mean, mask=row_ok)
    plgpu.store(rstd_ref.at[rows], rstd, mask=row_ok)


def _backward_kernel(*refs, has_gs: bool, width: int, padded: int, block_rows: int, steps: int) -> None:
    if has_gs:
        s_ref, gy_ref, gs_ref, mean_ref, rstd_ref, scale_ref, ds_ref, dscale_ref, dbias_ref = refs
    else:
        s_ref, gy_ref, mean_ref, rstd_ref, scale_ref, ds_ref, dscale_ref, dbias_ref = refs
    program = pl.program_id(0)
    cols = jnp.arange(padded)
    scale = _load(scale_ref.at[cols], cols < width)

    def one_block(step, sums):
        rows, cols, row_ok, _, mask = _block(s_ref.shape[0], width, padded, block_rows, program * steps + step)
        tile = (rows[:, None], cols[None, :])
        mean, rstd = _load(mean_ref.at[rows], row_ok)[:, None], _load(rstd_ref.at[rows], row_ok)[:, None]
        xhat = jnp.where(mask, (_load(s_ref.at[tile], mask) - mean) * rstd, 0.0)
        gy = _load(gy_ref.at[tile], mask)
        gxhat = gy * scale[None, :]
        c_xhat = (gxhat * xhat).sum(axis=1, keepdims=True) / width
        c_one = gxhat.sum(axis=1, keepdims=True) / width
        ds = rstd * (gxhat - c_one - xhat * c_xhat)
        if has_gs:
            ds = ds + _load(gs_ref.at[tile], mask)
        plgpu.store(ds_ref.at[tile], ds.astype(ds_ref.dtype), mask=mask)
        return sums[0] + (gy * xhat).sum(axis=0), sums[1] + gy.sum(axis=0)

    zeros = jnp.zeros((padded,), jnp.float32)
    d_scale, d_bias = jax.lax.fori_loop(0, steps, one_block, (zeros, zeros))
    plgpu.store(dscale_ref.at[program * padded + cols], d_scale)
    plgpu.store(dbias_ref.at[program * padded + cols], d_bias)


def _forward(x: Array, h: Optional[Array], scale: Array, bias: Array, eps: float, interpret: bool):
    n, width = x.shape
    padded, block_rows, warps = _layout(width)
    kernel = functools.partial(_forward_kernel, has_h=h is not None, eps=eps, width=width, padded=padded,
                               block_rows=block_rows)
    shapes = [jax.ShapeDtypeStruct((n, width), x.dtype), jax.ShapeDtypeStruct((n,), jnp.float32),
              jax.ShapeDtypeStruct((n,), jnp.float32)]
    if h is not None:
        shapes.append(jax.ShapeDtypeStruct((n, width), x.dtype))
    inputs = (x, scale, bias) if h is None else (x, h, scale, bias)
    outs = pl.pallas_call(kernel, out_shape=tuple(shapes), grid=(pl.cdiv(n, block_rows),),
                          **launch("add_layer_norm_fwd", warps, interpret))(*inputs)
    y, mean, rstd = outs[:3]
    return y, (x if h is None else outs[3]), mean, rstd


def _backward(s: Array, gy: Array, gs: Optional[Array], mean: Array, rstd: Array, scale: Array,
              interpret: bool) -> tuple[Array, Array, Array]:
    n, width = s.shape
    padded, block_rows, warps = _layout(width)
    blocks = pl.cdiv(n, block_rows)
    steps = pl.cdiv(blocks, BACKWARD_PROGRAMS)
    programs = pl.cdiv(blocks, steps)
    kernel = functools.partial(_backward_kernel, has_gs=gs is not None, width=width, padded=padded,
                               block_rows=block_rows, steps=steps)
    partial = jax.ShapeDtypeStruct((programs * padded,), jnp.float32)
    inputs = (s, gy, mean, rstd, scale) if gs is None else (s, gy, gs, mean, rstd, scale)
    ds, d_scale, d_bias = pl.pallas_call(
        kernel, out_shape=(jax.ShapeDtypeStruct((n, width), s.dtype), partial, partial), grid=(programs,),
        **launch("add_layer_norm_bwd", warps, interpret))(*inputs)
    total = lambda p: p.reshape(programs, padded)[:, :width].sum(axis=0)  # noqa: E731
    return ds, total(d_scale), total(d_bias)


def _rows(a: Array) -> Array:
    return a.reshape(-1, a.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _norm(x: Array, scale: Array, bias: Array, eps: float, interpret: bool) -> Array:
    """LayerNorm(x) by the Pallas kernels."""
    return _norm_fwd(x, scale, bias, eps, interpret)[0]


def _norm_fwd(x: Array, scale: Array, bias: Array, eps: float, interpret: bool):
    y, _, mean, rstd = _forward(_rows(x), None, scale, bias, eps, interpret)
    return y.reshape(x.shape), (x, mean, rstd, scale)


def _norm_bwd(eps: float, interpret: bool, res: tuple, gy: Array):
    x, mean, rstd, scale = res
    dx, d_scale, d_bias = _backward(_rows(x), _rows(gy), None, mean, rstd, scale, interpret)
    return dx.reshape(x.shape), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


_norm.defvjp(_norm_fwd, _norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _add_norm(x: Array, h: Array, scale: Array, bias: Array, eps: float, interpret: bool) -> tuple[Array, Array]:
    """``(s, LayerNorm(s))`` with ``s = x + h``, by the Pallas kernels."""
    return _add_norm_fwd(x, h, scale, bias, eps, interpret)[0]


def _add_norm_fwd(x: Array, h: Array, scale: Array, bias: Array, eps: float, interpret: bool):
    y, s, mean, rstd = _forward(_rows(x), _rows(h), scale, bias, eps, interpret)
    s = s.reshape(x.shape)
    return (s, y.reshape(x.shape)), (s, mean, rstd, scale)


def _add_norm_bwd(eps: float, interpret: bool, res: tuple, cotangents: tuple[Array, Array]):
    s, mean, rstd, scale = res
    gs, gy = cotangents
    ds, d_scale, d_bias = _backward(_rows(s), _rows(gy), _rows(gs), mean, rstd, scale, interpret)
    ds = ds.reshape(s.shape)  # s = x + h: the cotangent of both
    return ds, ds, d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


_add_norm.defvjp(_add_norm_fwd, _add_norm_bwd)
