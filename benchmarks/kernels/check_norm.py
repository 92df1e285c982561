"""GPU check and micro-benchmark of the fused residual-add + LayerNorm (jaxbert.model.norm_kernels).

    PYTHONPATH=src python3 benchmarks/kernels/check_norm.py [--iters 50] [--no-sweep] [--no-model]

1. Correctness, bf16, rows = 256 * 128, widths 768 and 512 (and 200: padded, masked): the Pallas kernel against
   the XLA reference, forward (s, y) and backward (ds, d_scale, d_bias), both also against a float32 computation
   on the same inputs (from s = x + h rounded to bf16). PASS when the kernel's error from float32 is at most 2x
   the reference's plus one bf16 ulp of the largest value, and s = x + h exactly; the plain LayerNorm (no h)
   likewise. Float32 inputs: kernel vs reference, tight.
2. Model: BERT-base shape with 2 layers, batch 8 x 128, MLM loss and all gradients with impl.norm=pallas vs xla,
   bf16 (each against an fp32 run, same 2x rule) and fp32 (pallas vs xla, tight).
3. Timing, median of --iters runs after warm-up (jax.block_until_ready each): forward + backward of add+LN,
   XLA vs Pallas, and the kernel's block settings swept (BLOCK_ELEMENTS x BACKWARD_PROGRAMS) for the fastest.

Exits 1 on any FAIL. A model-level timing is `jaxbert bench --config base impl.norm=pallas` against
`impl.norm=xla`.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxbert.model import norm_kernels
from jaxbert.model.norm_kernels import add_layer_norm, layer_norm
from timing import median_ms

EPS = 1e-12  # BERT's
FAILURES: list[str] = []
KERNEL = "pallas"  # "pallas_interpret" with --interpret (a CPU smoke test of this script)


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def inputs(rows: int, width: int, dtype, seed: int = 0):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = (2.0 * jax.random.normal(k[0], (rows, width)) + 0.5).astype(dtype)
    h = jax.random.normal(k[1], (rows, width)).astype(dtype)
    scale = 1.0 + 0.2 * jax.random.normal(k[2], (width,))
    bias = 0.2 * jax.random.normal(k[3], (width,))
    g_s = jax.random.normal(k[4], (rows, width)).astype(dtype)
    g_y = jax.random.normal(k[5], (rows, width)).astype(dtype)
    return x, h, scale, bias, g_s, g_y


def fwd_bwd(implementation: str, with_h: bool = True):
    """A jitted function of the inputs returning the outputs and every gradient."""
    def run(x, h, scale, bias, g_s, g_y):
        if with_h:
            (s, y), vjp = jax.vjp(lambda *a: add_layer_norm(*a, EPS, implementation), x, h, scale, bias)
            dx, _, d_scale, d_bias = vjp((g_s, g_y))
            return s, y, dx, d_scale, d_bias
        y, vjp = jax.vjp(lambda *a: layer_norm(*a, EPS, implementation), x, scale, bias)
        return (y,) + vjp(g_y)
    return jax.jit(run)


def max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def check_shape(rows: int, width: int, dtype, with_h: bool) -> None:
    args = inputs(rows, width, dtype)
    tag = f"{'add+LN' if with_h else 'LN'} {rows}x{width} {jnp.dtype(dtype).name}"
    names = ("s", "y", "ds", "d_scale", "d_bias") if with_h else ("y", "dx", "d_scale", "d_bias")
    pallas = fwd_bwd(KERNEL, with_h)(*args)
    xla = fwd_bwd("xla", with_h)(*args)
    if dtype == jnp.float32:
        for name, p, r in zip(names, pallas, xla):
            scale = max(float(jnp.max(jnp.abs(r))), 1.0)
            err = max_err(p, r)
            tol = (1e-5 if name not in ("d_scale", "d_bias") else 1e-5 * np.sqrt(rows)) * scale
            report(f"{tag} {name}", err <= tol, f"max|pallas-xla| {err:.3g} (tol {tol:.3g})")
        return
    # 16-bit: both against float32 math on the same inputs, from s = x + h rounded to the input dtype (the
    # definition; XLA may normalise the unrounded sum, which the 2x rule and the floor allow for)
    x, h, scale, bias, g_s, g_y = (a.astype(jnp.float32) for a in args)
    truth = fwd_bwd("xla", with_h)((args[0] + args[1]).astype(jnp.float32) if with_h else x, jnp.zeros_like(h),
                                   scale, bias, g_s, g_y)
    for name, p, r, t in zip(names, pallas, xla, truth):
        if name == "s":
            err = max_err(p, args[0] + args[1])
            report(f"{tag} s", err == 0.0, f"max|s-(x+h)| {err:.3g} (must be 0)")
            continue
        e_p, e_x, diff = max_err(p, t), max_err(r, t), max_err(p, r)
        floor = 2.0 ** -8 * max(float(jnp.max(jnp.abs(t))), 1.0)  # about one bf16 ulp of the largest value
        report(f"{tag} {name}", e_p <= 2.0 * e_x + floor,
               f"max err vs fp32: pallas {e_p:.3g}, xla {e_x:.3g}; max|pallas-xla| {diff:.3g} "
               f"(rel {diff / max(float(jnp.max(jnp.abs(t))), 1e-9):.2e})")


def check_model() -> None:
    import equinox as eqx

    from jaxbert import config
    from jaxbert.config import Kernels
    from jaxbert.model import BertForMLM
    from jaxbert.precision import Policy

    cfg = config.load("base", ["model.layers=2", "model.vocab_size=30522"])
    model = BertForMLM(cfg.model, key=jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(5, cfg.model.vocab_size, (8, 128)), jnp.int32)
    mask = jnp.ones(ids.shape, bool).at[:, 100:].set(False)

    def loss(m, kernels, policy):
        logits = m(ids, jnp.zeros_like(ids), mask, policy=policy, attention=kernels)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 3])

    grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    results = {}
    for precision in ("fp32", "bf16"):
        for norm in ("xla", KERNEL):
            # fp32 matmuls in full precision (not TF32), else rounding flips hide the comparison
            with jax.default_matmul_precision("float32" if precision == "fp32" else "default"):
                results[precision, norm[:6]] = grad(model, Kernels("auto", norm), Policy.from_name(precision))

    def rel(a, b) -> float:  # worst leaf: max |a - b| / max |b|
        return max(max_err(x, y) / max(float(jnp.max(jnp.abs(y))), 1e-12)
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    (l32x, g32x), (l32p, g32p) = results["fp32", "xla"], results["fp32", "pallas"]
    e = rel(g32p, g32x)
    report("model fp32 grads", e <= 1e-4 and abs(float(l32p - l32x)) <= 1e-4 * abs(float(l32x)),
           f"loss pallas {float(l32p):.6f} xla {float(l32x):.6f}; worst leaf rel err {e:.2e} (tol 1e-4)")
    (l16x, g16x), (l16p, g16p) = results["bf16", "xla"], results["bf16", "pallas"]
    e_p, e_x = rel(g16p, g32x), rel(g16x, g32x)
    report("model bf16 grads", e_p <= 2.0 * e_x + 1e-3,
           f"loss pallas {float(l16p):.5f} xla {float(l16x):.5f} fp32 {float(l32x):.5f}; worst leaf rel err vs "
           f"fp32: pallas {e_p:.2e}, xla {e_x:.2e}")




def time_shapes(rows: int, widths: list[int], iters: int, sweep: bool) -> None:
    for width in widths:
        args = inputs(rows, width, jnp.bfloat16)
        for with_h in (True, False):
            what = "add+LN" if with_h else "LN"
            # bf16 tensors read or written once: x, h, s, y forward, s, g_s, g_y, ds backward (LN: x, y; x, g_y, dx)
            moved = rows * width * 2 * (8 if with_h else 5)
            xla = median_ms(fwd_bwd("xla", with_h), args, repeats=iters)
            pallas = median_ms(fwd_bwd(KERNEL, with_h), args, repeats=iters)
            print(f"TIME {what} fwd+bwd {rows}x{width} bf16: xla {xla:.3f} ms, pallas {pallas:.3f} ms "
                  f"(xla/pallas {xla / pallas:.2f}; {moved / 1e6:.0f} MB of tensors once: "
                  f"xla {moved / xla / 1e6:.0f} GB/s, pallas {moved / pallas / 1e6:.0f} GB/s)", flush=True)
        if not sweep:
            continue
        defaults = norm_kernels.BLOCK_ELEMENTS, norm_kernels.BACKWARD_PROGRAMS
        best = None
        try:
            for elements in (1024, 2048, 4096, 8192):
                for programs in (264, 512, 1056, 2112):
                    norm_kernels.BLOCK_ELEMENTS, norm_kernels.BACKWARD_PROGRAMS = elements, programs
                    ms = median_ms(fwd_bwd(KERNEL), args, repeats=iters)
                    print(f"SWEEP {rows}x{width} BLOCK_ELEMENTS={elements} BACKWARD_PROGRAMS={programs}: "
                          f"{ms:.3f} ms", flush=True)
                    best = min(best or (ms, elements, programs), (ms, elements, programs))
        finally:
            norm_kernels.BLOCK_ELEMENTS, norm_kernels.BACKWARD_PROGRAMS = defaults
        print(f"BEST {rows}x{width}: BLOCK_ELEMENTS={best[1]} BACKWARD_PROGRAMS={best[2]} {best[0]:.3f} ms "
              f"(defaults {defaults[0]}, {defaults[1]})", flush=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256 * 128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--no-sweep", action="store_true", help="skip the block-setting sweep")
    p.add_argument("--no-model", action="store_true", help="skip the model check")
    p.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke test; use small --rows)")
    args = p.parse_args(argv)
    global KERNEL
    KERNEL = "pallas_interpret" if args.interpret else "pallas"
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, backend {jax.default_backend()}", flush=True)
    if jax.default_backend() != "gpu" and not args.interpret:
        print("FAIL: no GPU (the Pallas Triton kernels need one; the CPU tests run them interpreted)")
        return 1
    for width in (768, 512, 200):
        for with_h in (True, False):
            check_shape(args.rows, width, jnp.bfloat16, with_h)
        check_shape(args.rows, width, jnp.float32, True)
    check_shape(args.rows + 3, 1024, jnp.bfloat16, True)  # rows not a multiple of any block
    if not args.no_model:
        check_model()
    time_shapes(args.rows, [768, 512], args.iters, not args.no_sweep)
    print(f"{'FAIL' if FAILURES else 'PASS'}: {len(FAILURES)} failed check(s) {FAILURES}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
