"""The BERT encoder: embeddings, a scan over stacked encoder layers, an optional final LayerNorm, a pooler.

Layer parameters are stored stacked along a leading ``layers`` axis and applied with ``jax.lax.scan``
(unrolled by default, which is faster on GPU; ``unroll=1`` keeps a rolled loop whose compile time does not grow
with depth). :meth:`BertModel.unrolled` applies the same layers one by one and
serves as the reference in tests.

Pre-LN, the scan carries a pair (residual stream, last feed-forward output not yet added): every residual add
happens inside the LayerNorm after it (one kernel with ``impl.norm=pallas``, :mod:`jaxbert.model.norm_kernels`),
the last one inside the final LayerNorm. (With ``remat`` each layer keeps two hidden-sized inputs, not one.)
"""

from __future__ import annotations

from typing import Any, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, PRNGKeyArray

from ..config import POOLINGS, Kernels, ModelConfig
from ..precision import Policy
from .layers import Dense, EncoderLayer, Embeddings, LayerNorm, dropout


class BertModel(eqx.Module):
    """The encoder. ``__call__`` maps token ids to hidden states ``(batch, seq, hidden)``."""

    embeddings: Embeddings
    layers: EncoderLayer  # every array has a leading axis of size config.layers
    final_norm: Optional[LayerNorm]  # pre-LN only
    pooler: Dense  # tanh(dense(h[CLS])), as in BERT
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        k_emb, k_layers, k_pool = jax.random.split(key, 3)
        self.embeddings = Embeddings(cfg, key=k_emb)
        self.layers = eqx.filter_vmap(lambda k: EncoderLayer(cfg, key=k))(jax.random.split(k_layers, cfg.layers))
        self.final_norm = None if cfg.post_ln else LayerNorm(cfg.hidden, cfg.layer_norm_eps)
        self.pooler = Dense(cfg.hidden, cfg.hidden, cfg.init_std, key=k_pool)
        self.config = cfg

    def _embed(self, input_ids: Array, segment_ids: Optional[Array], policy: Policy,
               key: Optional[PRNGKeyArray], kernels: Kernels) -> Any:
        """The embeddings, as the first layer takes them: pre-LN, a pair (stream, pending branch output)."""
        if segment_ids is None:
            segment_ids = jnp.zeros_like(input_ids)
        x = dropout(self.embeddings(input_ids, segment_ids, policy.compute_dtype, kernels.norm,
                                    kernels.embedding_grad), self.config.dropout, key)
        return x if self.config.post_ln else (x, jnp.zeros_like(x))

    def _finish(self, carry: Any, kernels: Kernels) -> Array:
        """The last layer's output; pre-LN, its pending residual add fused into the final LayerNorm."""
        if self.final_norm is None:
            return carry
        stream, pending = carry
        return self.final_norm.add(stream, pending, kernels.norm)[1]

    def __call__(self, input_ids: Int[Array, "b s"], segment_ids: Optional[Int[Array, "b s"]] = None,
                 mask: Optional[Bool[Array, "b s"]] = None, *, key: Optional[PRNGKeyArray] = None,
                 policy: Policy = Policy(), attention: str | Kernels = "auto", remat: bool = False,
                 unroll: int | bool = True, fp8_scales: Optional[Array] = None) -> Array:
        """Hidden states of the last layer (after the final LayerNorm in pre-LN mode), compute dtype.

        ``mask``: True for real tokens, False for padding; None when there is no padding. ``attention``: the
        kernels (:class:`~jaxbert.config.Kernels`; a plain name: the attention's, with XLA LayerNorms).
        ``unroll``: how far the scan over layers is unrolled (True: completely). A rolled loop keeps compile time
        flat in depth but on GPU it made BERT-base's training step 28% slower (per-layer activations copied into
        stacked buffers, zero-filled gradient stacks, a host round trip per iteration; see benchmarks/RESULTS.md),
        while the unrolled one compiled as fast at 12 layers. ``fp8_scales``: with an FP8 policy,
        ``(layers, 6, 3)`` delayed-scaling scales (:meth:`jaxbert.model.fp8_delayed.Fp8History.scales`); None:
        current scaling.
        """
        cfg, kernels = self.config, Kernels.of(attention)
        k_emb, k_layers = (None, None) if key is None else jax.random.split(key)
        x = self._embed(input_ids, segment_ids, policy, k_emb, kernels)
        params, static = eqx.partition(self.layers, eqx.is_array)
        layer_keys = None if k_layers is None else jax.random.split(k_layers, cfg.layers)

        def body(h: Any, inputs: tuple) -> tuple[Any, None]:
            layer_params, layer_key, layer_scales = inputs
            layer = eqx.combine(layer_params, static)
            return layer(h, mask, cfg, kernels, layer_key, policy.fp8, layer_scales), None

        if remat:
            body = jax.checkpoint(body)  # type: ignore[assignment]
        x, _ = jax.lax.scan(body, x, (params, layer_keys, fp8_scales), unroll=unroll)
        return self._finish(x, kernels)

    def unrolled(self, input_ids: Array, segment_ids: Optional[Array] = None, mask: Optional[Array] = None, *,
                 key: Optional[PRNGKeyArray] = None, policy: Policy = Policy(),
                 attention: str | Kernels = "auto", fp8_scales: Optional[Array] = None) -> Array:
        """The same computation as ``__call__`` with a Python loop over layers (a test reference)."""
        cfg, kernels = self.config, Kernels.of(attention)
        k_emb, k_layers = (None, None) if key is None else jax.random.split(key)
        x = self._embed(input_ids, segment_ids, policy, k_emb, kernels)
        params, static = eqx.partition(self.layers, eqx.is_array)
        layer_keys = None if k_layers is None else jax.random.split(k_layers, cfg.layers)
        for i in range(cfg.layers):
            layer = eqx.combine(jax.tree.map(lambda a: a[i], params), static)
            x = layer(x, mask, cfg, kernels, None if layer_keys is None else layer_keys[i], policy.fp8,
                      None if fp8_scales is None else fp8_scales[i])
        return self._finish(x, kernels)

    def pool(self, hidden: Array, mask: Optional[Array] = None) -> Array:
        """The pooled output: tanh of a dense layer on the first ([CLS]) position (BERT's), or with
        ``config.pooling == "mean"`` on the mean over the real tokens (``mask``; None: every position)."""
        mask = jnp.ones(hidden.shape[:2], bool) if mask is None else mask
        return jnp.tanh(self.pooler(pool_tokens(hidden, mask, self.config.pooling).astype(hidden.dtype)))


def pool_tokens(hidden: Array, mask: Array, pooling: str) -> Array:
    """float32 ``(b, hidden)`` from ``(b, s, hidden)`` states and the ``(b, s)`` real-token mask: the state at
    [CLS] (``"cls"``) or the mean over the real tokens (``"mean"``)."""
    hidden = hidden.astype(jnp.float32)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        weights = mask.astype(jnp.float32)[..., None]
        return (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
    raise ValueError(f"pooling '{pooling}': expected one of {', '.join(POOLINGS)}")


def with_config(module: eqx.Module, path: str, cfg: ModelConfig) -> eqx.Module:
    """A copy of ``module`` whose BertModel (at attribute ``path``, '' for the module itself) uses ``cfg``.

    Only settings that do not change parameter shapes may differ (dropout rates, activation, eps).
    """
    target = module if not path else getattr(module, path)
    assert isinstance(target, BertModel)
    old = target.config
    for name in ("vocab_size", "hidden", "layers", "heads", "ffn", "max_positions", "type_vocab_size", "post_ln",
                 "bias", "ffn_type"):
        if getattr(old, name) != getattr(cfg, name):
            raise ValueError(f"model.{name}: cannot change from {getattr(old, name)} to {getattr(cfg, name)} "
                             "on an existing model")
    skeleton = eqx.filter_eval_shape(BertModel, cfg, key=jax.random.PRNGKey(0))
    rebuilt = jax.tree.unflatten(jax.tree.structure(skeleton), jax.tree.leaves(target))
    if not path:
        return rebuilt
    return eqx.tree_at(lambda m: getattr(m, path), module, rebuilt)


def count_parameters(module: eqx.Module) -> int:
    """Number of parameters; works on real arrays and on shapes from ``eqx.filter_eval_shape``."""
    leaves = jax.tree.leaves(module)
    return sum(int(x.size) for x in leaves if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)))
