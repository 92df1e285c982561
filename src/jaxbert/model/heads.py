"""Task heads on top of :class:`BertModel`: masked-language modelling and sequence classification/regression."""

from __future__ import annotations

from typing import Optional

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
        h = self.norm(activation(self.transform(hidden), act), norm)
        (h,) = cpu_half_workaround(h)
        return decode(h, token_embedding) + self.bias


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
    g = g.astype(h.dtype)
    d_h = jnp.dot(g, small, preferred_element_type=jnp.float32).astype(h.dtype)
    d_table = jnp.einsum("...v,...d->vd", g, h, preferred_element_type=jnp.float32)
    return d_h, d_table


decode.defvjp(_decode_fwd, _decode_bwd)


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
        hidden = self.bert(input_ids, segment_ids, mask, key=key, policy=policy, attention=attention, remat=remat,
                           fp8_scales=fp8_scales)
        if positions is not None:
            hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
        return self.mlm(hidden, self.bert.embeddings.token, head_activation(self.config), Kernels.of(attention).norm)


class BertForClassification(eqx.Module):
    """Pooled [CLS] -> dropout -> dense to ``num_labels`` logits (``num_labels == 1``: regression)."""

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
        pooled = dropout(self.bert.pool(hidden), self.config.dropout, k_drop)
        return self.classifier(pooled).astype(jnp.float32)
