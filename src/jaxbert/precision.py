"""Mixed precision as values: a :class:`Policy` (parameter / compute / output dtypes) and dynamic loss scaling.

Parameters are always stored in float32 (the master copy). The compute dtype is what matmuls and activations
use; softmax, logits and losses are computed in float32 whatever the policy says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16, "fp8": jnp.bfloat16,
           "fp8_delayed": jnp.bfloat16}


@dataclass(frozen=True)
class Policy:
    """Which dtype each kind of value uses. Hashable, so it can be a static argument of a jitted function."""

    compute_dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32
    fp8: bool = False  # encoder matmuls through float8 operands (jaxbert.model.fp8); compute dtype bf16
    # ... scaled from amax histories kept in the training state (jaxbert.model.fp8_delayed); where no history is
    # passed (evaluation, inference) the matmuls fall back to current scaling
    fp8_delayed: bool = False

    @classmethod
    def from_name(cls, name: str) -> "Policy":
        """``fp32``, ``bf16``, ``fp16``, ``fp8`` (bf16 compute with the encoder layers' matmuls in FP8, per-tensor
        current scaling) or ``fp8_delayed`` (the same with delayed scaling)."""
        if name not in _DTYPES:
            raise ValueError(f"precision '{name}': expected one of {', '.join(_DTYPES)}")
        fp8 = name in ("fp8", "fp8_delayed")
        return cls(compute_dtype=_DTYPES[name], fp8=fp8, fp8_delayed=name == "fp8_delayed")

    @property
    def needs_loss_scaling(self) -> bool:
        return jnp.dtype(self.compute_dtype) == jnp.float16

    def cast_to_compute(self, tree: Any) -> Any:
        """Cast the floating-point arrays of a pytree to the compute dtype."""
        return _cast_floats(tree, self.compute_dtype)


def _cast_floats(tree: Any, dtype: Any) -> Any:
    def cast(x: Any) -> Any:
        if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


class LossScale(eqx.Module):
    """Dynamic loss scaling: double after ``period`` finite steps, halve (and skip) on non-finite gradients.

    With ``dynamic=False`` the scale stays at 1 and every step is applied (fp32 / bf16 training).
    """

    scale: jax.Array
    good_steps: jax.Array
    period: int = eqx.field(static=True)
    dynamic: bool = eqx.field(static=True)

    @classmethod
    def create(cls, initial: float = 2.0**15, period: int = 2000, dynamic: bool = True) -> "LossScale":
        value = initial if dynamic else 1.0
        return cls(jnp.asarray(value, jnp.float32), jnp.asarray(0, jnp.int32), period, dynamic)

    def scale_loss(self, loss: jax.Array) -> jax.Array:
        return loss * self.scale.astype(loss.dtype) if self.dynamic else loss

    def unscale(self, grads: Any) -> Any:
        if not self.dynamic:
            return grads
        inv = 1.0 / self.scale
        return jax.tree.map(lambda g: g.astype(jnp.float32) * inv, grads)

    def update(self, finite: jax.Array) -> "LossScale":
        """The scale after a step whose gradients were (not) all finite."""
        if not self.dynamic:
            return self
        grow = jnp.logical_and(finite, self.good_steps + 1 >= self.period)
        scale = jnp.where(finite, jnp.where(grow, self.scale * 2.0, self.scale), jnp.maximum(self.scale / 2.0, 1.0))
        good = jnp.where(jnp.logical_and(finite, ~grow), self.good_steps + 1, 0)
        return LossScale(scale, good.astype(jnp.int32), self.period, self.dynamic)


def all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if eqx.is_inexact_array(x)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)
