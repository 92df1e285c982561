"""The fused residual-add + LayerNorm: the Pallas kernels (run by Pallas's interpreter on CPU) equal the XLA
reference, forward and backward, on widths that are not powers of two and row counts that are not multiples of
the block; the model with impl.norm=pallas equals impl.norm=xla; the pre-LN stack (residual adds deferred into
the next LayerNorm) equals the textbook pre-LN formula."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny

from jaxbert import config
from jaxbert.config import Kernels
from jaxbert.model import BertForMLM, BertModel
from jaxbert.model import norm_kernels
from jaxbert.model.norm_kernels import add_layer_norm, layer_norm
from jaxbert.precision import Policy

EPS = 1e-5
# per dtype: (atol, rtol) of kernel vs reference. In bf16 the two round at different points (the kernel adds g_s
# to the LayerNorm cotangent in float32, the reference in bf16; XLA:CPU may skip rounding x + h to bf16 before
# the statistics, the kernel normalises the rounded sum it stores): a couple of bf16 ulps
TOL = {jnp.float32: (2e-5, 1e-5), jnp.bfloat16: (3e-2, 2e-2)}


def _inputs(shape, dtype, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    width = shape[-1]
    x = (2.0 * jax.random.normal(k[0], shape) + 0.5).astype(dtype)
    h = jax.random.normal(k[1], shape).astype(dtype)
    scale = 1.0 + 0.2 * jax.random.normal(k[2], (width,))
    bias = 0.2 * jax.random.normal(k[3], (width,))
    g_s = jax.random.normal(k[4], shape).astype(dtype)
    g_y = jax.random.normal(k[5], shape).astype(dtype)
    return x, h, scale, bias, g_s, g_y


def _add_norm_and_vjp(implementation, x, h, scale, bias, g_s, g_y):
    fn = lambda *a: add_layer_norm(*a, EPS, implementation)  # noqa: E731
    (s, y), vjp = jax.vjp(fn, x, h, scale, bias)
    return (s, y) + vjp((g_s, g_y))


def _close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(37, 96), (2, 9, 200), (3, 48)])
def test_add_layer_norm_kernel_equals_reference(shape, dtype):
    args = _inputs(shape, dtype)
    ref = jax.jit(lambda *a: _add_norm_and_vjp("xla", *a))(*args)
    out = jax.jit(lambda *a: _add_norm_and_vjp("pallas_interpret", *a))(*args)
    for name, a, r in zip(("s", "y", "dx", "dh", "dscale", "dbias"), out, ref):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        # d_scale / d_bias are sums over all rows: the tolerance grows with their number
        _close(a, r, dtype, scale=1.0 if name not in ("dscale", "dbias") else float(np.sqrt(np.prod(shape[:-1]))))
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(args[0] + args[1]))  # s is x + h, exactly
    np.testing.assert_array_equal(np.asarray(out[2]), np.asarray(out[3]))  # both addends get d s


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_plain_layer_norm_kernel_equals_reference_under_grad(dtype):
    x, _, scale, bias, _, g_y = _inputs((21, 80), dtype, seed=1)

    def loss(implementation, x, scale, bias):
        y = layer_norm(x, scale, bias, EPS, implementation)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * g_y.astype(jnp.float32))

    ref = jax.jit(jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2)))(x, scale, bias)
    out = jax.jit(jax.value_and_grad(lambda *a: loss("pallas_interpret", *a), argnums=(0, 1, 2)))(x, scale, bias)
    _close(out[0], ref[0], jnp.float32, scale=200.0 if dtype == jnp.bfloat16 else 10.0)
    for a, r in zip(out[1], ref[1]):
        _close(a, r, dtype, scale=5.0)


def test_backward_loops_over_several_blocks_per_program(monkeypatch):
    # 4 rows per block, at most 3 programs: 5 blocks of 4 rows per program, the last one partly past the end
    monkeypatch.setattr(norm_kernels, "BLOCK_ELEMENTS", 4 * 64)
    monkeypatch.setattr(norm_kernels, "BACKWARD_PROGRAMS", 3)
    args = _inputs((45, 40), jnp.float32, seed=2)
    ref = jax.jit(lambda *a: _add_norm_and_vjp("xla", *a))(*args)
    out = jax.jit(lambda *a: _add_norm_and_vjp("pallas_interpret", *a))(*args)
    for a, r in zip(out, ref):
        _close(a, r, jnp.float32, scale=10.0)


def test_gradients_reach_h_in_its_own_dtype():
    x, h, scale, bias, _, _ = _inputs((6, 24), jnp.float32)
    h16 = h.astype(jnp.bfloat16)
    for implementation in ("xla", "pallas_interpret"):
        g = jax.jit(jax.grad(lambda h: add_layer_norm(x, h, scale, bias, EPS, implementation)[1].sum()))(h16)
        assert g.dtype == jnp.bfloat16 and float(jnp.max(jnp.abs(g))) > 0


def test_auto_is_xla_on_cpu_and_unknown_names_fail():
    assert norm_kernels.resolve("auto", jnp.bfloat16) == ("pallas" if jax.default_backend() == "gpu" else "xla")
    assert norm_kernels.resolve("auto", jnp.float32) == "xla"
    with pytest.raises(ValueError, match="norm implementation"):
        norm_kernels.resolve("triton", jnp.float32)


def _mlm_loss(model, ids, seg, kernels, policy=Policy()):
    logits = model(ids, seg, key=None, policy=policy, attention=kernels)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 3])


@pytest.mark.parametrize("precision, tol", [("fp32", 2e-5), ("bf16", 3e-2)])
def test_model_with_pallas_norms_equals_xla_norms(precision, tol):
    cfg = tiny("model.hidden=40", "model.heads=2", "model.ffn=72")  # width 40: padded to 64 in the kernel
    model = BertForMLM(cfg.model, key=jax.random.PRNGKey(5))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(5, cfg.model.vocab_size, (3, 7)), jnp.int32)  # 21 rows
    seg = jnp.zeros_like(ids)
    policy = Policy.from_name(precision)
    grad = eqx.filter_jit(eqx.filter_value_and_grad(_mlm_loss))  # kernels, policy: static (not arrays)
    ref_loss, ref_grads = grad(model, ids, seg, kernels=Kernels("xla", "xla"), policy=policy)
    loss, grads = grad(model, ids, seg, kernels=Kernels("xla", "pallas_interpret"), policy=policy)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=tol)
    for (path, a), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        scale = float(np.max(np.abs(np.asarray(r)))) + 1e-6
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=tol * scale, rtol=tol,
                                   err_msg=jax.tree_util.keystr(path))


def test_pre_ln_stack_equals_textbook_pre_ln():
    """The deferred residual adds compute x + attn(LN(x)), then x + ffn(LN(x)), layer by layer, then LN."""
    cfg = config.replace(tiny(), model={"layers": 3})
    bert = BertModel(cfg.model, key=jax.random.PRNGKey(6))
    ids = jnp.asarray(np.random.default_rng(1).integers(5, cfg.model.vocab_size, (2, 9)), jnp.int32)
    mask = jnp.ones(ids.shape, bool).at[1, -2:].set(False)

    def textbook(bert):
        x = bert.embeddings(ids, jnp.zeros_like(ids), jnp.float32)
        params, static = eqx.partition(bert.layers, eqx.is_array)
        for i in range(cfg.model.layers):
            layer = eqx.combine(jax.tree.map(lambda a: a[i], params), static)
            x = x + layer._attend(layer.attn_norm(x), mask, cfg.model, "xla", None, False)
            x = x + layer._feed_forward(layer.ffn_norm(x), cfg.model, False)
        return bert.final_norm(x)

    expected = eqx.filter_jit(textbook)(bert)
    for implementation in ("xla", "pallas_interpret"):
        got = eqx.filter_jit(lambda b: b(ids, None, mask, attention=Kernels("xla", implementation)))(bert)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-5, atol=2e-5)
