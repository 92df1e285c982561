"""Model behaviour: parameter count, padding invariance (outputs and gradients), jit == no-jit,
scan == unrolled, bf16 close to fp32, dropout keyed, heads."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbert import config
from jaxbert.model import BertForClassification, BertForMLM, BertModel, count_parameters, with_config
from jaxbert.precision import Policy


@eqx.filter_jit
def run(module, *args, **kwargs):
    """Call a module under jit (tests stay fast; test_jit_equals_no_jit covers the eager path)."""
    return module(*args, **kwargs)


def _batch(cfg, batch=3, seq=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(5, cfg.model.vocab_size, (batch, seq)), jnp.int32)
    seg = jnp.asarray((np.arange(seq)[None] >= seq // 2).repeat(batch, 0), jnp.int32)
    return ids, seg


@pytest.mark.parametrize("post_ln", [False, True])
def test_base_parameter_count_is_bert_base(post_ln):
    cfg = config.load("base", ["model.vocab_size=30522", f"model.post_ln={post_ln}", "model.bias=true"])
    model = eqx.filter_eval_shape(BertModel, cfg.model, key=jax.random.PRNGKey(0))
    n = count_parameters(model)
    assert abs(n - 110e6) / 110e6 < 0.01
    # BERT-base (HF BertModel, pooler included) has 109,482,240; pre-LN adds one final LayerNorm (2 x 768).
    assert n == 109_482_240 + (0 if post_ln else 2 * 768)
    # the default (bias-free encoder linear layers) drops qkv (3H), out (H), ffn_in (F), ffn_out (H) per layer
    free = config.load("base", ["model.vocab_size=30522", f"model.post_ln={post_ln}"]).model
    assert not free.bias
    m = cfg.model
    n_free = count_parameters(eqx.filter_eval_shape(BertModel, free, key=jax.random.PRNGKey(0)))
    assert n - n_free == m.layers * (5 * m.hidden + m.ffn) == 82_944


@pytest.mark.parametrize("post_ln", [False, True])
def test_padding_changes_neither_outputs_nor_gradients(tiny_config, post_ln):
    cfg = config.replace(tiny_config, model={"post_ln": post_ln})
    model = BertForMLM(cfg.model, key=jax.random.PRNGKey(1))
    ids, seg = _batch(cfg, seq=10)
    pad = 6
    ids_p = jnp.concatenate([ids, jnp.full((ids.shape[0], pad), 7, jnp.int32)], 1)  # padding id is arbitrary
    seg_p = jnp.concatenate([seg, jnp.zeros((ids.shape[0], pad), jnp.int32)], 1)
    mask_p = jnp.arange(ids_p.shape[1])[None] < ids.shape[1]
    mask_p = jnp.broadcast_to(mask_p, ids_p.shape)

    def loss(m, i, s, mask):
        h = m.bert(i, s, mask, attention="xla")[:, : ids.shape[1]]
        return jnp.sum(jnp.sin(h.astype(jnp.float32)))

    short = run(model.bert, ids, seg, None, attention="xla")
    padded = run(model.bert, ids_p, seg_p, mask_p, attention="xla")[:, : ids.shape[1]]
    np.testing.assert_allclose(np.asarray(short), np.asarray(padded), atol=1e-5)
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    g_short = grad(model, ids, seg, None)
    g_pad = grad(model, ids_p, seg_p, mask_p)
    for a, b in zip(jax.tree.leaves(g_short), jax.tree.leaves(g_pad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # Without the mask the padded positions do leak into real ones: the test would catch a mask being ignored.
    unmasked = run(model.bert, ids_p, seg_p, None, attention="xla")[:, : ids.shape[1]]
    assert not np.allclose(np.asarray(short), np.asarray(unmasked), atol=1e-3)


def test_jit_equals_no_jit(tiny_config):
    model = BertForMLM(tiny_config.model, key=jax.random.PRNGKey(2))
    ids, seg = _batch(tiny_config)
    eager = model(ids, seg)
    jitted = eqx.filter_jit(lambda m, i, s: m(i, s))(model, ids, seg)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("post_ln", [False, True])
def test_scan_equals_unrolled(tiny_config, post_ln):
    cfg = config.replace(tiny_config, model={"post_ln": post_ln, "layers": 3})
    bert = BertModel(cfg.model, key=jax.random.PRNGKey(3))
    ids, seg = _batch(cfg)
    mask = jnp.ones(ids.shape, bool).at[0, -3:].set(False)
    scanned = run(bert, ids, seg, mask)
    unrolled = eqx.filter_jit(lambda b: b.unrolled(ids, seg, mask))(bert)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), rtol=1e-5, atol=1e-5)
    # Remat recomputes in the backward pass but computes the same function.
    np.testing.assert_allclose(np.asarray(run(bert, ids, seg, mask, remat=True)), np.asarray(scanned),
                               rtol=1e-6, atol=1e-6)


def test_layers_are_distinct_and_stacked(tiny_config):
    bert = BertModel(tiny_config.model, key=jax.random.PRNGKey(4))
    w = bert.layers.qkv.weight
    assert w.shape == (tiny_config.model.layers, tiny_config.model.hidden, 3 * tiny_config.model.hidden)
    assert not np.allclose(np.asarray(w[0]), np.asarray(w[1]))


@pytest.mark.parametrize("name, tol", [("bf16", 0.08), ("fp16", 0.01)])
def test_half_precision_close_to_fp32(tiny_config, name, tol):
    model = BertForMLM(tiny_config.model, key=jax.random.PRNGKey(5))
    ids, seg = _batch(tiny_config)
    ref = run(model.bert, ids, seg)
    low = run(model.bert, ids, seg, policy=Policy.from_name(name))
    assert low.dtype == Policy.from_name(name).compute_dtype
    # Hidden states are LayerNorm outputs of order 1: bf16 keeps ~3 significant digits, fp16 ~4.
    assert float(jnp.max(jnp.abs(low.astype(jnp.float32) - ref))) < tol
    logits = run(model, ids, seg, policy=Policy.from_name(name))
    assert logits.dtype == jnp.float32  # logits always in float32


def test_sparse_positions_match_dense_logits(tiny_config):
    model = BertForMLM(tiny_config.model, key=jax.random.PRNGKey(6))
    ids, seg = _batch(tiny_config)
    positions = jnp.array([[0, 3, 5], [1, 1, 11], [2, 4, 6]], jnp.int32)
    dense = run(model, ids, seg)
    sparse = run(model, ids, seg, positions=positions)
    expected = jnp.take_along_axis(dense, positions[..., None], axis=1)
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_mlm_decoder_is_tied_to_token_embedding(tiny_config):
    model = BertForMLM(tiny_config.model, key=jax.random.PRNGKey(7))
    ids, seg = _batch(tiny_config)
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: jnp.sum(m(ids, seg)[..., 9])))(model)
    # Row 9 of the embedding receives gradient through the tied decoder although id 9 may not be in the input.
    assert float(jnp.abs(grads.bert.embeddings.token[9]).sum()) > 0


def test_dropout_needs_a_key_and_is_reproducible(tiny_config):
    cfg = config.replace(tiny_config, model={"dropout": 0.3, "attention_dropout": 0.2})
    model = BertForMLM(cfg.model, key=jax.random.PRNGKey(8))
    ids, seg = _batch(cfg)
    deterministic = run(model, ids, seg)
    np.testing.assert_array_equal(np.asarray(deterministic), np.asarray(run(model, ids, seg)))
    a = run(model, ids, seg, key=jax.random.PRNGKey(1))
    b = run(model, ids, seg, key=jax.random.PRNGKey(1))
    c = run(model, ids, seg, key=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(a), np.asarray(deterministic))


def test_with_config_swaps_dropout_and_keeps_weights(tiny_config):
    model = BertForClassification(tiny_config.model, 3, key=jax.random.PRNGKey(9))
    new_cfg = dataclasses.replace(tiny_config.model, dropout=0.1)
    swapped = with_config(model, "bert", new_cfg)
    assert swapped.config.dropout == 0.1
    for a, b in zip(jax.tree.leaves(eqx.filter(model, eqx.is_array)), jax.tree.leaves(eqx.filter(swapped, eqx.is_array))):
        assert a is b
    with pytest.raises(ValueError, match="model.hidden"):
        with_config(model, "bert", dataclasses.replace(tiny_config.model, hidden=64))


def test_classifier_outputs_and_regression(tiny_config):
    ids, seg = _batch(tiny_config)
    mask = jnp.ones(ids.shape, bool)
    cls = BertForClassification(tiny_config.model, 3, key=jax.random.PRNGKey(10))
    assert run(cls, ids, seg, mask).shape == (3, 3)
    reg = BertForClassification(tiny_config.model, 1, key=jax.random.PRNGKey(10))
    out = run(reg, ids, seg, mask, policy=Policy.from_name("bf16"))
    assert out.shape == (3, 1) and out.dtype == jnp.float32


def test_mean_pooling_reads_the_real_tokens_only(tiny_config):
    """model.pooling=mean: tanh(pooler(mean of the real tokens' states)) -> classifier; padding changes nothing."""
    cfg = config.replace(tiny_config, model={"pooling": "mean"})
    model = BertForClassification(cfg.model, 3, key=jax.random.PRNGKey(11))
    ids, seg = _batch(cfg, seq=10)
    pad = 6
    ids_p = jnp.concatenate([ids, jnp.full((ids.shape[0], pad), 7, jnp.int32)], 1)
    seg_p = jnp.concatenate([seg, jnp.zeros((ids.shape[0], pad), jnp.int32)], 1)
    mask_p = jnp.broadcast_to(jnp.arange(ids_p.shape[1])[None] < ids.shape[1], ids_p.shape)
    short = run(model, ids, seg, None, attention="xla")
    np.testing.assert_allclose(np.asarray(run(model, ids_p, seg_p, mask_p, attention="xla")), np.asarray(short),
                               atol=1e-5)
    hidden = run(model.bert, ids, seg, None, attention="xla")
    expected = model.classifier(jnp.tanh(model.bert.pooler(hidden.mean(1))))
    np.testing.assert_allclose(np.asarray(short), np.asarray(expected), rtol=1e-5, atol=1e-6)
    cls = with_config(model, "bert", dataclasses.replace(cfg.model, pooling="cls"))  # same weights, [CLS] pooling
    np.testing.assert_allclose(np.asarray(run(cls, ids, seg, None, attention="xla")),
                               np.asarray(model.classifier(jnp.tanh(model.bert.pooler(hidden[:, 0])))),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(run(cls, ids, seg, None, attention="xla")), np.asarray(short), atol=1e-4)
    with pytest.raises(config.ConfigError, match=r"'model.pooling'.*expected cls\|mean, got 'max'"):
        config.replace(tiny_config, model={"pooling": "max"})


def test_segment_and_position_embeddings_matter(tiny_config):
    bert = BertModel(tiny_config.model, key=jax.random.PRNGKey(11))
    ids, seg = _batch(tiny_config)
    base = run(bert, ids, seg)
    assert not np.allclose(np.asarray(base), np.asarray(run(bert, ids, jnp.zeros_like(seg))))
    # Reversing the sequence changes outputs beyond a permutation: positions are encoded.
    rev = run(bert, ids[:, ::-1], seg[:, ::-1])[:, ::-1]
    assert not np.allclose(np.asarray(base), np.asarray(rev), atol=1e-3)


# --- recipe options: bias-free encoder layers (model.bias), gated feed-forward (model.ffn_type) ---------------


def _names(module):
    from jaxbert.io import named_leaves

    return set(named_leaves(module))


def test_bias_free_encoder_has_no_dense_biases_and_equals_zero_biases(tiny_config):
    free_cfg = config.replace(tiny_config, model={"bias": False}).model
    free = BertForMLM(free_cfg, key=jax.random.PRNGKey(11))
    names = _names(free)
    for dense in ("qkv", "out", "ffn_in", "ffn_out"):
        assert f"bert.layers.{dense}.weight" in names and f"bert.layers.{dense}.bias" not in names
    # LayerNorms, the pooler and the MLM head keep their biases
    assert {"bert.layers.attn_norm.bias", "bert.layers.ffn_norm.bias", "bert.pooler.bias", "mlm.transform.bias",
            "mlm.bias"} <= names
    m = config.replace(tiny_config, model={"bias": True}).model
    with_bias = BertForMLM(m, key=jax.random.PRNGKey(11))  # same keys: same weights, biases initialised to 0
    biases = m.layers * (3 * m.hidden + m.hidden + m.ffn + m.hidden)  # qkv, out, ffn_in, ffn_out
    assert count_parameters(with_bias) - count_parameters(free) == biases
    ids, seg = _batch(tiny_config)
    np.testing.assert_allclose(np.asarray(run(free, ids, seg)), np.asarray(run(with_bias, ids, seg)),
                               rtol=1e-5, atol=1e-6)  # not bitwise: XLA may fuse the two graphs differently
    # ...and the bias does enter the computation of the biased model
    shifted = eqx.tree_at(lambda t: t.bert.layers.ffn_out.bias, with_bias, with_bias.bert.layers.ffn_out.bias + 0.5)
    assert not np.allclose(np.asarray(run(shifted, ids, seg)), np.asarray(run(free, ids, seg)))


def _glu_reference(layer, x, cfg):
    """The gated feed-forward written plainly: one fused ffn_in output split in halves, autodiff GELU."""
    h = x @ layer.ffn_in.weight + (0.0 if layer.ffn_in.bias is None else layer.ffn_in.bias)
    a, g = jnp.split(h, 2, axis=-1)
    out = (jax.nn.gelu(a, approximate=cfg.activation == "gelu_tanh") * g) @ layer.ffn_out.weight
    return out + (0.0 if layer.ffn_out.bias is None else layer.ffn_out.bias)


@pytest.mark.parametrize("bias", [True, False])
def test_glu_shapes_output_and_gradients_match_a_reference(tiny_config, bias):
    cfg = config.replace(tiny_config, model={"ffn_type": "glu", "bias": bias}).model
    bert = BertModel(cfg, key=jax.random.PRNGKey(12))
    assert bert.layers.ffn_in.weight.shape == (cfg.layers, cfg.hidden, 2 * cfg.ffn)
    assert bert.layers.ffn_out.weight.shape == (cfg.layers, cfg.ffn, cfg.hidden)
    layer = jax.tree.map(lambda a: a[0], bert.layers)
    if bias:  # random biases, so a mix-up of the two halves' biases shows
        key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
        layer = eqx.tree_at(lambda lay: (lay.ffn_in.bias, lay.ffn_out.bias), layer,
                            (jax.random.normal(key_a, (2 * cfg.ffn,)), jax.random.normal(key_b, (cfg.hidden,))))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, cfg.hidden))

    def loss(lay, fn):
        return jnp.sum(jnp.sin(fn(lay)))

    ours = eqx.filter_jit(lambda lay: lay._feed_forward(x, cfg, False))
    ref = eqx.filter_jit(lambda lay: _glu_reference(lay, x, cfg))
    np.testing.assert_allclose(np.asarray(ours(layer)), np.asarray(ref(layer)), rtol=1e-5, atol=1e-5)
    g_ours = eqx.filter_jit(eqx.filter_grad(lambda lay: loss(lay, lambda m: m._feed_forward(x, cfg, False))))(layer)
    g_ref = eqx.filter_jit(eqx.filter_grad(lambda lay: loss(lay, lambda m: _glu_reference(m, x, cfg))))(layer)
    for part in (lambda t: t.ffn_in, lambda t: t.ffn_out):
        for a, b in zip(jax.tree.leaves(part(g_ours)), jax.tree.leaves(part(g_ref))):
            assert np.abs(np.asarray(a)).max() > 0
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_glu_at_two_thirds_width_matches_the_mlp_parameters():
    mlp = config.load("base", ["model.bias=false"]).model  # ffn = 4 * 768
    glu = dataclasses.replace(mlp, ffn_type="glu", ffn=2 * 4 * mlp.hidden // 3)
    counts = [count_parameters(eqx.filter_eval_shape(BertModel, m, key=jax.random.PRNGKey(0))) for m in (mlp, glu)]
    assert counts[0] == counts[1]
    with_bias = [dataclasses.replace(m, bias=True) for m in (mlp, glu)]  # biases: 2F + H against F + H per layer
    counts = [count_parameters(eqx.filter_eval_shape(BertModel, m, key=jax.random.PRNGKey(0))) for m in with_bias]
    assert counts[1] - counts[0] == mlp.layers * (2 * glu.ffn - mlp.ffn)


def test_with_config_refuses_bias_and_ffn_type_changes(tiny_config):
    model = BertForClassification(tiny_config.model, 3, key=jax.random.PRNGKey(9))
    for change in ({"bias": not tiny_config.model.bias}, {"ffn_type": "glu"}):
        name = next(iter(change))
        with pytest.raises(ValueError, match=f"model.{name}"):
            with_config(model, "bert", dataclasses.replace(tiny_config.model, **change))
