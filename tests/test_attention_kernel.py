"""The short-sequence Pallas attention kernel (run by Pallas' interpreter on CPU) against XLA's attention:
outputs and gradients wrt q, k, v, with and without a right-padded key mask, lengths that need padding to a
tile, a fully masked sequence, and a tiny classifier (right-padded batch) whose loss and gradients do not
depend on the implementation."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny

from jaxbert.finetune.trainer import batch_loss
from jaxbert.model import BertForClassification
from jaxbert.model.attention_kernel import KernelOptions, short_attention
from jaxbert.precision import Policy


def _reference(q, k, v, mask):
    bias_mask = None if mask is None else mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, implementation="xla")


def _inputs(seq, head_dim, dtype, lengths=None, batch=2, heads=2, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v, do = (jax.random.normal(kk, (batch, seq, heads, head_dim), jnp.float32).astype(dtype) for kk in keys)
    mask = None if lengths is None else jnp.arange(seq)[None] < jnp.asarray(lengths)[:, None]
    return q, k, v, do, mask


def _vjp(fn, q, k, v, do):
    out, pull = jax.vjp(fn, q, k, v)
    return [np.asarray(x.astype(jnp.float32)) for x in (out, *pull(do))]


def _assert_matches(q, k, v, do, mask, tol, options=KernelOptions()):
    """Output and gradients within ``tol`` times the largest magnitude of each reference array."""
    got = _vjp(lambda a, b, c: short_attention(a, b, c, mask, interpret=True, options=options), q, k, v, do)
    want = _vjp(lambda a, b, c: _reference(a, b, c, mask), q, k, v, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, atol=tol * np.abs(w).max(), rtol=0, err_msg=name)


CASES = [(128, 64, None), (128, 64, [100, 37]), (128, 32, [128, 1]), (40, 64, [33, 40]), (24, 24, [20, 5])]


@pytest.mark.parametrize("seq, head_dim, lengths", CASES)
def test_float32_equals_xla(seq, head_dim, lengths):
    q, k, v, do, mask = _inputs(seq, head_dim, jnp.float32, lengths)
    _assert_matches(q, k, v, do, mask, tol=1e-5)


@pytest.mark.parametrize("seq, head_dim, lengths", [(128, 64, None), (128, 64, [100, 37]), (40, 32, [33, 7])])
def test_bfloat16_close_to_xla(seq, head_dim, lengths):
    q, k, v, do, mask = _inputs(seq, head_dim, jnp.bfloat16, lengths)
    # The kernel keeps dP and dS in float32 where the reference rounds dP to bf16: a few bf16 ulps apart
    _assert_matches(q, k, v, do, mask, tol=2e-2)


@pytest.mark.parametrize("block_q", [None, 32])  # the whole sequence, a quarter of it (the default is 64)
def test_forward_blocks_of_query_rows(block_q):
    q, k, v, do, mask = _inputs(128, 32, jnp.float32, [90, 128])
    _assert_matches(q, k, v, do, mask, tol=1e-5, options=KernelOptions(block_q=block_q))


@pytest.mark.parametrize("masked", [False, True])
def test_kernels_lower_to_triton_for_the_gpu(masked):
    # Lowering for CUDA runs Pallas' Triton lowering on this machine: it rejects what the interpreter accepts
    # but Triton cannot express (the compile to GPU code itself happens on the GPU only).
    x = jax.ShapeDtypeStruct((2, 128, 2, 64), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((2, 128), jnp.bool_) if masked else None

    def fwd_bwd(q, k, v, do, m):
        out, pull = jax.vjp(lambda a, b, c: short_attention(a, b, c, m), q, k, v)
        return out, *pull(do)

    text = jax.jit(fwd_bwd).trace(x, x, x, x, mask).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 2  # the forward and the backward kernel


def test_fully_masked_sequence_matches_reference_without_nan():
    # A row of padding only: the reference attends uniformly over the (masked) keys and passes no gradient
    # to q and k; the kernel must do the same (a -inf mask would give NaN). Seq 40 is padded to 64 inside:
    # the uniform average must cover the 40 real keys only.
    q, k, v, do, mask = _inputs(40, 32, jnp.float32, [0, 12])
    _assert_matches(q, k, v, do, mask, tol=1e-5)
    dq = _vjp(lambda a, b, c: short_attention(a, b, c, mask, interpret=True), q, k, v, do)[1]
    assert np.all(dq[0] == 0.0) and np.any(dq[1] != 0.0)


def test_mask_is_not_ignored():
    q, k, v, do, _ = _inputs(32, 16, jnp.float32)
    mask = jnp.arange(32)[None] < jnp.asarray([20, 32])[:, None]
    masked = short_attention(q, k, v, mask, interpret=True)
    unmasked = short_attention(q, k, v, None, interpret=True)
    assert not np.allclose(np.asarray(masked[0]), np.asarray(unmasked[0]), atol=1e-3)
    np.testing.assert_allclose(np.asarray(masked[1]), np.asarray(unmasked[1]), atol=1e-6)


@pytest.mark.parametrize("seq, head_dim", [(257, 64), (128, 129)])
def test_too_long_or_too_wide_is_a_clear_error(seq, head_dim):
    x = jnp.zeros((1, seq, 1, head_dim), jnp.float32)
    with pytest.raises(ValueError, match="seq <= 256 and head_dim <= 128"):
        short_attention(x, x, x, interpret=True)


def _classification_batch(cfg, batch=2, seq=32):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(5, cfg.model.vocab_size, (batch, seq)), jnp.int32)
    segments = jnp.asarray((np.arange(seq)[None] >= seq // 2).repeat(batch, 0), jnp.int32)
    mask = jnp.arange(seq)[None] < jnp.asarray([seq, 19])[:, None]  # right padding, as GLUE batches are
    return ids, segments, mask, jnp.asarray([0, 1]), jnp.ones((batch,), jnp.float32)


def test_tiny_model_equal_with_pallas_interpret_and_xla():
    results = []
    for impl in ("xla", "pallas_interpret"):
        cfg = tiny(f"impl.attention={impl}")
        model = BertForClassification(cfg.model, 2, key=jax.random.PRNGKey(3))
        batch = _classification_batch(cfg)
        loss, grads = eqx.filter_jit(eqx.filter_value_and_grad(batch_loss))(model, batch, None, Policy(),
                                                                            cfg.impl.attention)
        results.append((float(loss), jax.tree.leaves(grads)))
    (loss_x, grads_x), (loss_p, grads_p) = results
    assert loss_p == pytest.approx(loss_x, rel=1e-5, abs=1e-6)
    for a, b in zip(grads_x, grads_p):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_auto_attention_resolution():
    from jaxbert.model.layers import resolve_attention
    q16 = jnp.zeros((2, 128, 4, 64), jnp.bfloat16)
    on_gpu = jax.default_backend() == "gpu"
    assert resolve_attention("auto", q16.astype(jnp.float32), None) == "xla"  # float32: XLA everywhere
    unpadded = resolve_attention("auto", q16, None)
    padded = resolve_attention("auto", q16, jnp.ones((2, 128), bool))
    assert padded == ("cudnn" if on_gpu else "xla")  # finetuning batches with padding stay on cuDNN
    assert unpadded == (("pallas" if jax.device_count() == 1 else "cudnn") if on_gpu else "xla")
    long = jnp.zeros((1, 512, 4, 64), jnp.bfloat16)  # beyond the kernel's 256 tokens
    assert resolve_attention("auto", long, None) == ("cudnn" if on_gpu else "xla")
    assert resolve_attention("cudnn", q16, None) == "cudnn"  # explicit names pass through
    assert resolve_attention("auto", q16.astype(jnp.float16), None) == ("cudnn" if on_gpu else "xla")  # bf16 only
