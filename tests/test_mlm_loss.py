"""The MLM training loss without returned logits (heads.decode_cross_entropy, train.mlm_logits)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbert import config, train
from jaxbert.model import BertForMLM
from jaxbert.model.heads import decode, decode_cross_entropy
from jaxbert.precision import Policy


def _inputs(dtype, rows=(3, 5), hidden=16, vocab=50, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    h = (2.0 * jax.random.normal(k[0], (*rows, hidden))).astype(dtype)
    table = jax.random.normal(k[1], (vocab, hidden))
    bias = 0.5 * jax.random.normal(k[2], (vocab,))
    targets = jax.random.randint(k[3], rows, 0, vocab)
    weights = jnp.arange(np.prod(rows), dtype=jnp.float32).reshape(rows) % 3  # 0 drops a slot, as padding does
    return h, table, bias, targets, weights


def _reference(h, table, bias, targets, weights):
    """The path this replaces: float32 logits from `decode`, optax's cross-entropy, argmax accuracy."""
    logits = decode(h, table) + bias
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * weights), (jnp.argmax(logits, -1) == targets).astype(jnp.float32)


def _fused(h, table, bias, targets, weights, dtype=jnp.float32):
    nll, correct = decode_cross_entropy(h, table, bias, targets, dtype)
    return jnp.sum(nll * weights), correct


def test_float32_logits_equal_the_reference_values_and_gradients():
    h, table, bias, targets, weights = _inputs(jnp.float32)
    (ref, ref_correct), ref_grads = jax.value_and_grad(_reference, argnums=(0, 1, 2), has_aux=True)(
        h, table, bias, targets, weights)
    (got, correct), grads = jax.value_and_grad(_fused, argnums=(0, 1, 2), has_aux=True)(
        h, table, bias, targets, weights)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(correct), np.asarray(ref_correct))
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


def test_correct_is_the_target_being_the_row_maximum():
    h, table, bias, _, _ = _inputs(jnp.float32)
    logits = decode(h, table) + bias
    best = jnp.argmax(logits, -1)
    _, correct = decode_cross_entropy(h, table, bias, best, jnp.float32)
    assert np.all(np.asarray(correct) == 1.0)
    _, wrong = decode_cross_entropy(h, table, bias, (best + 1) % table.shape[0], jnp.float32)
    assert np.all(np.asarray(wrong) == 0.0)


def test_bf16_logits_stay_close_and_keep_gradient_dtypes():
    h, table, bias, targets, weights = _inputs(jnp.bfloat16)
    (ref, _), ref_grads = jax.value_and_grad(_reference, argnums=(0, 1, 2), has_aux=True)(
        h, table, bias, targets, weights)
    (got, _), grads = jax.value_and_grad(_fused, argnums=(0, 1, 2), has_aux=True)(
        h, table, bias, targets, weights, jnp.bfloat16)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32 and grads[2].dtype == jnp.float32
    # bf16 logits: an absolute error of ~1 bf16 ulp of the logits (|logit| < 32 here) per slot
    assert abs(float(got) - float(ref)) <= 0.02 * float(jnp.sum(weights))
    for g, r in zip(grads, ref_grads):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.abs(g - r).max() <= 0.03 * np.abs(r).max()


def test_zero_weight_slots_send_no_gradient():
    h, table, bias, targets, weights = _inputs(jnp.float32)
    grads = jax.grad(lambda h: _fused(h, table, bias, targets, weights)[0])(h)
    dropped = np.asarray(weights) == 0
    assert dropped.any()
    assert np.all(np.asarray(grads)[dropped] == 0.0)
    assert np.all(np.abs(np.asarray(grads)[~dropped]).sum(-1) > 0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_steps_with_compute_dtype_logits(tiny_config, precision):
    """train.mlm_logits=compute: equal to float32 logits under fp32; under bf16 the loss stays close and falls."""
    base = config.replace(tiny_config, train={"precision": precision, "micro_batch": 4, "batch_start": 4,
                                              "batch_end": 4, "peak_lr": 3e-3})
    rng = np.random.default_rng(0)
    ids = rng.integers(5, base.model.vocab_size, (4, base.data.seq_len), dtype=np.int32)
    losses = {}
    for logits in ("float32", "compute"):
        cfg = config.replace(base, train={"mlm_logits": logits})
        spec = train.make_spec(cfg, (0, 1, 2, 3, 4), 4)
        state = train.init_state(cfg, key=jax.random.PRNGKey(0))
        run = []
        for _ in range(8):
            state, metrics = train.train_step(state, [ids], cfg.train.peak_lr, spec)
            run.append(float(metrics["loss"]))
        losses[logits] = run
    if precision == "fp32":
        np.testing.assert_allclose(losses["compute"], losses["float32"], rtol=1e-5)
    else:
        np.testing.assert_allclose(losses["compute"], losses["float32"], rtol=0.02)
    assert losses["compute"][-1] < losses["compute"][0]


def test_mlm_logits_key_is_validated(tiny_config):
    with pytest.raises(ValueError, match="train.mlm_logits"):
        config.replace(tiny_config, train={"mlm_logits": "bf16"})
