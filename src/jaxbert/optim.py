"""Optimizer, learning-rate schedule and batch-size ramp.

* AdamW (optax) with weight decay on weight matrices and embedding tables only: biases and LayerNorm parameters
  are never decayed, nor the modules named in ``AdamWSettings.no_decay`` (pretraining: the pooler, which the MLM
  loss does not train, so decay would only shrink it). Global-norm clipping comes first. Pretraining and
  finetuning build their optimizer here, from :class:`AdamWSettings` (:meth:`AdamWSettings.of` a config's optimizer
  section). Finetuning may add layer-wise learning-rate decay (``finetune.layer_decay``, :func:`depth_scales`).
  The learning rate is an input of every step (``optax.inject_hyperparams``), set by
  :func:`set_learning_rate`, so the schedule can run on steps or on elapsed time without recompiling.
* The one-cycle schedule and the batch-size ramp are functions of *progress* in [0, 1]: ``step / steps``, or
  ``elapsed / budget`` in time-budget mode (as Cramming does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from .config import OptimizerFields, TrainConfig
from .model.layers import LayerNorm

Schedule = Callable[[Any], Any]


def decay_mask(params: Any, no_decay: tuple[str, ...] = ("pooler",)) -> Any:
    """A pytree of bools like ``params``: True where weight decay applies.

    Decayed: dense weights and the token/position/segment embeddings. Not decayed: every ``bias``, every
    LayerNorm ``scale``/``bias``, and anything under a module named in ``no_decay``.
    """

    def mark(path: tuple, leaf: Any) -> Any:
        if isinstance(leaf, LayerNorm):
            return jax.tree.map(lambda _: False, leaf)
        names = _names(path)
        return not (names[-1] == "bias" or any(n in names for n in no_decay))

    return jax.tree_util.tree_map_with_path(mark, params, is_leaf=lambda x: isinstance(x, LayerNorm))


@dataclass(frozen=True)
class AdamWSettings:
    """The optimizer's fixed hyperparameters; hashable, so jitted steps can rebuild the optimizer from it."""

    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.01
    clip_norm: float = 0.5  # 0 disables clipping
    no_decay: tuple[str, ...] = ("pooler",)  # modules exempt from weight decay (besides biases and LayerNorms)
    layer_decay: float = 1.0  # layer-wise learning-rate decay (1: none); see depth_scales

    @classmethod
    def of(cls, section: OptimizerFields) -> "AdamWSettings":
        """The settings of a config's optimizer section: ``cfg.train`` (pretraining: the pooler is not decayed,
        the MLM loss does not train it) or ``cfg.finetune`` (the pooler feeds the classifier and is decayed like
        every other weight, BERT's recipe)."""
        no_decay = ("pooler",) if isinstance(section, TrainConfig) else ()
        return cls(section.beta1, section.beta2, section.eps, section.weight_decay, section.clip_norm, no_decay,
                   getattr(section, "layer_decay", 1.0))


def depth_scales(params: Any, decay: float) -> Any:
    """Layer-wise learning-rate decay: a pytree like ``params`` of multipliers for the updates. With ``L``
    encoder layers, the embeddings get ``decay ** (L + 1)``, encoder layer ``i`` (0 = the lowest) ``decay ** (L
    - i)`` (an ``(L, 1, ...)`` array: the layers' parameters are stacked on their first axis), everything above
    the encoder (final LayerNorm, pooler, task head) 1. Scaling AdamW's update scales its weight decay too, so
    this is exactly a learning rate per depth."""
    layers = {leaf.shape[0] for path, leaf in jax.tree_util.tree_leaves_with_path(params) if _under(path, "layers")}
    if len(layers) != 1:
        raise ValueError(f"layer-wise lr decay: expected one stack of encoder layers, found leading sizes {layers}")
    depth = layers.pop()

    def scale(path: tuple, leaf: Any) -> Any:
        if _under(path, "embeddings"):
            return jnp.asarray(decay ** (depth + 1), jnp.float32)
        if _under(path, "layers"):
            powers = jnp.asarray([decay ** (depth - i) for i in range(depth)], jnp.float32)
            return powers.reshape((depth,) + (1,) * (leaf.ndim - 1))
        return jnp.asarray(1.0, jnp.float32)

    return jax.tree_util.tree_map_with_path(scale, params)


def _names(path: tuple) -> list:
    """The attribute names or dict keys along a pytree path."""
    return [getattr(k, "name", getattr(k, "key", None)) for k in path]


def _under(path: tuple, name: str) -> bool:
    return name in _names(path)


def make_optimizer(settings: AdamWSettings, params: Any) -> optax.GradientTransformation:
    """clip_by_global_norm (identity when clip_norm == 0) followed by AdamW with an injectable learning rate,
    then, with ``layer_decay < 1``, the updates scaled by :func:`depth_scales`."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=0.0, b1=settings.b1, b2=settings.b2, eps=settings.eps, weight_decay=settings.weight_decay,
        mask=decay_mask(params, settings.no_decay))
    clip = optax.clip_by_global_norm(settings.clip_norm) if settings.clip_norm > 0 else optax.identity()
    if settings.layer_decay == 1.0:
        return optax.chain(clip, adamw)
    scales = depth_scales(params, settings.layer_decay)
    by_depth = optax.stateless(lambda updates, params=None: jax.tree.map(
        lambda u, s: u * s.astype(u.dtype), updates, scales))
    return optax.chain(clip, adamw, by_depth)


def set_learning_rate(opt_state: Any, lr: Any) -> Any:
    """The optimizer state of :func:`make_optimizer` with its learning rate replaced (traceable)."""
    clip_state, adam_state, *rest = opt_state
    hyper = dict(adam_state.hyperparams)
    hyper["learning_rate"] = jax.numpy.asarray(lr, hyper["learning_rate"].dtype)
    return (clip_state, adam_state._replace(hyperparams=hyper), *rest)


def one_cycle(peak: float, warmup_fraction: float, final_fraction: float) -> Schedule:
    """lr(progress): linear 0 -> peak over ``warmup_fraction``, then linear peak -> final_fraction * peak at 1."""
    final = peak * final_fraction
    anneal_length = 1.0 - warmup_fraction
    if anneal_length <= 0.0:
        return optax.linear_schedule(0.0, peak, warmup_fraction)
    anneal = optax.linear_schedule(peak, final, anneal_length)
    if warmup_fraction <= 0.0:
        return anneal
    warmup = optax.linear_schedule(0.0, peak, warmup_fraction)
    return optax.join_schedules([warmup, anneal], [warmup_fraction])


def schedule_for(train: TrainConfig) -> Schedule:
    return one_cycle(train.peak_lr, train.warmup_fraction, train.final_lr_fraction)


def progress_at(train: TrainConfig, step: int, elapsed_seconds: float) -> float:
    """Training progress in [0, 1]: by steps, or by elapsed time when ``budget_minutes`` is set."""
    if train.budget_minutes is not None:
        fraction = elapsed_seconds / (60.0 * train.budget_minutes)
    else:
        fraction = step / train.steps
    return min(max(fraction, 0.0), 1.0)


def micro_batches_at(train: TrainConfig, progress: float) -> int:
    """Micro-batches per optimizer step: a linear ramp from batch_start to batch_end over batch_ramp_fraction.

    The effective batch is ``micro_batches_at(...) * micro_batch``, always a whole number of micro-batches,
    non-decreasing in progress, ``batch_start`` at progress 0 and ``batch_end`` from the end of the ramp on.
    """
    first = train.batch_start // train.micro_batch
    last = train.batch_end // train.micro_batch
    if train.batch_ramp_fraction <= 0.0:
        return last
    fraction = min(progress / train.batch_ramp_fraction, 1.0)
    return first + int((last - first) * fraction + 1e-9)
