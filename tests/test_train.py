"""The train step: accumulation equals the full batch, masking invariance, loss scaling, skipped steps, loop."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY
from jaxbert import config
from jaxbert.checkpoint import Progress
from jaxbert.precision import LossScale
from jaxbert.train import (Periodic, TrainingDiverged, apply_step, evaluate, init_state, make_spec, mask_rows,
                           micro_batch_stream, micro_step, mlm_sums, run_loop, train_step, zero_accumulator)

SPECIAL = (0, 1, 2, 3, 4)
MASK_ID = 4
OVERRIDES = TINY + ["train.micro_batch=4", "train.batch_start=4", "train.batch_end=8", "train.peak_lr=1e-2",
                    "train.warmup_fraction=0.0", "train.weight_decay=0.0"]


def _config(*extra: str) -> config.Config:
    return config.load("tiny", OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def cfg() -> config.Config:
    return _config()


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.random.default_rng(0).integers(5, 128, (8, 32)).astype(np.int32)


@eqx.filter_jit
def _reference_grads(state, ids, spec):
    """The mean-loss gradient of the whole batch, computed directly (no micro-steps, no accumulator)."""
    _, step_key = jax.random.split(state.key)
    mask_key, _ = jax.random.split(step_key)
    batch = mask_rows(jnp.asarray(ids), mask_key, jnp.int32(0), spec)

    def mean_loss(model):
        total, (weight, _) = mlm_sums(model, batch, spec, None)
        return total / weight

    return eqx.filter_grad(mean_loss)(state.model)


def test_masks_do_not_depend_on_micro_batch_split(cfg, ids):
    spec = make_spec(cfg, SPECIAL, MASK_ID)
    key = jax.random.PRNGKey(3)
    masked = eqx.filter_jit(mask_rows)
    whole = masked(jnp.asarray(ids), key, jnp.int32(0), spec)
    halves = [masked(jnp.asarray(ids[i:i + 4]), key, jnp.int32(i), spec) for i in (0, 4)]
    for name in whole._fields:
        joined = np.concatenate([np.asarray(getattr(h, name)) for h in halves])
        np.testing.assert_array_equal(np.asarray(getattr(whole, name)), joined)
    assert float(whole.weights.sum()) > 0


def test_accumulated_gradients_equal_full_batch_gradient(cfg, ids):
    spec = make_spec(cfg, SPECIAL, MASK_ID)
    state = init_state(cfg, key=jax.random.PRNGKey(0))
    accum = zero_accumulator(state.model)
    for i in (0, 4):
        accum = micro_step(state, accum, jnp.asarray(ids[i:i + 4]), jnp.int32(i), spec)
    accumulated = jax.tree.map(lambda g: g / accum.weight_sum, accum.grads)
    reference = _reference_grads(state, ids, spec)
    for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-7)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(reference))


@pytest.mark.parametrize("options", [(), ("model.bias=true",), ("model.ffn_type=glu", "model.ffn=48"),
                                     ("model.dropout=0.1",)], ids=["default", "bias", "glu", "dropout"])
def test_train_step_reduces_loss_and_is_deterministic(cfg, ids, options):
    cfg = _config(*options) if options else cfg
    spec = make_spec(cfg, SPECIAL, MASK_ID)

    def run():
        state = init_state(cfg, key=jax.random.PRNGKey(0))
        losses = []
        for _ in range(12):
            state, metrics = train_step(state, [ids[:4], ids[4:]], 1e-2, spec)
            losses.append(float(metrics["loss"]))
        return state, losses

    state_a, losses = run()
    state_b, _ = run()
    assert np.mean(losses[-3:]) < losses[0] - 0.2
    assert int(state_a.step) == 12 and int(state_a.skipped) == 0
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pretraining_dropout_acts_in_the_step(cfg, ids):
    """model.dropout > 0 in pretraining: the same start and batch give another loss than without dropout (the
    micro-batches of the test above: its compiled steps are reused)."""
    losses = []
    for c in (cfg, _config("model.dropout=0.1")):
        _, metrics = train_step(init_state(c, key=jax.random.PRNGKey(0)), [ids[:4], ids[4:]], 1e-2,
                                make_spec(c, SPECIAL, MASK_ID))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and abs(losses[0] - losses[1]) > 1e-4


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_injected_inf_skips_step_and_keeps_parameters_bitwise(cfg, ids):
    spec = make_spec(cfg, SPECIAL, MASK_ID)
    state = init_state(cfg, key=jax.random.PRNGKey(0))
    before = jax.tree.map(np.array, state)  # host copies: the step donates its inputs
    accum = micro_step(state, zero_accumulator(state.model), jnp.asarray(ids[:4]), jnp.int32(0), spec)
    poisoned = eqx.tree_at(lambda a: a.grads.bert.layers.qkv.weight, accum,
                           accum.grads.bert.layers.qkv.weight.at[0, 0, 0].set(jnp.inf))
    new, _, metrics = apply_step(jnp.float32(1e-2), state, poisoned, spec)
    assert int(metrics["skipped"]) == 1 and int(new.skipped) == 1 and int(new.consecutive_skipped) == 1
    assert _leaves_equal(new.model, before.model)
    assert _leaves_equal(new.opt_state, before.opt_state)
    assert int(new.step) == 1  # the step (and its data) still counts
    new2, _ = train_step(new, [ids[:4]], 1e-2, spec)  # a finite step afterwards updates and resets the run
    assert int(new2.consecutive_skipped) == 0 and int(new2.skipped) == 1
    assert not _leaves_equal(new2.model, before.model)


def _tiny_token_embedding(state, factor):
    return eqx.tree_at(lambda s: s.model.bert.embeddings.token, state, state.model.bert.embeddings.token * factor)


def _encoder_grads(state, ids, spec):
    accum = micro_step(state, zero_accumulator(state.model), jnp.asarray(ids), jnp.int32(0), spec)
    return jax.tree.map(lambda g: g / accum.weight_sum, accum.grads.bert.layers)


def test_fp16_gradients_underflow_without_loss_scaling_and_survive_with_it(ids):
    """With a tiny token embedding (tied decoder), the fp16 gradient reaching the encoder is below fp16's
    smallest subnormal: exactly zero without scaling, close to the fp32 gradient with dynamic scaling."""
    fp16 = _config("train.precision=fp16")
    spec16 = make_spec(fp16, SPECIAL, MASK_ID)
    spec32 = make_spec(_config(), SPECIAL, MASK_ID)
    base = _tiny_token_embedding(init_state(fp16, key=jax.random.PRNGKey(0)), 1e-6)
    reference = _encoder_grads(eqx.tree_at(lambda s: s.loss_scale, base, LossScale.create(dynamic=False)),
                               ids[:4], spec32)
    unscaled = _encoder_grads(eqx.tree_at(lambda s: s.loss_scale, base, LossScale.create(dynamic=False)),
                              ids[:4], spec16)
    scaled = _encoder_grads(base, ids[:4], spec16)
    ref_norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(reference)))
    assert ref_norm > 0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(unscaled))
    err = np.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(scaled),
                                                                   jax.tree.leaves(reference))))
    assert err < 0.1 * ref_norm


def test_fp16_training_with_loss_scaling_moves_the_encoder_and_lowers_loss(ids):
    """Same underflowing setup: a step without scaling leaves the encoder bitwise unchanged (zero gradients,
    no weight decay), a step with scaling updates it, and training with scaling lowers the loss."""
    fp16 = _config("train.precision=fp16")
    spec = make_spec(fp16, SPECIAL, MASK_ID)
    fresh = lambda: _tiny_token_embedding(init_state(fp16, key=jax.random.PRNGKey(0)), 1e-6)  # noqa: E731
    scaled = fresh()  # separate buffers for each run: steps donate their inputs
    unscaled = eqx.tree_at(lambda s: s.loss_scale, fresh(), LossScale.create(dynamic=False))
    encoder_before = jax.tree.map(np.array, scaled.model.bert.layers)
    unscaled, _ = train_step(unscaled, [ids[:4], ids[4:]], 1e-2, spec)
    assert _leaves_equal(unscaled.model.bert.layers, encoder_before)
    losses = []
    for _ in range(10):
        scaled, metrics = train_step(scaled, [ids[:4], ids[4:]], 1e-2, spec)
        losses.append(float(metrics["loss"]))
        if len(losses) == 1:
            assert int(scaled.skipped) == 0 and not _leaves_equal(scaled.model.bert.layers, encoder_before)
    assert int(scaled.skipped) <= 2
    assert np.mean(losses[-3:]) < losses[0] - 0.1


def test_loss_scale_halves_on_overflow_and_grows_after_period():
    scale = LossScale.create(initial=1024.0, period=2)
    assert float(scale.update(jnp.asarray(False)).scale) == 512.0
    grown = scale.update(jnp.asarray(True)).update(jnp.asarray(True))
    assert float(grown.scale) == 2048.0


def test_loop_ramps_batch_logs_and_stops_on_persistent_non_finite_loss(cfg, ids):
    ramp = _config("train.steps=6", "train.batch_ramp_fraction=0.5", "impl.log_every=2", "train.max_skipped_steps=2")
    spec = make_spec(ramp, SPECIAL, MASK_ID)
    sample = lambda start, count: np.roll(ids, -start, axis=0)[:count]  # noqa: E731
    logs, seen = [], []
    hook = Periodic(every=3, fn=lambda s, p: seen.append(p.step))
    state, progress, reason = run_loop(ramp, init_state(ramp, key=jax.random.PRNGKey(0)), Progress(), spec,
                                       micro_batch_stream(sample, 0, 4), hooks=[hook],
                                       on_log=lambda step, m: logs.append((step, m)))
    assert reason == "done" and progress.step == 6 and int(state.step) == 6
    assert [s for s, _ in logs] == [2, 4, 6] and seen == [3, 6]
    sizes = [m["batch_size"] for _, m in logs]
    assert sizes[0] == 4 and sizes[-1] == 8
    assert progress.data_position == 4 + 4 + 4 + 8 + 8 + 8  # ramp 4 -> 8 over the first half
    bad = eqx.tree_at(lambda s: s.model.mlm.bias, state, state.model.mlm.bias.at[0].set(jnp.nan))
    more = dataclasses.replace(ramp, train=dataclasses.replace(ramp.train, steps=12))
    with pytest.raises(TrainingDiverged, match="max_skipped_steps"):
        run_loop(more, bad, progress, spec, micro_batch_stream(sample, 0, 4))


def test_evaluate_is_repeatable_with_a_fixed_key(cfg, ids):
    spec = make_spec(cfg, SPECIAL, MASK_ID)
    model = init_state(cfg, key=jax.random.PRNGKey(0)).model
    first = evaluate(model, [ids[:4], ids[4:]], spec, jax.random.PRNGKey(7))
    again = evaluate(model, [ids[:4], ids[4:]], spec, jax.random.PRNGKey(7))
    assert first == again and first["loss"] == pytest.approx(np.log(128), rel=0.1)


def test_time_budget_mode_stops_at_the_budget_and_anneals_lr(cfg, ids):
    timed = _config("train.budget_minutes=0.05", "train.steps=1", "impl.log_every=1")  # 3 s; steps ignored
    spec = make_spec(timed, SPECIAL, MASK_ID)
    train_step(init_state(timed, key=jax.random.PRNGKey(1)), [ids[:4]], 1e-2, spec)  # compile outside the budget
    sample = lambda start, count: np.roll(ids, -start, axis=0)[:count]  # noqa: E731
    logs = []
    state, progress, reason = run_loop(timed, init_state(timed, key=jax.random.PRNGKey(0)), Progress(), spec,
                                       micro_batch_stream(sample, 0, 4), on_log=lambda s, m: logs.append(m))
    assert reason == "done" and progress.elapsed_seconds >= 3.0 and progress.step > 1
    lrs = [m["lr"] for m in logs]
    assert lrs[0] == pytest.approx(1e-2, rel=0.2) and lrs[-1] < lrs[0]  # the schedule follows elapsed time


def test_single_step_equals_the_accumulating_path(cfg, ids):
    """k = 1 takes one fused program; it gives the numbers of zero_accumulator + micro_step + apply_step."""
    spec = make_spec(cfg, SPECIAL, MASK_ID)
    fused = init_state(cfg, key=jax.random.PRNGKey(3))
    stepwise = init_state(cfg, key=jax.random.PRNGKey(3))
    for _ in range(3):
        fused, fm = train_step(fused, [ids[:4]], 1e-2, spec)  # one micro-batch: single_step
        accum = micro_step(stepwise, zero_accumulator(stepwise.model), jnp.asarray(ids[:4]), jnp.int32(0), spec)
        stepwise, _, sm = apply_step(jnp.float32(1e-2), stepwise, accum, spec)
    # The two programs may order float32 sums differently (XLA fuses each on its own); after three AdamW steps at
    # lr 1e-2 that reaches ~1e-7 in absolute terms on parameters of size ~0.01-0.05 (measured: one element of
    # 2,048 at 1.3e-7), so parameters agree to 1e-6 relative or 5e-7 absolute.
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(stepwise)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-6, atol=5e-7)
    assert float(fm["loss"]) == pytest.approx(float(sm["loss"]), rel=1e-6)
    assert int(fused.step) == 3


def test_compilation_in_the_middle_of_a_run_is_not_training_time():
    """The clock sums JAX's trace/lower/compile events while open, and stops listening when closed."""
    from jaxbert.train import CompileClock

    with CompileClock() as clock:
        jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.25)(jnp.arange(7.0)).block_until_ready()
        assert clock.take() > 0.0
        assert clock.take() == 0.0  # taken
    jax.jit(lambda x: jnp.cos(x) * 2.0 - 0.5)(jnp.arange(9.0)).block_until_ready()
    assert clock.take() == 0.0  # closed: no longer listening


def test_whole_word_masking_in_the_step_takes_the_vocabulary(ids):
    cfg = _config("data.whole_word_masking=true")
    with pytest.raises(ValueError, match="data.whole_word_masking"):
        make_spec(cfg, SPECIAL, MASK_ID)
    vocab = [f"##{i}" if i >= 64 else f"w{i}" for i in range(cfg.model.vocab_size)]  # ids 64.. are pieces
    spec = make_spec(cfg, SPECIAL, MASK_ID, vocab=vocab)
    batch = eqx.filter_jit(mask_rows)(jnp.asarray(ids), jax.random.PRNGKey(3), jnp.int32(0), spec)
    for row, positions, weights in zip(ids, np.asarray(batch.positions), np.asarray(batch.weights)):
        chosen = np.zeros(len(row), bool)
        chosen[positions[weights > 0]] = True
        assert chosen.any()
        starts = (row < 64) | (np.arange(len(row)) == 0)  # no special ids in these rows
        word = np.cumsum(starts)
        for w in np.unique(word[chosen]):
            assert chosen[word == w].all()
    default = eqx.filter_jit(mask_rows)(jnp.asarray(ids), jax.random.PRNGKey(3), jnp.int32(0), make_spec(
        _config(), SPECIAL, MASK_ID, vocab=vocab))  # the vocabulary alone changes nothing
    reference = eqx.filter_jit(mask_rows)(jnp.asarray(ids), jax.random.PRNGKey(3), jnp.int32(0),
                                          make_spec(_config(), SPECIAL, MASK_ID))
    for a, b in zip(default, reference):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state = init_state(cfg, key=jax.random.PRNGKey(0))
    losses = []
    for _ in range(12):
        state, metrics = train_step(state, [ids[:4], ids[4:]], 1e-2, spec)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-3:]) < losses[0] - 0.2
