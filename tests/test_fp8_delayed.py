"""FP8 with delayed scaling (jaxbert.model.fp8_delayed): equality with current scaling, the amax channel, the
history in the training state (accumulation, skipped steps, optimizer, checkpoints), a tiny model that trains."""

from __future__ import annotations

from io import BytesIO

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, tiny
from jaxbert import bench, config
from jaxbert import checkpoint as ckpt
from jaxbert import io as jio
from jaxbert.checkpoint import Progress
from jaxbert.model import BertForMLM
from jaxbert.model.fp8 import E4M3, fp8_matmul
from jaxbert.model.fp8_delayed import SITES, Fp8History, delayed_matmul, scales_from_amax
from jaxbert.precision import Policy
from jaxbert.train import apply_step, init_state, make_spec, micro_step, train_step, zero_accumulator

SPECIAL = (0, 1, 2, 3, 4)


def _normal(seed: int, shape: tuple[int, ...], dtype=jnp.bfloat16) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


def _absmax(x) -> float:
    return float(jnp.max(jnp.abs(x.astype(jnp.float32))))


def _bits(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


# ------------------------------------------------------------------------------------------------ the matmul


def test_with_the_current_amax_as_history_it_equals_current_scaling_forward_and_backward():
    x, w = _normal(1, (2, 16, 64)) * 3.0, _normal(2, (64, 48)) * 0.02
    g = _normal(3, (2, 16, 48)) * 1e-4
    amax = jnp.asarray([_absmax(x), _absmax(w), _absmax(g)], jnp.float32)
    older = jnp.stack([amax * 0.5, amax, amax * 0.25], axis=-1)  # the max of the history is the current amax
    scales = Fp8History(older[None, None]).scales()[0, 0]
    y_ref, vjp_ref = jax.vjp(fp8_matmul, x, w)
    y, vjp = jax.vjp(delayed_matmul, x, w, scales)
    np.testing.assert_array_equal(_bits(y), _bits(y_ref))
    for got, ref in zip(vjp(g)[:2], vjp_ref(g)):
        assert got.dtype == ref.dtype
        np.testing.assert_array_equal(_bits(got), _bits(ref))


def test_the_gradient_of_the_scales_is_the_current_amax_whatever_the_scales():
    x, w, g = _normal(4, (8, 32)) * 7.0, _normal(5, (32, 16)) * 0.1, _normal(6, (8, 16)) * 1e-3
    for stale in ([1.0, 1.0, 1.0], [448.0, 10.0, 3.0]):
        _, vjp = jax.vjp(delayed_matmul, x, w, jnp.asarray(stale, jnp.float32))
        _, _, d_scales = vjp(g)
        np.testing.assert_array_equal(np.asarray(d_scales), np.asarray([_absmax(x), _absmax(w), _absmax(g)],
                                                                        np.float32))


def test_stale_scales_saturate_instead_of_overflowing():
    x, w = _normal(7, (16, 32)), _normal(8, (32, 8)) * 0.05
    grown = 4.0 * _absmax(x)  # x grew 4x since the history was written: the scale is 4x too large
    scales = scales_from_amax(jnp.asarray([_absmax(x) / 4.0, _absmax(w), 1.0], jnp.float32))
    y = delayed_matmul(x * 4.0, w, scales)
    assert np.all(np.isfinite(_bits(y)))
    clipped = jnp.clip(x * 4.0, -grown / 4.0, grown / 4.0)  # values above the old amax end at fp8_max
    ref = delayed_matmul(clipped, w, scales)
    np.testing.assert_array_equal(_bits(y), _bits(ref))


def test_scales_zero_history_margin_and_formats():
    history = Fp8History.create(layers=2, length=4)
    assert history.amax.shape == (2, SITES, 3, 4)
    np.testing.assert_array_equal(np.asarray(history.scales()), np.ones((2, SITES, 3), np.float32))
    amax = jnp.asarray([2.0, 0.5, 1e-3], jnp.float32)
    s0, s1 = scales_from_amax(amax), scales_from_amax(amax, margin=1.0)
    np.testing.assert_allclose(np.asarray(s0), [448.0 / 2.0, 448.0 / 0.5, 57344.0 / 1e-3], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s0) / 2.0)


def test_the_history_rolls_newest_first_and_drops_the_oldest():
    history = Fp8History.create(layers=1, length=3)
    steps = [jnp.full((1, SITES, 3), v, jnp.float32) for v in (1.0, 5.0, 2.0, 3.0)]
    for amax in steps:
        history = history.record(amax)
    np.testing.assert_array_equal(np.asarray(history.amax[0, 0, 0]), [3.0, 2.0, 5.0])
    assert float(history.scales()[0, 0, 0]) == np.float32(float(jnp.finfo(E4M3).max) / np.float32(5.0))


def test_a_model_whose_scales_come_from_its_own_amaxes_equals_current_scaling():
    """At the fixed point (the scales are those of the amaxes the step records: what a history holding the current
    amax gives), loss and gradients of the whole model equal the fp8 policy's bit for bit: every site of every
    layer gets its own scales and records its own amaxes."""
    cfg = tiny("train.precision=fp8_delayed", "model.activation=gelu")
    model = BertForMLM(cfg.model, key=jax.random.PRNGKey(0))
    ids = jnp.asarray(_ids()[:4])
    positions = jnp.tile(jnp.arange(0, 32, 5)[None, :6], (4, 1))

    @jax.jit
    def loss_and_grads(model, scales):
        def loss(diff):
            model, scales = diff
            policy = Policy.from_name("fp8_delayed" if scales is not None else "fp8")
            logits = model(ids, positions=positions, policy=policy, fp8_scales=scales)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 7])
        return jax.value_and_grad(loss)((model, scales))

    ref_loss, (ref_grads, _) = loss_and_grads(model, None)
    amax = jnp.zeros((cfg.model.layers, SITES, 3), jnp.float32)
    for _ in range(2 * cfg.model.layers + 2):  # each pass fixes the scales of one more layer, forward then back
        loss, (grads, recorded) = loss_and_grads(model, scales_from_amax(amax))
        if np.array_equal(np.asarray(recorded), np.asarray(amax)):
            break
        amax = recorded
    assert np.array_equal(np.asarray(recorded), np.asarray(amax)), "the recorded amaxes did not settle"
    assert np.all(np.asarray(amax) > 0)
    assert float(loss) == float(ref_loss)
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


# ------------------------------------------------------------------------------------------ the train state


def _cfg(precision: str = "fp8_delayed", *extra: str):
    return tiny("train.micro_batch=4", "train.batch_start=8", "train.batch_end=8", "train.warmup_fraction=0.0",
                f"train.precision={precision}", "train.fp8_history=4", "model.activation=gelu", *extra)


def _ids(seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(5, 128, (8, 32)).astype(np.int32)
    ids[:, 1::2] = (ids[:, ::2] * 7) % 123 + 5  # every odd token is a function of its left neighbour: learnable
    return ids


def _micro_amax(state, spec, ids, offset):
    accum = micro_step(state, zero_accumulator(state.model, None, state.fp8), jnp.asarray(ids), jnp.int32(offset),
                       spec)
    return np.asarray(accum.amax)


def test_policy_and_state():
    policy = Policy.from_name("fp8_delayed")
    assert policy.fp8 and policy.fp8_delayed and policy.compute_dtype == jnp.bfloat16
    assert not Policy.from_name("fp8").fp8_delayed
    cfg = _cfg()
    state = init_state(cfg, key=jax.random.PRNGKey(0))
    assert state.fp8.amax.shape == (cfg.model.layers, SITES, 3, 4) and not np.any(np.asarray(state.fp8.amax))
    for other in ("bf16", "fp8"):
        assert init_state(_cfg(other), key=jax.random.PRNGKey(0)).fp8 is None


def test_one_step_records_the_max_over_micro_batches_and_the_optimizer_leaves_the_history_alone():
    cfg = _cfg()
    spec = make_spec(cfg, SPECIAL, 4)
    state = train_step(init_state(cfg, key=jax.random.PRNGKey(0)), [_ids(1)[:4], _ids(1)[4:]], 1e-3, spec)[0]
    before = np.asarray(state.fp8.amax)
    ids = _ids(2)
    halves = [_micro_amax(state, spec, ids[:4], 0), _micro_amax(state, spec, ids[4:], 4)]
    assert np.all(halves[0] > 0) and not np.array_equal(halves[0], halves[1])
    after, _ = train_step(state, [ids[:4], ids[4:]], 1e-3, spec)
    got = np.asarray(after.fp8.amax)
    np.testing.assert_array_equal(got[..., 0], np.maximum(*halves))
    np.testing.assert_array_equal(got[..., 1:], before[..., :-1])
    # the histories are not parameters: the optimizer state is the bf16 run's, leaf for leaf
    bf16 = init_state(_cfg("bf16"), key=jax.random.PRNGKey(0))
    assert jax.tree.structure(after.opt_state) == jax.tree.structure(bf16.opt_state)


def test_skipped_steps_and_non_finite_amaxes_leave_the_history_alone():
    cfg = _cfg()
    spec = make_spec(cfg, SPECIAL, 4)
    state, _ = train_step(init_state(cfg, key=jax.random.PRNGKey(0)), [_ids()[:4]], 1e-3, spec)
    before = np.asarray(state.fp8.amax)  # train_step donates its state
    for bad, skipped in ((jnp.nan, 1), (jnp.inf, 0)):  # an inf weight saturates in FP8: the step is applied
        broken = eqx.tree_at(lambda s: s.model.bert.layers.ffn_in.weight, jax.tree.map(jnp.copy, state),
                             state.model.bert.layers.ffn_in.weight.at[0, 0, 0].set(bad))
        after, metrics = train_step(broken, [_ids()[:4]], 1e-3, spec)
        assert int(metrics["skipped"]) == skipped
        np.testing.assert_array_equal(np.asarray(after.fp8.amax), before)


def test_a_tiny_model_trains_with_delayed_scaling():
    cfg = tiny("model.hidden=64", "model.ffn=128", "train.micro_batch=8", "train.batch_start=8",
               "train.batch_end=8", "train.warmup_fraction=0.0", "train.precision=fp8_delayed",
               "model.activation=gelu")
    spec = make_spec(cfg, SPECIAL, 4)
    state = init_state(cfg, key=jax.random.PRNGKey(0))
    losses = []
    for step in range(20):
        state, metrics = train_step(state, [_ids()], 3e-3, spec)
        losses.append(float(metrics["loss"]))
        filled = np.count_nonzero(np.asarray(state.fp8.amax)[0, 0, 0])
        assert filled == min(step + 1, cfg.train.fp8_history)
    assert int(state.skipped) == 0
    assert np.mean(losses[-3:]) < losses[0] - 0.5


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_keeps_the_histories_bit_identical(tmp_path, tokenizer_dir):
    cfg = _cfg()
    spec = make_spec(cfg, SPECIAL, 4)
    state = init_state(cfg, key=jax.random.PRNGKey(0))
    for seed in range(3):
        state, _ = train_step(state, [_ids(seed)[:4], _ids(seed)[4:]], 1e-3, spec)
    ckpt.save_checkpoint(tmp_path / "run", cfg, state, Progress(3, 24, 1.0), tokenizer_dir, keep=2)
    template = eqx.filter_eval_shape(init_state, cfg, key=jax.random.PRNGKey(0))
    restored, _, _ = ckpt.restore_latest(tmp_path / "run", cfg, template)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert np.count_nonzero(np.asarray(restored.fp8.amax)) > 0
    # the exported weights are the model's alone, named as a bf16 model's
    bf16 = init_state(_cfg("bf16"), key=jax.random.PRNGKey(0)).model
    assert sorted(jio.named_arrays(restored.model)) == sorted(jio.named_arrays(bf16))
    # a different history length cannot resume this checkpoint
    with pytest.raises(ckpt.CheckpointError, match="train.fp8_history"):
        ckpt.restore_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"),
                                _cfg("fp8_delayed", "train.fp8_history=8"), template)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_other_precisions_keep_their_state_file_format(precision):
    state = init_state(_cfg(precision), key=jax.random.PRNGKey(0))
    new, old = BytesIO(), BytesIO()
    eqx.tree_serialise_leaves(new, ckpt._without_model(state))
    eqx.tree_serialise_leaves(old, (None, state.opt_state, state.loss_scale, state.step, state.key, state.skipped,
                                    state.consecutive_skipped))  # the seven fields a TrainState had before
    assert new.getvalue() == old.getvalue()


# ------------------------------------------------------------------------------------------- config and bench


def test_config_accepts_fp8_delayed_for_pretraining_only():
    assert _cfg().train.precision == "fp8_delayed"
    with pytest.raises(config.ConfigError, match="finetune.precision"):
        tiny("finetune.precision=fp8_delayed")
    with pytest.raises(config.ConfigError, match="train.precision"):
        tiny("train.precision=fp8_delayed", "train.objective=electra", "model.activation=gelu")
    with pytest.raises(config.ConfigError, match="needs model.activation=gelu"):  # failed to compile on an H200
        tiny("train.precision=fp8_delayed")
    with pytest.raises(config.ConfigError, match="train.fp8_history"):
        tiny("train.fp8_history=0")


def test_bench_runs_fp8_delayed():
    args = bench.bench_arguments(["--config", "tiny", "--precision", "fp8_delayed", "--batch", "8", "--seq", "32"])
    cfg = bench.bench_config(args.config, args.batch, args.seq, 4, args.precision, (*TINY, "model.activation=gelu"))
    assert cfg.model == _cfg().model  # the steps compiled by the tests above serve
    row = bench.time_train_step(cfg, warmup=1, steps=1)
    assert np.isfinite(row["loss"]) and row["step_ms"] > 0
