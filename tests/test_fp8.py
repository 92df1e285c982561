"""FP8 matmuls (jaxbert.model.fp8): rounding, scaling, forward/backward against exact matmuls, training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbert import config
from jaxbert.model.fp8 import E4M3, E5M2, dequantize, fp8_matmul, quantize
from jaxbert.precision import Policy
from jaxbert.train import init_state, make_spec, train_step


def _normal(seed: int, shape: tuple[int, ...], dtype=jnp.bfloat16) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize("dtype, mantissa_bits", [(E4M3, 3), (E5M2, 2)])
def test_quantize_round_trip_within_half_an_ulp_and_uses_the_range(dtype, mantissa_bits):
    x = _normal(0, (64, 96), jnp.float32) * 1e-3  # far below the fp8 range: the scale must bring it up
    q, inv = quantize(x, dtype)
    assert q.dtype == dtype
    back = np.asarray(dequantize(q, inv, jnp.float32))
    big = np.abs(np.asarray(x)) > 1e-2 * float(jnp.max(jnp.abs(x)))  # clear of the subnormal range
    rel = np.abs(back - np.asarray(x))[big] / np.abs(np.asarray(x))[big]
    assert rel.max() <= 2.0 ** -(mantissa_bits + 1) + 1e-6
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == float(jnp.finfo(dtype).max)  # amax maps to max


def test_quantize_of_zeros_is_zero_and_finite():
    q, inv = quantize(jnp.zeros((4, 4), jnp.bfloat16), E4M3)
    assert np.all(np.asarray(q.astype(jnp.float32)) == 0) and np.isfinite(float(inv))


def test_forward_is_the_matmul_of_the_rounded_operands_and_close_to_exact():
    x, w = _normal(1, (2, 16, 64)), _normal(2, (64, 48)) * 0.02
    y = fp8_matmul(x, w)
    assert y.shape == (2, 16, 48) and y.dtype == jnp.bfloat16
    xq, xs = quantize(x.reshape(-1, 64), E4M3)
    wq, ws = quantize(w, E4M3)
    emulated = (dequantize(xq, xs, jnp.bfloat16) @ dequantize(wq, ws, jnp.bfloat16)).reshape(2, 16, 48)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(emulated, np.float32))
    exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    err = np.linalg.norm(np.asarray(y, np.float32) - exact) / np.linalg.norm(exact)
    assert 1e-3 < err < 0.06  # rounded (not a bf16 matmul in disguise), yet close


def test_scaling_makes_the_result_equivariant_to_powers_of_two():
    x, w = _normal(3, (32, 64)), _normal(4, (64, 32))
    y = np.asarray(fp8_matmul(x, w), np.float32)
    np.testing.assert_array_equal(np.asarray(fp8_matmul(x * 2.0**-12, w * 2.0**5), np.float32), y * 2.0**-7)


def test_gradients_close_to_the_exact_gradients():
    x, w = _normal(5, (4, 8, 64)), _normal(6, (64, 32)) * 0.05
    probe = _normal(7, (4, 8, 32), jnp.float32)

    def loss(f, x, w):
        return jnp.sum(f(x, w).astype(jnp.float32) * probe)

    gx, gw = jax.grad(lambda x, w: loss(fp8_matmul, x, w), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(lambda x, w: loss(lambda a, b: a.astype(jnp.float32) @ b.astype(jnp.float32), x, w),
                      argnums=(0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
    assert gx.dtype == x.dtype and gw.dtype == w.dtype
    for got, ref in ((gx, rx), (gw, rw)):
        got, ref = np.asarray(got, np.float32).ravel(), np.asarray(ref).ravel()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.1
        assert np.dot(got, ref) / (np.linalg.norm(got) * np.linalg.norm(ref)) > 0.995


def test_mixed_operand_dtypes_are_refused():
    with pytest.raises(TypeError, match="one dtype"):
        fp8_matmul(_normal(0, (4, 8)), _normal(1, (8, 4), jnp.float32))


def test_fp8_precision_trains_like_bf16():
    overrides = ["model.hidden=64", "model.heads=2", "model.ffn=128", "model.vocab_size=128",
                 "model.max_positions=32", "finetune.max_len=32", "data.seq_len=32", "data.max_predictions=6",
                 "train.micro_batch=8", "train.batch_start=8", "train.batch_end=8", "train.warmup_fraction=0.0"]
    ids = np.random.default_rng(0).integers(5, 128, (8, 32)).astype(np.int32)
    ids[:, 1::2] = (ids[:, ::2] * 7) % 123 + 5  # every odd token is a function of its left neighbour: learnable
    losses = {}
    for name in ("bf16", "fp8"):
        cfg = config.load("tiny", overrides + [f"train.precision={name}"])
        assert Policy.from_name(name).fp8 == (name == "fp8")
        spec = make_spec(cfg, (0, 1, 2, 3, 4), 4)
        state = init_state(cfg, key=jax.random.PRNGKey(0))
        history = []
        for _ in range(30):
            state, metrics = train_step(state, [ids], 3e-3, spec)
            history.append(float(metrics["loss"]))
        assert int(state.skipped) == 0
        losses[name] = history
    assert np.mean(losses["fp8"][-5:]) < losses["fp8"][0] - 0.5
    assert abs(np.mean(losses["fp8"][-5:]) - np.mean(losses["bf16"][-5:])) < 0.15
    assert losses["fp8"] != losses["bf16"]  # the FP8 path really ran
