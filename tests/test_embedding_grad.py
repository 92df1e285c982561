"""The token-embedding gradient accumulated block-wise after sorting the ids (impl.embedding_grad=sorted) equals
autodiff's scatter-add, for ids repeated thousands of times, batches that are not a multiple of the block and
float32 or bf16 cotangents; the segment lookup as a masked sum equals ``take`` forward and backward; a model
trained with either path computes the same gradients."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny

from jaxbert.config import Kernels
from jaxbert.model import BertForMLM
from jaxbert.model import embedding_grad
from jaxbert.model.embedding_grad import lookup, small_lookup, sorted_segment_rows
from jaxbert.precision import Policy


def _zipf_ids(shape, vocab, seed=0):
    """Text-like ids: a few ids very often (one of them on every 8th token, like [MASK]), a long tail."""
    rng = np.random.default_rng(seed)
    ids = (rng.zipf(1.2, size=shape) - 1) % vocab
    ids.reshape(-1)[::8] = 4
    return jnp.asarray(ids, jnp.int32)


@pytest.mark.parametrize("n", [1, 127, 128, 1000])
def test_sorted_sums_equal_the_scatter_add(n):
    vocab, hidden = 300, 24
    ids = _zipf_ids((n,), vocab, seed=n)
    ids = ids.at[0].set(vocab - 1)  # both ends of the table
    rows = jax.random.normal(jax.random.PRNGKey(n), (n, hidden))
    got = jax.jit(sorted_segment_rows, static_argnums=2)(ids, rows, vocab)
    want = jnp.zeros((vocab, hidden)).at[ids].add(rows)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got).sum()) > 0


def test_one_id_in_every_row_and_block_edges():
    # all rows one id (a whole-block segment in every block), then a block boundary inside a run of equal ids
    rows = jax.random.normal(jax.random.PRNGKey(0), (300, 8))
    for ids in (jnp.full((300,), 7, jnp.int32), jnp.repeat(jnp.arange(3, dtype=jnp.int32), 100)):
        got = sorted_segment_rows(ids, rows, 10)
        np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.zeros((10, 8)).at[ids].add(rows)), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("grad_dtype", [jnp.float32, jnp.bfloat16])
def test_lookup_gradient_equals_autodiff_of_take(grad_dtype):
    vocab, hidden = 500, 16
    table = jax.random.normal(jax.random.PRNGKey(1), (vocab, hidden))
    ids = _zipf_ids((6, 50), vocab)
    # a cotangent that comes from grad_dtype, as it does in the encoder (the lookup is cast right after)
    cot = jax.random.normal(jax.random.PRNGKey(2), (6, 50, hidden)).astype(grad_dtype)

    def loss(t, i, implementation):
        return jnp.vdot(lookup(t, i, grad_dtype, implementation).astype(grad_dtype).astype(jnp.float32),
                        cot.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss), static_argnums=2)  # ids are traced: the sort runs, it is not folded away
    want, got = grad(table, ids, "scatter"), grad(table, ids, "sorted")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(lookup(table, ids, grad_dtype, "sorted")), np.asarray(table[ids]))


def test_small_lookup_equals_take_forward_and_backward():
    table = jax.random.normal(jax.random.PRNGKey(3), (3, 5))
    ids = jnp.asarray([[0, 2, 1, 0], [2, 2, 0, 1]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(small_lookup(table, ids)), np.asarray(table[ids]))
    cot = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 5))
    g_small = jax.grad(lambda t: jnp.vdot(small_lookup(t, ids), cot))(table)
    g_take = jax.grad(lambda t: jnp.vdot(jnp.take(t, ids, axis=0), cot))(table)
    np.testing.assert_allclose(np.asarray(g_small), np.asarray(g_take), rtol=1e-6, atol=1e-6)


def test_auto_is_scatter_on_cpu_and_unknown_names_fail():
    assert embedding_grad.resolve("auto") == ("sorted" if jax.default_backend() == "gpu"
                                              and jax.device_count() == 1 else "scatter")
    with pytest.raises(ValueError, match="embedding gradient"):
        embedding_grad.resolve("atomic")


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("bf16", 1e-5)])
def test_model_gradients_are_the_same_with_either_path(precision, tol):
    cfg = tiny()
    model = BertForMLM(cfg.model, key=jax.random.PRNGKey(5))
    ids = _zipf_ids((4, 16), cfg.model.vocab_size, seed=1)
    seg = (jnp.arange(16)[None] >= 8).astype(jnp.int32) * jnp.ones_like(ids)
    policy = Policy.from_name(precision)

    def loss(m, kernels):
        logits = m(ids, seg, key=None, policy=policy, attention=kernels)
        return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), -1) - logits[..., 3])

    grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    ref_loss, ref = grad(model, Kernels("xla", "xla", "scatter"))
    got_loss, got = grad(model, Kernels("xla", "xla", "sorted"))
    assert float(got_loss) == float(ref_loss)  # the forward pass is the same program
    for (path, a), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
        scale = float(np.max(np.abs(np.asarray(r)))) + 1e-9
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=tol * scale, rtol=tol,
                                   err_msg=jax.tree_util.keystr(path))
    assert float(jnp.abs(got.bert.embeddings.token).sum()) > 0
