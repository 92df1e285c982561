"""Attention for short sequences as a Pallas GPU (Triton) kernel, forward and backward.

At BERT's lengths (seq <= 256) one tile holds a whole row of scores, so the softmax needs no online rescaling
(no flash-attention loop over key blocks): a program loads the query rows of one (batch, head) and all its
keys and values, computes ``S = q k^T / sqrt(d)`` in float32, the softmax in float32, and ``O = P v`` with
``P`` cast to the input dtype (as the XLA reference does). It saves the log-sum-exp of each score row (float32).

The backward pass is one program per (batch, head) that recomputes ``P = exp(S - lse)`` and writes all three
gradients: ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - rowsum(P * dP))``, ``dQ = dS K / sqrt(d)`` and
``dK = dS^T Q / sqrt(d)``. ``rowsum(P * dP)`` equals ``rowsum(dO * O)`` in exact arithmetic; computing it from
the tile already in registers needs no ``O`` residual and avoids the rounding of a 16-bit ``O``.

Tensors stay in the model's ``(batch, seq, heads, head_dim)`` layout: the BlockSpecs read one head's strided
``(seq, head_dim)`` slab, so no transposes surround the kernel. Lengths that are not powers of two (Triton
tiles need them, and at least 16) are padded here, the padded keys masked out.

Masking follows :func:`jax.nn.dot_product_attention` with a boolean key mask: masked scores become a large
negative finite number; a sequence with no real key attends uniformly over its (masked) keys and passes no
gradient to q or k, as the reference does, and never produces NaN.

Not yet measured on a multi-device mesh: XLA cannot partition a Triton custom call as it partitions cuDNN's
attention (which has partitioning rules), so under a sharded batch it may gather the inputs to every device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .pallas_gpu import launch

MAX_SEQ = 256
MAX_HEAD_DIM = 128
MIN_TILE = 16  # smallest dimension of a Triton dot
MASK_VALUE = -1e30  # score of a masked key: finite, so no inf - inf

# Key codes of the int32 mask given to the kernels
_KEEP, _MASKED, _UNIFORM, _PAD = 1, 0, 2, -1

_SQUEEZED = getattr(pl, "squeezed", None)  # a block dimension the kernel does not see (None in older jax)


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Launch settings of the two kernels; they change speed, never results."""

    block_q: Optional[int] = 64  # query rows per forward program, a power of two (None: the whole sequence)
    num_warps: int = 4  # forward
    num_warps_bwd: int = 8  # backward
    num_stages: int = 1  # no loop to pipeline: one tile per program


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    has_mask: bool
    interpret: bool
    options: KernelOptions



def _dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """``op(a) @ op(b)`` with float32 accumulation (op: transpose when asked)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _masked(s: jax.Array, codes: jax.Array) -> jax.Array:
    """Scores with masked and padding keys replaced (``codes``: one int32 per key)."""
    fill = jnp.where(codes == _UNIFORM, 0.0, MASK_VALUE).astype(jnp.float32)
    return jnp.where((codes == _KEEP)[None, :], s, fill[None, :])


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, st: _Static):
    codes_ref, o_ref, lse_ref = refs if st.has_mask else (None, *refs)
    v = v_ref[...]
    s = _dot(q_ref[...], k_ref[...], trans_b=True) * st.scale
    if st.has_mask:
        s = _masked(s, codes_ref[...])
    m = jnp.max(s, axis=1)
    p = jnp.exp(s - m[:, None])
    total = jnp.sum(p, axis=1)
    p = p * (1.0 / total)[:, None]
    o_ref[...] = _dot(p.astype(v.dtype), v).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(total)


def _bwd_kernel(q_ref, k_ref, v_ref, *refs, st: _Static):
    codes_ref, lse_ref, do_ref, dq_ref, dk_ref, dv_ref = refs if st.has_mask else (None, *refs)
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s = _dot(q, k, trans_b=True) * st.scale
    if st.has_mask:
        codes = codes_ref[...]
        s = _masked(s, codes)
    p = jnp.exp(s - lse_ref[...][:, None])
    dv_ref[...] = _dot(p.astype(do.dtype), do, trans_a=True).astype(dv_ref.dtype)
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - jnp.sum(p * dp, axis=1)[:, None])
    if st.has_mask:  # replaced scores do not depend on q or k
        ds = jnp.where((codes == _KEEP)[None, :], ds, 0.0)
    ds = ds.astype(q.dtype)
    dq_ref[...] = (_dot(ds, k) * st.scale).astype(dq_ref.dtype)
    dk_ref[...] = (_dot(ds, q, trans_a=True) * st.scale).astype(dk_ref.dtype)


def _slab(rows: int, dim: int, by_block: bool) -> pl.BlockSpec:
    """One head's ``(rows, dim)`` slab of a ``(batch, seq, heads, dim)`` array."""
    if by_block:
        return pl.BlockSpec((_SQUEEZED, rows, _SQUEEZED, dim), lambda b, h, i: (b, i, h, 0))
    return pl.BlockSpec((_SQUEEZED, rows, _SQUEEZED, dim), lambda b, h, *_: (b, 0, h, 0))


def _codes_spec(seq: int) -> pl.BlockSpec:
    return pl.BlockSpec((_SQUEEZED, seq), lambda b, h, *_: (b, 0))


def _forward(q, k, v, codes, st: _Static):
    batch, seq, heads, dim = q.shape
    block_q = min(st.options.block_q or seq, seq)
    in_specs = [_slab(block_q, dim, True), _slab(seq, dim, False), _slab(seq, dim, False)]
    args = [q, k, v]
    if st.has_mask:
        in_specs.append(_codes_spec(seq))
        args.append(codes)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=(batch, heads, seq // block_q),
        in_specs=in_specs,
        out_specs=[_slab(block_q, dim, True),
                   pl.BlockSpec((_SQUEEZED, _SQUEEZED, block_q), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)],
        **launch("short_attention_fwd", st.options.num_warps, st.interpret, st.options.num_stages),
    )(*args)


def _backward(q, k, v, codes, lse, do, st: _Static):
    batch, seq, heads, dim = q.shape
    slab = _slab(seq, dim, False)
    in_specs = [slab, slab, slab]
    args = [q, k, v]
    if st.has_mask:
        in_specs.append(_codes_spec(seq))
        args.append(codes)
    in_specs += [pl.BlockSpec((_SQUEEZED, _SQUEEZED, seq), lambda b, h: (b, h, 0)), slab]
    args += [lse, do]
    return pl.pallas_call(
        functools.partial(_bwd_kernel, st=st),
        grid=(batch, heads),
        in_specs=in_specs,
        out_specs=[slab, slab, slab],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)],
        **launch("short_attention_bwd", st.options.num_warps_bwd, st.interpret, st.options.num_stages),
    )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, codes, st: _Static):
    return _forward(q, k, v, codes, st)[0]


def _attend_fwd(q, k, v, codes, st: _Static):
    out, lse = _forward(q, k, v, codes, st)
    return out, (q, k, v, codes, lse)


def _attend_bwd(st: _Static, res, do):
    q, k, v, codes, lse = res
    dq, dk, dv = _backward(q, k, v, codes, lse, do.astype(q.dtype), st)
    return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _tile(n: int) -> int:
    return max(MIN_TILE, 1 << (n - 1).bit_length())


def short_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array] = None, *,
                    interpret: bool = False, options: KernelOptions = KernelOptions()) -> jax.Array:
    """Softmax attention of ``(batch, seq, heads, head_dim)`` tensors, ``seq <= 256``, ``head_dim <= 128``.

    ``mask``: a ``(batch, seq)`` boolean key mask (True: real token), or None. ``interpret`` runs the kernels
    in Pallas' interpreter (any backend; for tests). Equal to ``jax.nn.dot_product_attention`` with the mask
    broadcast over heads and queries, and scale ``1/sqrt(head_dim)``.
    """
    batch, seq, heads, dim = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"short_attention: q, k, v must share one shape, got {q.shape}, {k.shape}, {v.shape}")
    if seq > MAX_SEQ or dim > MAX_HEAD_DIM:
        raise ValueError(f"short_attention: supports seq <= {MAX_SEQ} and head_dim <= {MAX_HEAD_DIM}, "
                         f"got seq={seq}, head_dim={dim}")
    if mask is not None and mask.shape != (batch, seq):
        raise ValueError(f"short_attention: mask must be (batch, seq)={(batch, seq)}, got {mask.shape}")
    block_q = options.block_q
    seq_p, dim_p = _tile(seq), _tile(dim)
    if block_q is not None and (block_q < MIN_TILE or block_q & (block_q - 1) or seq_p % min(block_q, seq_p)):
        raise ValueError(f"short_attention: block_q must be a power of two >= {MIN_TILE}, got {block_q}")
    codes = None
    if mask is not None:
        uniform = ~jnp.any(mask, axis=1, keepdims=True)  # no real key: the reference attends uniformly
        codes = jnp.where(mask, _KEEP, jnp.where(uniform, _UNIFORM, _MASKED)).astype(jnp.int32)
    if seq_p != seq:
        if codes is None:
            codes = jnp.full((batch, seq), _KEEP, jnp.int32)
        codes = jnp.pad(codes, ((0, 0), (0, seq_p - seq)), constant_values=_PAD)
    if (seq_p, dim_p) != (seq, dim):
        widths = ((0, 0), (0, seq_p - seq), (0, 0), (0, dim_p - dim))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    st = _Static(scale=1.0 / math.sqrt(dim), has_mask=codes is not None, interpret=interpret, options=options)
    out = _attend(q, k, v, codes, st)
    return out[:, :seq, :, :dim] if (seq_p, dim_p) != (seq, dim) else out
