"""GPU check of FP8 delayed scaling (jaxbert.model.fp8_delayed) on BERT-layer GEMMs: numbers, FP8 GEMMs, speed.

    PYTHONPATH=src python3 benchmarks/kernels/fp8_delayed.py [--tokens 32768] [--hidden 768] [--ffn 3072]

Per GEMM shape of a BERT layer, with the operand produced by a LayerNorm (as in the model, so the quantisation
has a producer to fuse into), forward + backward of ``sum((LN(h) @ w)^2)`` in three variants: bf16, FP8 current
scaling (``fp8_matmul``) and FP8 delayed scaling (``delayed_matmul`` with scales from the current amaxes, i.e. a
history whose maximum is the current amax). Checks, each a PASS/FAIL line:

* delayed == current scaling (output, dx, dw): max abs / rel error, rel <= 1e-2 (bit-identical on CPU);
* both FP8 variants against bf16: relative error of the output <= 0.08;
* the amax channel: the gradient of the scales equals (amax x, amax w, amax g) exactly;
* on GPU, the compiled delayed step contains cuBLASLt FP8 GEMMs (``__cublas$lt$matmul$f8``): three per shape.

Timings: median ms of ``--runs`` calls after ``--warmup`` calls (jax.block_until_ready each). Exits 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxbert.model.fp8 import fp8_matmul  # noqa: E402
from jaxbert.model.fp8_delayed import delayed_matmul, scales_from_amax  # noqa: E402
from jaxbert.model.layers import layer_norm  # noqa: E402
from timing import median_ms  # noqa: E402

FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def errors(got, ref) -> tuple[float, float]:
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    diff = float(np.max(np.abs(got - ref)))
    return diff, float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))




def step_fn(mm):
    """(h, w, scales) -> (y, dh, dw, d_scales) of sum((LN(h) @ w)^2); d_scales is None without scales."""

    def loss(h, w, scales):
        x = layer_norm(h, jnp.ones(h.shape[-1], jnp.float32), jnp.zeros(h.shape[-1], jnp.float32), 1e-12)
        y = mm(x, w, scales)
        return jnp.sum(jnp.square(y.astype(jnp.float32))), y

    def step(h, w, scales):
        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(h, w, scales)
        return (y, *grads)

    return jax.jit(step)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=30)
    args = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, backend {jax.default_backend()}")
    variants = {"bf16": step_fn(lambda x, w, s: x @ w), "fp8_current": step_fn(lambda x, w, s: fp8_matmul(x, w)),
                "fp8_delayed": step_fn(delayed_matmul)}
    h_, f_, m = args.hidden, args.ffn, args.tokens
    for name, k, n in (("qkv-block", h_, h_), ("ffn-in", h_, f_), ("ffn-out", f_, h_)):
        kh, kw = jax.random.split(jax.random.PRNGKey(0))
        h = (3.0 * jax.random.normal(kh, (m, k), jnp.float32)).astype(jnp.bfloat16)
        w = (0.02 * jax.random.normal(kw, (k, n), jnp.float32)).astype(jnp.bfloat16)
        ones = jnp.ones(3, jnp.float32)
        ref_y, ref_dh, ref_dw, _ = variants["fp8_current"](h, w, ones)
        # the current amaxes: of LN(h), of w, and of the incoming gradient 2 y
        x = layer_norm(h, jnp.ones(k, jnp.float32), jnp.zeros(k, jnp.float32), 1e-12)
        g = (2.0 * ref_y.astype(jnp.float32)).astype(jnp.bfloat16)
        amax = jnp.stack([jnp.max(jnp.abs(a.astype(jnp.float32))) for a in (x, w, g)])
        y, dh, dw, d_scales = variants["fp8_delayed"](h, w, scales_from_amax(amax))
        for label, got, ref in (("y", y, ref_y), ("dh", dh, ref_dh), ("dw", dw, ref_dw)):
            diff, rel = errors(got, ref)
            check(f"{name} delayed==current {label}", rel <= 1e-2, f"max abs {diff:.3e}, rel {rel:.3e}")
        bf_y = variants["bf16"](h, w, ones)[0]
        for label, got in (("current", ref_y), ("delayed", y)):
            diff, rel = errors(got, bf_y)
            check(f"{name} fp8 {label} vs bf16 y", rel <= 0.08, f"max abs {diff:.3e}, rel {rel:.3e}")
        # the recorded amax of g is that of the gradient that reached the matmul (g computed above from the
        # current-scaling output, equal to the delayed one when the check above is bit-exact)
        got_amax, want = np.asarray(d_scales), np.asarray(amax)
        exact = np.array_equal(got_amax[:2], want[:2]) and abs(got_amax[2] - want[2]) <= 1e-2 * want[2]
        check(f"{name} amax channel", bool(exact), f"got {got_amax.tolist()}, want {want.tolist()}")
        if on_gpu:
            hlo = variants["fp8_delayed"].lower(h, w, ones).compile().as_text()
            gemms = hlo.count("__cublas$lt$matmul$f8")
            check(f"{name} delayed uses FP8 GEMMs", gemms >= 3, f"{gemms} cuBLASLt FP8 custom calls (3 expected)")
        row = {"gemm": name, "m": m, "k": k, "n": n}
        for label, fn in variants.items():
            row[label + "_ms"] = round(median_ms(fn, (h, w, scales_from_amax(amax)), args.warmup, args.runs), 4)
        print(json.dumps(row), flush=True)
        print(f"TIME {name}: bf16 {row['bf16_ms']:.3f} ms, fp8 current {row['fp8_current_ms']:.3f} ms, "
              f"fp8 delayed {row['fp8_delayed_ms']:.3f} ms (median of {args.runs}, fwd+bwd incl. LayerNorm)")
    print("FAIL: " + ", ".join(FAILURES) if FAILURES else "ALL PASS")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
