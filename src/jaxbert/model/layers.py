"""Building blocks of the encoder: dense, LayerNorm, embeddings, attention, feed-forward, one encoder layer.

LayerNorm's math (and its Pallas kernel, fused with the residual add before it) is in
:mod:`jaxbert.model.norm_kernels`.

All modules work on whole batches, ``(batch, seq, hidden)``. Parameters are float32; each call casts them to
the compute dtype of the given :class:`~jaxbert.precision.Policy`. LayerNorm statistics and softmax run in
float32. Dropout is active only when a PRNG key is passed (``key=None`` means deterministic inference).
"""

from __future__ import annotations

import functools
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..config import Kernels, ModelConfig
from .attention_kernel import MAX_HEAD_DIM, MAX_SEQ, short_attention
from .embedding_grad import lookup, small_lookup
from .ffn_kernels import gelu_matmul, gelu_slope
from .fp8 import fp8_matmul
from .fp8_delayed import delayed_matmul
from .norm_kernels import add_layer_norm, layer_norm
from .pallas_gpu import plgpu


def trunc_normal(key: PRNGKeyArray, shape: tuple[int, ...], std: float) -> Array:
    return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)


def dropout(x: Array, rate: float, key: Optional[PRNGKeyArray]) -> Array:
    """Inverted dropout; the identity when ``key`` is None or the rate is zero."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def cpu_half_workaround(*xs: Array) -> tuple[Array, ...]:
    """XLA:CPU has no fp16 x fp16 -> fp32 dot; upcast fp16 operands there (GPU keeps fp16)."""
    if xs[0].dtype == jnp.float16 and jax.default_backend() == "cpu":
        return tuple(x.astype(jnp.float32) for x in xs)
    return xs


def activation(x: Array, name: str) -> Array:
    """GELU, exact (``gelu``) or with the tanh approximation (``gelu_tanh``); see :func:`gelu`."""
    return gelu(x, name == "gelu_tanh")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x: Array, approximate: bool) -> Array:
    """``jax.nn.gelu`` with a backward pass that keeps only ``x``: autodiff of the exact GELU saves two more
    activation-sized intermediates, written in the forward pass and read back in the backward pass (at the
    FFN width the largest tensors of a layer). The derivative is recomputed from ``x`` in float32 instead."""
    return jax.nn.gelu(x, approximate=approximate)


def _gelu_fwd(x: Array, approximate: bool) -> tuple[Array, Array]:
    return jax.nn.gelu(x, approximate=approximate), x


def _gelu_bwd(approximate: bool, x: Array, g: Array) -> tuple[Array]:
    return ((g.astype(jnp.float32) * gelu_slope(x, approximate)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def matmul(x: Array, w: Array, fp8: bool = False, scales: Optional[Array] = None) -> Array:
    """``x @ w`` in ``x``'s dtype (``w`` is cast to it); through float8 operands when ``fp8``: with delayed
    scaling when the site's (x, w, g) ``scales`` are given (:mod:`jaxbert.model.fp8_delayed`), else with current
    scaling (:mod:`jaxbert.model.fp8`)."""
    w = w.astype(x.dtype)
    if not fp8:
        return x @ w
    return fp8_matmul(x, w) if scales is None else delayed_matmul(x, w, scales)


class Dense(eqx.Module):
    """``y = x @ weight + bias`` with weight stored ``(in, out)``; ``bias`` is None in a bias-free layer."""

    weight: Float[Array, "din dout"]
    bias: Optional[Float[Array, " dout"]]

    def __init__(self, din: int, dout: int, std: float, *, key: PRNGKeyArray, bias: bool = True):
        self.weight = trunc_normal(key, (din, dout), std)
        self.bias = jnp.zeros((dout,), jnp.float32) if bias else None

    def __call__(self, x: Array, fp8: bool = False, scales: Optional[Array] = None) -> Array:
        return add_bias(matmul(x, self.weight, fp8, scales), self.bias)


def add_bias(y: Array, bias: Optional[Array]) -> Array:
    """``y + bias`` in ``y``'s dtype; ``y`` itself when there is no bias."""
    return y if bias is None else y + bias.astype(y.dtype)


def dense_block(layer: Dense, x: Array, i: int, n: int, fp8: bool, scales: Optional[Array] = None) -> Array:
    """Output columns ``[i * n, (i + 1) * n)`` of ``layer(x)``, from a matmul on that block of the weight."""
    bias = None if layer.bias is None else layer.bias[i * n:(i + 1) * n]
    return add_bias(matmul(x, layer.weight[:, i * n:(i + 1) * n], fp8, scales), bias)


class LayerNorm(eqx.Module):
    scale: Float[Array, " d"]
    bias: Float[Array, " d"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, eps: float):
        self.scale = jnp.ones((dim,), jnp.float32)
        self.bias = jnp.zeros((dim,), jnp.float32)
        self.eps = eps

    def __call__(self, x: Array, implementation: str = "xla") -> Array:
        """``implementation``: see :mod:`jaxbert.model.norm_kernels`."""
        return layer_norm(x, self.scale, self.bias, self.eps, implementation)

    def add(self, x: Array, h: Array, implementation: str = "xla") -> tuple[Array, Array]:
        """``(s, self(s))`` with ``s = x + h``: the residual add fused into the LayerNorm by the Pallas kernel."""
        return add_layer_norm(x, h, self.scale, self.bias, self.eps, implementation)


class Embeddings(eqx.Module):
    """Token + learned absolute position + segment embeddings, then LayerNorm."""

    token: Float[Array, "vocab hidden"]
    position: Float[Array, "positions hidden"]
    segment: Float[Array, "types hidden"]
    norm: LayerNorm

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.token = trunc_normal(k1, (cfg.vocab_size, cfg.hidden), cfg.init_std)
        self.position = trunc_normal(k2, (cfg.max_positions, cfg.hidden), cfg.init_std)
        self.segment = trunc_normal(k3, (cfg.type_vocab_size, cfg.hidden), cfg.init_std)
        self.norm = LayerNorm(cfg.hidden, cfg.layer_norm_eps)

    def __call__(self, input_ids: Int[Array, "b s"], segment_ids: Int[Array, "b s"], dtype: jnp.dtype,
                 norm: str = "xla", embedding_grad: str = "scatter") -> Array:
        seq = input_ids.shape[1]
        # the sum is cast to ``dtype`` right here, so the token rows' cotangent is exact in ``dtype``
        token = lookup(self.token, input_ids, dtype, embedding_grad)
        x = token + self.position[:seq][None] + small_lookup(self.segment, segment_ids)
        return self.norm(x.astype(dtype), norm)


def attention(q: Array, k: Array, v: Array, mask: Optional[Bool[Array, "b s"]], implementation: str,
              dropout_rate: float = 0.0, key: Optional[PRNGKeyArray] = None) -> Array:
    """Multi-head attention on ``(batch, seq, heads, head_dim)`` tensors.

    ``mask`` marks real (True) and padding (False) key positions; None means no padding. ``implementation``:
    ``xla``, ``cudnn`` (flash attention on NVIDIA GPUs; with a mask, padding must be on the right, as
    :func:`jaxbert.data.glue` batches are), ``pallas`` (the short-sequence kernel of
    :mod:`jaxbert.model.attention_kernel`, GPU, seq <= 256), ``pallas_interpret`` (the same kernel run by
    Pallas' interpreter on any backend, for tests) or ``auto`` (:func:`resolve_attention`).
    Attention dropout (``dropout_rate`` with a ``key``) always takes the XLA path.
    """
    if dropout_rate > 0.0 and key is not None:
        return _attention_with_dropout(q, k, v, mask, dropout_rate, key)
    implementation = resolve_attention(implementation, q, mask)
    dtype = q.dtype
    q, k, v = cpu_half_workaround(q, k, v)
    if implementation == "cudnn":
        lengths = None if mask is None else mask.sum(-1).astype(jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    if implementation in ("pallas", "pallas_interpret"):
        return short_attention(q, k, v, mask, interpret=implementation == "pallas_interpret").astype(dtype)
    bias_mask = None if mask is None else mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, implementation="xla").astype(dtype)


def resolve_attention(implementation: str, q: Array, mask: Optional[Array]) -> str:
    """What ``auto`` stands for: on a GPU with bf16 inputs, the Pallas short-sequence kernel when there is one
    device, no padding mask (pretraining's contiguous chunks) and it fits (seq <= 256, head_dim <= 128; +2%
    tokens/s at the budget shape over cuDNN, whose q/k/v slices and gradient concatenation it avoids), else
    cuDNN; cuDNN for fp16 too (the kernel is measured in bf16 only); XLA on other backends or dtypes. Padded
    batches (finetuning) stay on cuDNN. A Pallas call has no sharding rule, so multi-device runs stay on cuDNN
    too. Other names are returned as given."""
    if implementation != "auto":
        return implementation
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return "xla"
    fits = q.shape[1] <= MAX_SEQ and q.shape[-1] <= MAX_HEAD_DIM
    single = jax.device_count() == 1 and plgpu is not None
    return "pallas" if q.dtype == jnp.bfloat16 and mask is None and fits and single else "cudnn"


def _attention_with_dropout(q: Array, k: Array, v: Array, mask: Optional[Array], rate: float,
                            key: PRNGKeyArray) -> Array:
    dtype = v.dtype
    q, k, v = cpu_half_workaround(q, k, v)
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(q.shape[-1])
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1), rate, key).astype(v.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", probs, v).astype(dtype)


class EncoderLayer(eqx.Module):
    """One transformer layer; pre-LN (``x + f(LN(x))``) or post-LN (``LN(x + f(x))``) by the config.

    ``cfg.bias=False`` leaves the four Dense layers without bias (LayerNorms keep theirs). ``cfg.ffn_type``:
    ``mlp`` (``ffn_out(act(ffn_in(x)))``) or ``glu`` (``ffn_in`` has ``2 * ffn`` columns ``[a | b]``, and the
    feed-forward is ``ffn_out(act(a) * b)``).
    """

    qkv: Dense  # fused query/key/value projection, output laid out [q | k | v], each head-major
    out: Dense
    attn_norm: LayerNorm
    ffn_in: Dense
    ffn_out: Dense
    ffn_norm: LayerNorm

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        inner = 2 * cfg.ffn if cfg.ffn_type == "glu" else cfg.ffn
        self.qkv = Dense(cfg.hidden, 3 * cfg.hidden, cfg.init_std, key=k1, bias=cfg.bias)
        self.out = Dense(cfg.hidden, cfg.hidden, cfg.init_std, key=k2, bias=cfg.bias)
        self.attn_norm = LayerNorm(cfg.hidden, cfg.layer_norm_eps)
        self.ffn_in = Dense(cfg.hidden, inner, cfg.init_std, key=k3, bias=cfg.bias)
        self.ffn_out = Dense(cfg.ffn, cfg.hidden, cfg.init_std, key=k4, bias=cfg.bias)
        self.ffn_norm = LayerNorm(cfg.hidden, cfg.layer_norm_eps)

    def _attend(self, x: Array, mask: Optional[Array], cfg: ModelConfig, implementation: str,
                key: Optional[PRNGKeyArray], fp8: bool, scales: Optional[Array] = None) -> Array:
        b, s, _ = x.shape
        # Three matmuls on column blocks of the fused [q | k | v] weight: each output is already a contiguous
        # (b, s, heads, head_dim) array, where slicing one fused output would copy q, k and v (and concatenate
        # their gradients) around the attention kernel in every layer.
        q, k, v = (dense_block(self.qkv, x, i, cfg.hidden, fp8, _site(scales, i))
                   .reshape(b, s, cfg.heads, cfg.head_dim) for i in range(3))
        ctx = attention(q, k, v, mask, implementation, cfg.attention_dropout, key)
        return self.out(ctx.reshape(b, s, cfg.hidden), fp8, _site(scales, 3))

    def _feed_forward(self, x: Array, cfg: ModelConfig, fp8: bool, scales: Optional[Array] = None,
                      implementation: str = "xla") -> Array:
        # gelu' fused into a backward GEMM (ffn_kernels), for 16-bit compute: float32 keeps the XLA path
        if implementation != "xla" and cfg.ffn_type != "glu" and not fp8 and x.dtype != jnp.float32:
            return add_bias(gelu_matmul(self.ffn_in(x), self.ffn_out.weight, cfg.activation == "gelu_tanh",
                                        implementation), self.ffn_out.bias)
        if cfg.ffn_type != "glu":
            return self.ffn_out(activation(self.ffn_in(x, fp8, _site(scales, 4)), cfg.activation), fp8,
                                _site(scales, 5))
        # two matmuls on the column blocks [a | b] of ffn_in, as for qkv: no slice copies of a fused output
        # (delayed FP8 scaling has one site per Dense, so it is refused with GLU by the config)
        a, g = (dense_block(self.ffn_in, x, i, cfg.ffn, fp8) for i in range(2))
        return self.ffn_out(activation(a, cfg.activation) * g, fp8)

    def __call__(self, x: Array | tuple[Array, Array], mask: Optional[Array], cfg: ModelConfig,
                 implementation: str | Kernels, key: Optional[PRNGKeyArray], fp8: bool = False,
                 scales: Optional[Array] = None) -> Array | tuple[Array, Array]:
        """One layer. ``implementation``: the :class:`~jaxbert.config.Kernels` (a plain attention name: XLA
        LayerNorms). ``fp8``: the six matmuls of the layer through float8 operands (:mod:`jaxbert.model.fp8`);
        with ``scales`` (``(6, 3)``: per site q, k, v, out, ffn_in, ffn_out, the x, w, g scales) by delayed
        scaling (:mod:`jaxbert.model.fp8_delayed`).

        Post-LN: ``x`` is the hidden states and the layer returns its output. Pre-LN: ``x`` is a pair
        ``(stream, pending)`` whose sum is the layer's input, and the layer returns the pair for the next one:
        each residual add happens inside the LayerNorm that follows it (:meth:`LayerNorm.add`, one kernel with
        ``impl.norm=pallas``), the feed-forward branch's in the next layer or in the final LayerNorm.
        """
        kernels = Kernels.of(implementation)
        keys = [None, None, None] if key is None else list(jax.random.split(key, 3))
        if cfg.post_ln:
            x = self.attn_norm(x + dropout(self._attend(x, mask, cfg, kernels.attention, keys[0], fp8, scales),
                                           cfg.dropout, keys[1]))
            return self.ffn_norm(x + dropout(self._feed_forward(x, cfg, fp8, scales, kernels.ffn), cfg.dropout,
                                             keys[2]))
        stream, pending = x
        stream, normed = self.attn_norm.add(stream, pending, kernels.norm)
        h = self._attend(normed, mask, cfg, kernels.attention, keys[0], fp8, scales)
        stream, normed = self.ffn_norm.add(stream, dropout(h, cfg.dropout, keys[1]), kernels.norm)
        return stream, dropout(self._feed_forward(normed, cfg, fp8, scales, kernels.ffn), cfg.dropout, keys[2])


def _site(scales: Optional[Array], index: int) -> Optional[Array]:
    return None if scales is None else scales[index]
