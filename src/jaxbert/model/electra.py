"""ELECTRA-style replaced-token detection (Clark et al., 2020): a small MLM generator and a discriminator.

The generator (a :class:`BertForMLM` narrower than the discriminator) fills the masked positions of an
:class:`jaxbert.data.mlm.MLMBatch` with tokens sampled from its own predictions; the discriminator (a
:class:`BertModel` with a two-layer token head) reads the corrupted sequence and predicts, for every token,
whether it was replaced. A sample equal to the original token counts as not replaced. The pretraining loss is
``generator MLM loss + discriminator_weight * mean per-token binary cross-entropy``; no gradient flows from the
discriminator's loss into the generator (sampling is discrete). The discriminator's encoder is the model that
finetuning uses.

Not shared here: the token embeddings of generator and discriminator (their widths differ); the paper ties them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..config import ModelConfig
from ..data.mlm import MLMBatch
from ..precision import Policy
from .bert import BertModel
from .heads import BertForMLM
from .layers import Dense, activation


def generator_config(cfg: ModelConfig, fraction: float) -> ModelConfig:
    """The generator's shape: the discriminator's depth, ``fraction`` of its width (a multiple of 64, at least
    64; heads of 64 dimensions), no dropout."""
    hidden = max(64, int(round(cfg.hidden * fraction / 64)) * 64)
    return dataclasses.replace(cfg, hidden=hidden, heads=max(1, hidden // 64), ffn=4 * hidden, dropout=0.0,
                               attention_dropout=0.0)


class ElectraForPretraining(eqx.Module):
    generator: BertForMLM
    discriminator: BertModel
    rtd_dense: Dense  # hidden -> hidden, then the activation
    rtd_out: Dense  # hidden -> 1: the logit of "replaced"

    def __init__(self, cfg: ModelConfig, generator_fraction: float = 0.25, *, key: PRNGKeyArray):
        k_gen, k_disc, k_dense, k_out = jax.random.split(key, 4)
        self.generator = BertForMLM(generator_config(cfg, generator_fraction), key=k_gen)
        self.discriminator = BertModel(cfg, key=k_disc)
        self.rtd_dense = Dense(cfg.hidden, cfg.hidden, cfg.init_std, key=k_dense)
        self.rtd_out = Dense(cfg.hidden, 1, cfg.init_std, key=k_out)

    @property
    def config(self) -> ModelConfig:
        return self.discriminator.config

    def discriminate(self, input_ids: Int[Array, "b s"], *, key: Optional[PRNGKeyArray] = None,
                     policy: Policy = Policy(), attention: str = "auto") -> Float[Array, "b s"]:
        """float32 logits of "this token was replaced", at every position of unpadded single-segment rows."""
        hidden = self.discriminator(input_ids, key=key, policy=policy, attention=attention)
        h = activation(self.rtd_dense(hidden), self.config.activation)
        return self.rtd_out(h)[..., 0].astype(jnp.float32)


def replace_tokens(batch: MLMBatch, generator_logits: Float[Array, "b m vocab"],
                   keys: PRNGKeyArray) -> Int[Array, "b s"]:
    """``batch.input_ids`` with every used slot's position set to a token sampled from the generator (unused
    slots and unmasked positions keep their input token). ``keys``: one key per row (``(b, 2)``), so a row's
    samples do not depend on the rows beside it."""
    logits = jax.lax.stop_gradient(generator_logits)
    sampled = jax.vmap(lambda k, row: jax.random.categorical(k, row, axis=-1))(keys, logits).astype(jnp.int32)
    current = jnp.take_along_axis(batch.input_ids, batch.positions, axis=1)
    values = jnp.where(batch.weights > 0, sampled, current)
    rows = jnp.arange(batch.input_ids.shape[0], dtype=jnp.int32)[:, None]
    return batch.input_ids.at[rows, batch.positions].set(values, unique_indices=True)


def electra_sums(model: ElectraForPretraining, original: Int[Array, "b s"], batch: MLMBatch, *,
                 sample_keys: PRNGKeyArray, dropout_key: Optional[PRNGKeyArray], policy: Policy, attention: str,
                 discriminator_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(generator loss sum + weight * discriminator loss sum scaled to the generator's predictions, sums).

    Returned sums (float32): ``mlm_loss``, ``mlm_correct``, ``predictions`` (generator, over used slots);
    ``rtd_loss``, ``rtd_correct``, ``tokens`` and ``replaced`` (discriminator, over every token). The scalar
    is what a step differentiates: the generator's summed cross-entropy plus ``discriminator_weight`` times the
    discriminator's mean binary cross-entropy per token, times the number of predictions (so that dividing by
    the number of predictions, as MLM steps do, gives ``mlm_mean + weight * rtd_mean``).
    """
    k_gen, k_disc = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    logits = model.generator(batch.input_ids, positions=batch.positions, key=k_gen, policy=policy,
                             attention=attention).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)
    predictions = jnp.sum(batch.weights)
    mlm_loss = jnp.sum(nll * batch.weights)
    mlm_correct = jnp.sum((jnp.argmax(logits, -1) == batch.targets) * batch.weights)
    corrupted = replace_tokens(batch, logits, sample_keys)
    replaced = (corrupted != original).astype(jnp.float32)
    rtd_logits = model.discriminate(corrupted, key=k_disc, policy=policy, attention=attention)
    rtd = optax.sigmoid_binary_cross_entropy(rtd_logits, replaced)
    tokens = jnp.asarray(replaced.size, jnp.float32)
    rtd_loss = jnp.sum(rtd)
    total = mlm_loss + discriminator_weight * rtd_loss / tokens * predictions
    sums = {"mlm_loss": mlm_loss, "mlm_correct": mlm_correct, "predictions": predictions, "rtd_loss": rtd_loss,
            "rtd_correct": jnp.sum((rtd_logits > 0) == (replaced > 0)).astype(jnp.float32), "tokens": tokens,
            "replaced": jnp.sum(replaced)}
    return total, sums


OBJECTIVES = ("mlm", "electra")


def pretraining_model(cfg: ModelConfig, objective: str, generator_fraction: float, *,
                      key: PRNGKeyArray) -> BertForMLM | ElectraForPretraining:
    """The model pretraining trains: a :class:`BertForMLM` (``mlm``) or an :class:`ElectraForPretraining`."""
    if objective == "mlm":
        return BertForMLM(cfg, key=key)
    if objective == "electra":
        return ElectraForPretraining(cfg, generator_fraction, key=key)
    raise ValueError(f"pretraining objective '{objective}': expected one of {', '.join(OBJECTIVES)}")


def encoder_of(model: BertForMLM | ElectraForPretraining) -> BertModel:
    """The encoder finetuning and export take from a pretrained model (ELECTRA: the discriminator's)."""
    return model.discriminator if isinstance(model, ElectraForPretraining) else model.bert


def mlm_of(model: BertForMLM | ElectraForPretraining) -> BertForMLM:
    """The masked-language model inside a pretrained model (ELECTRA: the generator)."""
    return model.generator if isinstance(model, ElectraForPretraining) else model
