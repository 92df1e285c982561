"""Task heads on top of :class:`BertModel`: masked-language modelling and sequence classification/regression."""

from __future__ import annotations

import functools
from typing import Any, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..config import Kernels, ModelConfig
from ..precision import Policy
from .bert import BertModel
from .layers import Dense, LayerNorm, activation, cpu_half_workaround, dropout


class MLMHead(eqx.Module):
    """dense -> GELU -> LayerNorm -> decoder tied to the token embedding, plus an output bias."""

    transform: Dense
    norm: LayerNorm
    bias: Float[Array, " vocab"]

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        self.transform = Dense(cfg.hidden, cfg.hidden, cfg.init_std, key=key)
        self.norm = LayerNorm(cfg.hidden, cfg.layer_norm_eps)
        self.bias = jnp.zeros((cfg.vocab_size,), jnp.float32)

    def __call__(self, hidden: Array, token_embedding: Array, act: str, norm: str = "xla") -> Float[Array, "... vocab"]:
        """float32 logits for every vector in ``hidden`` (``(..., hidden)``); ``norm``: the LayerNorm's kernel."""
        return decode(self._features(hidden, act, norm), token_embedding) + self.bias

    def _features(self, hidden: Array, act: str, norm: str) -> Array:
        """dense -> GELU -> LayerNorm: what the tied decoder multiplies."""
        (h,) = cpu_half_workaround(self.norm(activation(self.transform(hidden), act), norm))
        return h

    def cross_entropy(self, hidden: Array, token_embedding: Array, act: str, targets: Array, norm: str = "xla",
                      logits_dtype: Any = jnp.float32) -> tuple[Array, Array]:
        """Float32 (cross-entropy, correct) of each vector in ``hidden`` against ``targets``
        (:func:`decode_cross_entropy`; its logits in ``logits_dtype``)."""
        return decode_cross_entropy(self._features(hidden, act, norm), token_embedding, self.bias, targets,
                                    logits_dtype)


def head_activation(cfg: ModelConfig) -> str:
    """The MLM head's GELU: the encoder's (``model.activation``) for post-LN models, whose HF format (BERT) applies
    ``hidden_act`` in the head too; exact GELU for pre-LN models, whose HF format (RobertaPreLayerNorm) hard-codes
    it. Either way an exported MLM model computes the same logits in transformers."""
    return cfg.activation if cfg.post_ln else "gelu"


@jax.custom_vjp
def decode(h: Array, table: Float[Array, "vocab hidden"]) -> Float[Array, "... vocab"]:
    """float32 logits ``h @ table.T`` from ``h`` in the compute dtype and the float32 (tied) embedding table.

    The same numbers as ``jnp.dot(h, table.astype(h.dtype).T, preferred_element_type=float32)``; the custom
    backward pass casts the float32 cotangent back to ``h``'s dtype first, so under a bf16 policy both of its
    matmuls run in bf16 (left to autodiff they would promote to float32, the slowest matmuls of the step), and
    returns the table's gradient straight in float32.
    """
    return jnp.dot(h, table.astype(h.dtype).T, preferred_element_type=jnp.float32)


def _decode_fwd(h: Array, table: Array) -> tuple[Array, tuple[Array, Array]]:
    small = table.astype(h.dtype)
    return jnp.dot(h, small.T, preferred_element_type=jnp.float32), (h, small)


def _decode_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    h, small = res
    return _decode_grads(g.astype(h.dtype), h, small)


def _decode_grads(g: Array, h: Array, small: Array) -> tuple[Array, Array]:
    """(d_h in h's dtype, float32 d_table) from the logits' cotangent ``g`` in h's dtype."""
    d_h = jnp.dot(g, small, preferred_element_type=jnp.float32).astype(h.dtype)
    d_table = jnp.einsum("...v,...d->vd", g, h, preferred_element_type=jnp.float32)
    return d_h, d_table


decode.defvjp(_decode_fwd, _decode_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def decode_cross_entropy(h: Array, table: Float[Array, "vocab hidden"], bias: Float[Array, " vocab"],
                         targets: Int[Array, "..."], logits_dtype: Any) -> tuple[Array, Array]:
    """Float32 (cross-entropy, correct) per row of ``h`` against ``targets``, from the logits
    ``h @ table.T + bias`` stored in ``logits_dtype``: the training loss of :meth:`BertForMLM.mlm_predictions`.

    With ``logits_dtype`` float32 these are the numbers of ``decode(h, table) + bias`` followed by a float32
    softmax cross-entropy (up to summation order); "correct" is 1 where the target's logit is the row's maximum
    (ties count as correct). With the compute dtype (bf16) the decoder GEMM writes half the bytes and the backward
    pass builds the logits' gradient straight in that dtype: the softmax statistics stay float32, as under
    PyTorch autocast. At the budget shape the float32 logits and their gradient were ~1.8 ms of a 9.8 ms step
    (benchmarks/RESULTS.md, throughput II).
    """
    return _cross_entropy_fwd(h, table, bias, targets, logits_dtype)[0]


def _cross_entropy_fwd(h: Array, table: Array, bias: Array, targets: Array,
                       logits_dtype: Any) -> tuple[tuple[Array, Array], tuple[Array, ...]]:
    small = table.astype(h.dtype)
    logits = jnp.dot(h, small.T, preferred_element_type=logits_dtype) + bias.astype(logits_dtype)
    x = logits.astype(jnp.float32)
    top = jnp.max(x, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(x - top[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= top).astype(jnp.float32)
    return (lse - target_logit, correct), (h, small, logits, lse, targets)


def _cross_entropy_bwd(logits_dtype: Any, res: tuple[Array, ...],
                       cotangents: tuple[Array, Array]) -> tuple[Array, Array, Array, None]:
    h, small, logits, lse, targets = res
    d_nll = cotangents[0]  # "correct" has no gradient
    classes = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    g = (jnp.exp(logits.astype(jnp.float32) - lse[..., None]) - (classes == targets[..., None])) * d_nll[..., None]
    d_bias = jnp.sum(g, axis=tuple(range(g.ndim - 1)))
    d_h, d_table = _decode_grads(g.astype(h.dtype), h, small)
    return d_h, d_table, d_bias, None


decode_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


class BertForMLM(eqx.Module):
    bert: BertModel
    mlm: MLMHead

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.bert = BertModel(cfg, key=k1)
        self.mlm = MLMHead(cfg, key=k2)

    @property
    def config(self) -> ModelConfig:
        return self.bert.config

    def __call__(self, input_ids: Int[Array, "b s"], segment_ids: Optional[Array] = None,
                 mask: Optional[Array] = None, positions: Optional[Int[Array, "b m"]] = None, *,
                 key: Optional[PRNGKeyArray] = None, policy: Policy = Policy(), attention: str | Kernels = "auto",
                 remat: bool = False, fp8_scales: Optional[Array] = None) -> Float[Array, "b n vocab"]:
        """float32 MLM logits; at every position, or only at ``positions`` (sparse prediction, ``(b, m)``).
        ``fp8_scales``: see :meth:`BertModel.__call__`."""
        hidden = self._hidden(input_ids, segment_ids, mask, positions, key=key, policy=policy, attention=attention,
                              remat=remat, fp8_scales=fp8_scales)
        return self.mlm(hidden, self.bert.embeddings.token, head_activation(self.config), Kernels.of(attention).norm)

    def _hidden(self, input_ids: Array, segment_ids: Optional[Array], mask: Optional[Array],
                positions: Optional[Array], **kwargs: Any) -> Array:
        """The encoder's output, gathered at ``positions`` when given."""
        hidden = self.bert(input_ids, segment_ids, mask, **kwargs)
        if positions is not None:
            hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
        return hidden

    def mlm_predictions(self, input_ids: Int[Array, "b s"], positions: Int[Array, "b m"], targets: Int[Array, "b m"],
                        *, key: Optional[PRNGKeyArray] = None, policy: Policy = Policy(),
                        attention: str | Kernels = "auto", remat: bool = False, fp8_scales: Optional[Array] = None,
                        logits: str = "float32") -> tuple[Float[Array, "b m"], Float[Array, "b m"]]:
        """Float32 (cross-entropy, correct) ``(b, m)`` of the predictions at ``positions`` against ``targets``,
        without returning the logits; ``logits``: "float32", or "compute" to keep them in the policy's compute
        dtype (train.mlm_logits; :func:`decode_cross_entropy`)."""
        hidden = self._hidden(input_ids, None, None, positions, key=key, policy=policy, attention=attention,
                              remat=remat, fp8_scales=fp8_scales)
        dtype = policy.compute_dtype if logits == "compute" else jnp.float32
        return self.mlm.cross_entropy(hidden, self.bert.embeddings.token, head_activation(self.config), targets,
                                      Kernels.of(attention).norm, dtype)


class BertForClassification(eqx.Module):
    """Pooled [CLS] (or mean, ``config.pooling``) -> dropout -> dense to ``num_labels`` logits (``num_labels == 1``:
    regression)."""

    bert: BertModel
    classifier: Dense
    num_labels: int = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, num_labels: int, *, key: PRNGKeyArray,
                 bert: Optional[BertModel] = None):
        k1, k2 = jax.random.split(key)
        self.bert = BertModel(cfg, key=k1) if bert is None else bert
        self.classifier = Dense(cfg.hidden, num_labels, cfg.init_std, key=k2)
        self.num_labels = num_labels

    @property
    def config(self) -> ModelConfig:
        return self.bert.config

    def __call__(self, input_ids: Int[Array, "b s"], segment_ids: Optional[Array] = None,
                 mask: Optional[Array] = None, *, key: Optional[PRNGKeyArray] = None, policy: Policy = Policy(),
                 attention: str | Kernels = "auto") -> Float[Array, "b labels"]:
        k_enc, k_drop = (None, None) if key is None else jax.random.split(key)
        hidden = self.bert(input_ids, segment_ids, mask, key=k_enc, policy=policy, attention=attention)
        pooled = dropout(self.bert.pool(hidden, mask), self.config.dropout, k_drop)
        return self.classifier(pooled).astype(jnp.float32)
