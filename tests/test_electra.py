"""ELECTRA pieces (jaxbert.model.electra): shapes, which tokens count as replaced, where gradients flow, and a
tiny model whose combined loss falls."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbert.data.mlm import mask_tokens
from jaxbert.model.electra import ElectraForPretraining, electra_sums, generator_config, replace_tokens
from jaxbert.precision import Policy

SPECIAL = (0, 1, 2, 3, 4)
MASK = 4


def _batch(cfg, seed: int = 0, rows: int = 4):
    ids = np.random.default_rng(seed).integers(5, cfg.model.vocab_size, (rows, cfg.data.seq_len)).astype(np.int32)
    batch = mask_tokens(jnp.asarray(ids), jax.random.PRNGKey(seed), special_ids=SPECIAL, mask_id=MASK,
                        vocab_size=cfg.model.vocab_size, probability=0.15, max_predictions=cfg.data.max_predictions)
    return jnp.asarray(ids), batch


def test_generator_shape_and_discriminator_outputs(tiny_config):
    gen = generator_config(tiny_config.model, 0.25)
    assert (gen.hidden, gen.heads, gen.ffn, gen.layers) == (64, 1, 256, tiny_config.model.layers)
    model = ElectraForPretraining(tiny_config.model, key=jax.random.PRNGKey(0))
    ids, _ = _batch(tiny_config)
    assert model.discriminate(ids).shape == ids.shape and model.config == tiny_config.model


def test_replace_tokens_changes_masked_positions_only_and_labels_samples_equal_to_the_original(tiny_config):
    ids, batch = _batch(tiny_config, seed=1)
    vocab = tiny_config.model.vocab_size
    # a generator sure of the original token at half of the slots and of token 5 elsewhere
    sure = jnp.where(jnp.arange(batch.positions.shape[1])[None, :] % 2 == 0, batch.targets, 5)
    logits = jax.nn.one_hot(sure, vocab) * 100.0
    corrupted = np.asarray(replace_tokens(batch, logits, jax.random.split(jax.random.PRNGKey(2), len(ids))))
    used = np.zeros(ids.shape, bool)
    np.put_along_axis(used, np.asarray(batch.positions), np.asarray(batch.weights) > 0, axis=1)
    np.testing.assert_array_equal(corrupted[~used], np.asarray(batch.input_ids)[~used])  # unmasked: as fed
    slots = np.take_along_axis(corrupted, np.asarray(batch.positions), axis=1)
    w = np.asarray(batch.weights) > 0
    np.testing.assert_array_equal(slots[w], np.asarray(sure)[w])  # used slots: the generator's samples
    replaced = corrupted != np.asarray(ids)
    assert replaced.sum() == (w & (np.asarray(sure) != np.asarray(batch.targets))).sum() > 0


def test_discriminator_loss_sends_no_gradient_into_the_generator(tiny_config):
    model = ElectraForPretraining(tiny_config.model, key=jax.random.PRNGKey(0))
    ids, batch = _batch(tiny_config)

    def loss(m, weight_mlm: float):
        total, sums = electra_sums(m, ids, batch, sample_keys=jax.random.split(jax.random.PRNGKey(3), len(ids)), dropout_key=None,
                                   policy=Policy(), attention="xla", discriminator_weight=50.0)
        return total - (1.0 - weight_mlm) * sums["mlm_loss"]

    only_rtd = eqx.filter_grad(lambda m: loss(m, 0.0))(model)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(only_rtd.generator))
    assert float(jnp.abs(only_rtd.discriminator.layers.qkv.weight).max()) > 0
    both = eqx.filter_grad(lambda m: loss(m, 1.0))(model)
    assert float(jnp.abs(both.generator.bert.layers.qkv.weight).max()) > 0


def test_tiny_electra_learns(tiny_config):
    """A few Adam steps on one batch: the combined loss, and the discriminator's part of it, fall."""
    model = ElectraForPretraining(tiny_config.model, key=jax.random.PRNGKey(0))
    ids, batch = _batch(tiny_config, rows=8)
    opt = optax.adam(3e-3)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(m, s, k):
        def loss(m):
            total, sums = electra_sums(m, ids, batch, sample_keys=jax.random.split(k, len(ids)), dropout_key=None, policy=Policy(),
                                       attention="xla", discriminator_weight=50.0)
            return total / sums["predictions"], sums
        (value, sums), grads = eqx.filter_value_and_grad(loss, has_aux=True)(m)
        updates, s = opt.update(grads, s, eqx.filter(m, eqx.is_inexact_array))
        return eqx.apply_updates(m, updates), s, value, sums["rtd_loss"] / sums["tokens"]

    history = []
    for i in range(30):
        model, state, value, rtd = step(model, state, jax.random.PRNGKey(10 + i))
        history.append((float(value), float(rtd)))
    assert np.mean([h[0] for h in history[-5:]]) < 0.8 * np.mean([h[0] for h in history[:5]])
    assert np.mean([h[1] for h in history[-5:]]) < np.mean([h[1] for h in history[:5]])


# ------------------------------------------------------------------------------- in the pretraining core


def _electra_config(*extra: str):
    from test_train import OVERRIDES

    from jaxbert import config

    return config.load("tiny", OVERRIDES + ["train.objective=electra", *extra])


@pytest.mark.parametrize("options", [(), ("model.bias=false", "model.ffn_type=glu", "data.whole_word_masking=true")],
                         ids=["default", "no_bias_glu_wwm"])
def test_electra_steps_do_not_depend_on_the_micro_batch_split_and_lower_the_loss(options):
    from jaxbert.train import init_state, make_spec, micro_step, train_step, zero_accumulator

    cfg = _electra_config(*options)
    spec = make_spec(cfg, SPECIAL, MASK, vocab=[f"##{i}" if i % 3 == 2 else f"w{i}" for i in range(128)])
    ids = np.random.default_rng(0).integers(5, 128, (8, 32)).astype(np.int32)
    state = init_state(cfg, key=jax.random.PRNGKey(0))
    assert isinstance(state.model, ElectraForPretraining)
    if options:  # the options reach both networks: no encoder Dense bias, an ffn_in of 2 * ffn columns
        for bert in (state.model.generator.bert, state.model.discriminator):
            assert bert.layers.qkv.bias is None and bert.layers.ffn_in.weight.shape[-1] == 2 * bert.config.ffn
    halves = zero_accumulator(state.model)
    for i in (0, 4):
        halves = micro_step(state, halves, jnp.asarray(ids[i:i + 4]), jnp.int32(i), spec)
    whole = micro_step(state, zero_accumulator(state.model), jnp.asarray(ids), jnp.int32(0), spec)
    np.testing.assert_allclose(float(halves.loss_sum), float(whole.loss_sum), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(halves.grads), jax.tree.leaves(whole.grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-5)
    losses = []
    for _ in range(12):
        state, metrics = train_step(state, [ids[:4], ids[4:]], 1e-2, spec)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-3:]) < losses[0] and int(state.skipped) == 0


def test_electra_checkpoint_restores_bitwise_and_finetuning_takes_the_discriminator(tmp_path):
    from jaxbert import checkpoint as ckpt
    from jaxbert.finetune.model_dir import prepare_start
    from jaxbert.data import glue
    from jaxbert.train import init_state, make_spec, train_step

    cfg = _electra_config()
    spec = make_spec(cfg, SPECIAL, MASK)
    ids = np.random.default_rng(1).integers(5, 128, (8, 32)).astype(np.int32)
    state, _ = train_step(init_state(cfg, key=jax.random.PRNGKey(0)), [ids], 1e-2, spec)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(123)]) + "\n")
    saved = ckpt.save_checkpoint(tmp_path / "run", cfg, state, ckpt.Progress(1, 8, 0.0), str(vocab), keep=2)
    template = eqx.filter_eval_shape(init_state, cfg, key=jax.random.PRNGKey(0))
    restored, progress = ckpt.restore_checkpoint(saved, cfg, template)
    assert progress.step == 1
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    start = prepare_start(cfg, str(tmp_path / "run"), glue.TASKS["rte"])
    np.testing.assert_array_equal(np.asarray(start.encoder.embeddings.token),
                                  np.asarray(state.model.discriminator.embeddings.token))
    from jaxbert import config

    mlm = config.replace(cfg, train={"objective": "mlm"})
    template = eqx.filter_eval_shape(init_state, mlm, key=jax.random.PRNGKey(0))
    with pytest.raises(ckpt.CheckpointError, match="train.objective"):
        ckpt.restore_checkpoint(saved, mlm, template)
