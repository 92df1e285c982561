"""Schedules, batch-size ramp, weight-decay mask and the injectable learning rate."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbert import config
from jaxbert.model import BertForClassification, BertForMLM
from jaxbert.optim import (AdamWSettings, decay_mask, depth_scales, make_optimizer, micro_batches_at, one_cycle,
                           progress_at, set_learning_rate)


@pytest.mark.parametrize("warmup,final", [(0.1, 0.0), (0.25, 0.1), (0.0, 0.5), (1.0, 0.0)])
def test_one_cycle_end_points_and_shape(warmup, final):
    peak = 3e-3
    lr = one_cycle(peak, warmup, final)
    grid = np.linspace(0.0, 1.0, 401)
    values = np.array([float(lr(p)) for p in grid])
    top = int(np.argmax(values))
    assert values[top] == pytest.approx(peak, rel=1e-6)
    assert grid[top] == pytest.approx(warmup, abs=1.0 / 400)
    assert values[0] == (0.0 if warmup > 0 else pytest.approx(peak, rel=1e-6))
    if warmup < 1.0:
        assert values[-1] == pytest.approx(final * peak, rel=1e-5, abs=1e-12)
    assert np.all(np.diff(values[: top + 1]) >= -1e-12)  # rises to the peak
    assert np.all(np.diff(values[top:]) <= 1e-12)  # then falls
    if 0 < warmup < 1:  # linear pieces: midpoints are averages of their ends
        assert float(lr(warmup / 2)) == pytest.approx(peak / 2, rel=1e-5)
        assert float(lr((1 + warmup) / 2)) == pytest.approx(peak * (1 + final) / 2, rel=1e-5)


def _train(**changes):
    return dataclasses.replace(config.TrainConfig(), **changes)


def batch_size_at(train, progress: float) -> int:
    """Sequences per optimizer step at ``progress``."""
    return micro_batches_at(train, progress) * train.micro_batch


def test_batch_ramp_end_points_monotone_whole_micro_batches():
    t = _train(micro_batch=8, batch_start=16, batch_end=128, batch_ramp_fraction=0.3)
    grid = np.linspace(0.0, 1.0, 1001)
    sizes = [batch_size_at(t, p) for p in grid]
    assert sizes[0] == 16
    assert all(s == 128 for p, s in zip(grid, sizes) if p >= 0.3)
    assert all(s % 8 == 0 for s in sizes)
    assert all(b >= a for a, b in zip(sizes, sizes[1:]))
    assert set(sizes) == set(range(16, 129, 8))  # every whole number of micro-batches is visited
    assert batch_size_at(t, 0.15) == pytest.approx(72, abs=8)  # about halfway at half the ramp


def test_batch_ramp_disabled_uses_batch_end():
    t = _train(micro_batch=8, batch_start=8, batch_end=32, batch_ramp_fraction=0.0)
    assert {micro_batches_at(t, p) for p in (0.0, 0.5, 1.0)} == {4}


def test_progress_by_steps_and_by_time():
    t = _train(steps=200)
    assert progress_at(t, 50, elapsed_seconds=1e6) == 0.25
    assert progress_at(t, 400, 0.0) == 1.0
    timed = _train(steps=200, budget_minutes=2.0)
    assert progress_at(timed, 199, elapsed_seconds=30.0) == 0.25  # steps are ignored in budget mode
    assert progress_at(timed, 0, elapsed_seconds=500.0) == 1.0


def test_decay_mask_excludes_biases_layernorm_and_pooler(tiny_config):
    model = BertForMLM(dataclasses.replace(tiny_config.model, bias=True), key=jax.random.PRNGKey(0))
    assert model.bert.layers.qkv.bias is not None  # the encoder's linear biases exist, so their mask is checked
    mask = decay_mask(model)
    assert mask.bert.layers.qkv.weight and mask.bert.layers.ffn_out.weight and mask.mlm.transform.weight
    assert mask.bert.embeddings.token and mask.bert.embeddings.position and mask.bert.embeddings.segment
    assert not mask.bert.layers.qkv.bias and not mask.mlm.bias
    assert not mask.bert.layers.attn_norm.scale and not mask.bert.layers.attn_norm.bias
    assert not mask.bert.embeddings.norm.scale and not mask.bert.final_norm.scale and not mask.mlm.norm.scale
    assert not mask.bert.pooler.weight and not mask.bert.pooler.bias


def test_weight_decay_and_learning_rate_input():
    params = {"w": jnp.ones((3, 3)), "bias": jnp.ones(3)}
    tx = make_optimizer(AdamWSettings(weight_decay=0.5, clip_norm=0.0), params)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    state = set_learning_rate(tx.init(params), 0.1)
    updates, _ = tx.update(zero_grads, state, params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((3, 3)), rtol=1e-6)  # decoupled decay only
    np.testing.assert_array_equal(updates["bias"], np.zeros(3))  # biases are not decayed
    half, _ = tx.update(zero_grads, set_learning_rate(state, 0.05), params)
    np.testing.assert_allclose(half["w"], updates["w"] / 2, rtol=1e-6)


def test_matches_optax_reference_chain_over_several_steps():
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "bias": jnp.ones(3)}
    settings = AdamWSettings(b1=0.8, b2=0.95, eps=1e-7, weight_decay=0.1, clip_norm=1.0)
    tx = make_optimizer(settings, params)
    reference = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(0.01, b1=0.8, b2=0.95, eps=1e-7, weight_decay=0.1,
                                        mask={"w": True, "bias": False}))
    state, ref_state, p_ours, p_ref = tx.init(params), reference.init(params), params, params
    for i, scale in enumerate((100.0, 0.01, 5.0)):
        grads = jax.tree.map(lambda x: scale * jnp.cos(x + i), params)
        updates, state = tx.update(grads, set_learning_rate(state, 0.01), p_ours)
        ref_updates, ref_state = reference.update(grads, ref_state, p_ref)
        p_ours, p_ref = optax.apply_updates(p_ours, updates), optax.apply_updates(p_ref, ref_updates)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_layer_decay_scales_each_depth_like_its_own_learning_rate(tiny_config):
    cfg = dataclasses.replace(tiny_config.model, layers=3)
    model = BertForClassification(cfg, 3, key=jax.random.PRNGKey(0))
    scales = depth_scales(model, 0.5)
    assert float(scales.bert.embeddings.token) == 0.5 ** 4  # below the first layer: decay ** (L + 1)
    np.testing.assert_allclose(np.asarray(scales.bert.layers.qkv.weight).ravel(), [0.125, 0.25, 0.5])
    assert scales.bert.layers.attn_norm.scale.shape == (3, 1)  # broadcasts over each layer's own axes
    assert float(scales.classifier.weight) == float(scales.bert.pooler.weight) == 1.0
    # one AdamW step: the update of each leaf is the plain update times its scale (weight decay included)
    grads = jax.tree.map(lambda x: jnp.cos(3.0 * x) + 0.1, model)
    plain, decayed = (make_optimizer(AdamWSettings(weight_decay=0.1, no_decay=(), layer_decay=d), model)
                      for d in (1.0, 0.5))
    u_plain, _ = plain.update(grads, set_learning_rate(plain.init(model), 1e-3), model)
    state = set_learning_rate(decayed.init(model), 1e-3)
    u_decayed, state = decayed.update(grads, state, model)
    for a, b, s in zip(jax.tree.leaves(u_decayed), jax.tree.leaves(u_plain), jax.tree.leaves(scales)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) * np.asarray(s), rtol=1e-6, atol=1e-12)
    assert len(state) == 3 and set_learning_rate(state, 2e-3)[1].hyperparams["learning_rate"] == 2e-3
    assert len(plain.init(model)) == 2  # without decay the state keeps its old structure (checkpoints)


def test_layer_decay_is_validated_and_read_from_the_finetune_section():
    assert AdamWSettings.of(config.load("tiny", ["finetune.layer_decay=0.8"]).finetune).layer_decay == 0.8
    assert AdamWSettings.of(config.load("tiny").train).layer_decay == 1.0  # pretraining has no such setting
    for bad in ("0", "1.5"):
        with pytest.raises(config.ConfigError, match="finetune.layer_decay"):
            config.load("tiny", [f"finetune.layer_decay={bad}"])
