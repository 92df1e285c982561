"""The feed-forward's second half with the GELU derivative fused into the backward GEMM
(jaxbert.model.ffn_kernels): the Pallas kernel, run by Pallas's interpreter on CPU, equals the XLA reference and
plain autodiff in values and gradients, on row counts that are not a multiple of the tile; a model with
impl.ffn=pallas_interpret computes the gradients of impl.ffn=xla."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny

from jaxbert.config import Kernels
from jaxbert.model import BertForMLM
from jaxbert.model.ffn_kernels import KernelOptions, gelu_matmul
from jaxbert.precision import Policy


def _inputs(dtype, rows=(2, 70), ffn=256, hidden=128):
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    pre = (2.0 * jax.random.normal(k[0], (*rows, ffn))).astype(dtype)
    w = 0.05 * jax.random.normal(k[1], (ffn, hidden))
    g = jax.random.normal(k[2], (*rows, hidden))
    return pre, w, g


def _grads(pre, w, g, approximate, implementation):
    def loss(p, w):
        return jnp.vdot(gelu_matmul(p, w, approximate, implementation).astype(jnp.float32), g)
    return jax.jit(jax.value_and_grad(loss, (0, 1)))(pre, w)


@pytest.mark.parametrize("approximate", [True, False])
def test_fused_backward_equals_the_reference_and_autodiff_in_float32(approximate):
    pre, w, g = _inputs(jnp.float32)  # 140 rows: padded to 256 in the kernel
    ref_loss, (ref_pre, ref_w) = _grads(pre, w, g, approximate, "xla")
    loss, (d_pre, d_w) = _grads(pre, w, g, approximate, "pallas_interpret")
    auto_loss, (auto_pre, auto_w) = jax.value_and_grad(
        lambda p, w: jnp.vdot(jax.nn.gelu(p, approximate=approximate) @ w, g), (0, 1))(pre, w)
    assert float(loss) == float(ref_loss)  # same forward
    np.testing.assert_allclose(float(ref_loss), float(auto_loss), rtol=1e-5)
    for got, want in ((d_pre, ref_pre), (d_w, ref_w), (ref_pre, auto_pre), (ref_w, auto_w)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(d_pre).max()) > 0


def test_fused_backward_in_bf16_is_within_one_rounding():
    pre, w, g = _inputs(jnp.bfloat16)
    _, (ref_pre, ref_w) = _grads(pre, w, g, True, "xla")
    _, (d_pre, d_w) = _grads(pre, w, g, True, "pallas_interpret")
    assert d_pre.dtype == jnp.bfloat16
    ref = np.asarray(ref_pre, np.float32)
    # the reference rounds g @ w.T to bf16 before multiplying by gelu'; the kernel multiplies its float32
    # accumulator: the two differ by about one bf16 rounding of the product
    np.testing.assert_allclose(np.asarray(d_pre, np.float32), ref, atol=2 ** -7 * np.abs(ref).max(), rtol=2 ** -6)
    np.testing.assert_array_equal(np.asarray(d_w), np.asarray(ref_w))  # d_w: the same XLA GEMM on both paths


@pytest.mark.parametrize("options", [KernelOptions(64, 256, 32, 8, 4), KernelOptions(32, 64, 128, 4, 2)])
def test_other_tile_settings_compute_the_same(options):
    pre, w, g = _inputs(jnp.float32)
    _, (ref_pre, _) = _grads(pre, w, g, True, "xla")
    d_pre = jax.grad(lambda p: jnp.vdot(gelu_matmul(p, w, True, "pallas_interpret", options), g))(pre)
    np.testing.assert_allclose(np.asarray(d_pre), np.asarray(ref_pre), rtol=1e-4, atol=1e-5)


def test_widths_that_do_not_fit_the_tiles_are_a_clear_error():
    pre, w, _ = _inputs(jnp.float32, ffn=200)
    with pytest.raises(ValueError, match="ffn % 128"):
        gelu_matmul(pre, w, True, "pallas_interpret")
    with pytest.raises(ValueError, match="ffn implementation"):
        gelu_matmul(pre, w, True, "cuda")
    assert gelu_matmul(pre, w, True, "xla").shape == (2, 70, 128)  # the reference takes any width
    pre, w, _ = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="block_n must divide"):
        gelu_matmul(pre, w, True, "pallas_interpret", KernelOptions(block_n=512))


@pytest.mark.parametrize("precision, tol", [("fp32", 0.0), ("bf16", 3e-2)])
def test_model_with_the_fused_ffn_equals_xla(precision, tol):
    """bf16: the kernel runs (a pallas_call in the program) and matches; fp32: the XLA path runs unchanged."""
    cfg = tiny("model.hidden=64", "model.heads=2", "model.ffn=128", "model.activation=gelu_tanh")
    model = BertForMLM(cfg.model, key=jax.random.PRNGKey(5))
    ids = jax.random.randint(jax.random.PRNGKey(1), (3, 9), 5, cfg.model.vocab_size)
    policy = Policy.from_name(precision)

    def loss(m, kernels):
        logits = m(ids, None, key=None, policy=policy, attention=kernels)
        return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), -1) - logits[..., 3])

    fused = Kernels("xla", "xla", "scatter", "pallas_interpret")
    program = str(jax.make_jaxpr(eqx.filter_grad(loss), static_argnums=1)(model, fused))
    assert ("pallas_call" in program) == (precision == "bf16")
    grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    ref_loss, ref = grad(model, Kernels("xla", "xla", "scatter", "xla"))
    got_loss, got = grad(model, fused)
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-6)
    for (path, a), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
        scale = float(np.max(np.abs(np.asarray(r)))) + 1e-9
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=tol * scale, rtol=tol,
                                   err_msg=jax.tree_util.keystr(path))
    assert float(jnp.abs(got.bert.layers.ffn_in.weight).sum()) > 0


def test_kernel_lowers_to_triton_for_the_gpu():
    # Lowering for CUDA runs Pallas' Triton lowering here: it rejects what the interpreter accepts but Triton
    # cannot express (the compile to GPU code itself happens on the GPU only)
    pre = jax.ShapeDtypeStruct((2, 100, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((256, 128), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((2, 100, 128), jnp.bfloat16)

    def fwd_bwd(p, w, g):
        out, pull = jax.vjp(lambda a, b: gelu_matmul(a, b, True, "pallas"), p, w)
        return out, *pull(g)

    text = jax.jit(fwd_bwd).trace(pre, w, g).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 1  # the fused backward GEMM
