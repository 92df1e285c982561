"""Building blocks of the encoder: dense, LayerNorm, embeddings, attention, feed-forward, one encoder layer.

All modules work on whole batches, ``(batch, seq, hidden)``. Parameters are float32; each call casts them to
the compute dtype of the given :class:`~jaxbert.precision.Policy`. LayerNorm statistics and softmax run in
float32. Dropout is active only when a PRNG key is passed (``key=None`` means deterministic inference).
"""

from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..config import ModelConfig


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
    return jax.nn.gelu(x, approximate=(name == "gelu_tanh"))


class Dense(eqx.Module):
    """``y = x @ weight + bias`` with weight stored ``(in, out)``."""

    weight: Float[Array, "din dout"]
    bias: Float[Array, " dout"]

    def __init__(self, din: int, dout: int, std: float, *, key: PRNGKeyArray):
        self.weight = trunc_normal(key, (din, dout), std)
        self.bias = jnp.zeros((dout,), jnp.float32)

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        return (x @ self.weight.astype(dtype)) + self.bias.astype(dtype)


class LayerNorm(eqx.Module):
    scale: Float[Array, " d"]
    bias: Float[Array, " d"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, eps: float):
        self.scale = jnp.ones((dim,), jnp.float32)
        self.bias = jnp.zeros((dim,), jnp.float32)
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale + self.bias
        return y.astype(x.dtype)


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

    def __call__(self, input_ids: Int[Array, "b s"], segment_ids: Int[Array, "b s"], dtype: jnp.dtype) -> Array:
        seq = input_ids.shape[1]
        x = jnp.take(self.token, input_ids, axis=0) + self.position[:seq][None] + jnp.take(self.segment, segment_ids, axis=0)
        return self.norm(x.astype(dtype))


def attention(q: Array, k: Array, v: Array, mask: Optional[Bool[Array, "b s"]], implementation: str,
              dropout_rate: float = 0.0, key: Optional[PRNGKeyArray] = None) -> Array:
    """Multi-head attention on ``(batch, seq, heads, head_dim)`` tensors.

    ``mask`` marks real (True) and padding (False) key positions; None means no padding. ``implementation``:
    ``xla``, ``cudnn`` (flash attention on NVIDIA GPUs; with a mask, padding must be on the right, as
    :func:`jaxbert.data.glue` batches are) or ``auto`` (cuDNN on GPU for 16-bit inputs, else XLA).
    """
    if dropout_rate > 0.0 and key is not None:
        return _attention_with_dropout(q, k, v, mask, dropout_rate, key)
    if implementation == "auto":
        on_gpu = jax.default_backend() == "gpu"
        implementation = "cudnn" if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
    dtype = q.dtype
    q, k, v = cpu_half_workaround(q, k, v)
    if implementation == "cudnn":
        lengths = None if mask is None else mask.sum(-1).astype(jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    bias_mask = None if mask is None else mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, implementation="xla").astype(dtype)


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
    """One transformer layer; pre-LN (``x + f(LN(x))``) or post-LN (``LN(x + f(x))``) by the config."""

    qkv: Dense  # fused query/key/value projection, output laid out [q | k | v], each head-major
    out: Dense
    attn_norm: LayerNorm
    ffn_in: Dense
    ffn_out: Dense
    ffn_norm: LayerNorm

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.qkv = Dense(cfg.hidden, 3 * cfg.hidden, cfg.init_std, key=k1)
        self.out = Dense(cfg.hidden, cfg.hidden, cfg.init_std, key=k2)
        self.attn_norm = LayerNorm(cfg.hidden, cfg.layer_norm_eps)
        self.ffn_in = Dense(cfg.hidden, cfg.ffn, cfg.init_std, key=k3)
        self.ffn_out = Dense(cfg.ffn, cfg.hidden, cfg.init_std, key=k4)
        self.ffn_norm = LayerNorm(cfg.hidden, cfg.layer_norm_eps)

    def _attend(self, x: Array, mask: Optional[Array], cfg: ModelConfig, implementation: str,
                key: Optional[PRNGKeyArray]) -> Array:
        b, s, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, s, 3, cfg.heads, cfg.head_dim), 3, axis=2)
        ctx = attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask, implementation, cfg.attention_dropout, key)
        return self.out(ctx.reshape(b, s, cfg.hidden))

    def _feed_forward(self, x: Array, cfg: ModelConfig) -> Array:
        return self.ffn_out(activation(self.ffn_in(x), cfg.activation))

    def __call__(self, x: Array, mask: Optional[Array], cfg: ModelConfig, implementation: str,
                 key: Optional[PRNGKeyArray]) -> Array:
        keys = [None, None, None] if key is None else list(jax.random.split(key, 3))
        if cfg.post_ln:
            x = self.attn_norm(x + dropout(self._attend(x, mask, cfg, implementation, keys[0]), cfg.dropout, keys[1]))
            return self.ffn_norm(x + dropout(self._feed_forward(x, cfg), cfg.dropout, keys[2]))
        h = self._attend(self.attn_norm(x), mask, cfg, implementation, keys[0])
        x = x + dropout(h, cfg.dropout, keys[1])
        return x + dropout(self._feed_forward(self.ffn_norm(x), cfg), cfg.dropout, keys[2])
