"""FP8 against bf16 on the GEMMs of one BERT layer, quantisation included: what does FP8 save per GEMM?

    python benchmarks/fp8_gemm.py [--tokens 32768] [--hidden 768] [--ffn 3072]

For each (k, n) of the layer (QKV column block, attention output, FFN in, FFN out) it times, forward only and
forward + backward (the three GEMMs of training), ``x @ w`` in bf16 and :func:`jaxbert.model.fp8.fp8_matmul`
(quantisation included). One JSON line per shape, then a table. (Whether XLA chose FP8 GEMM kernels shows in
a profile of the training step: cuBLASLt ``nvjet_sm90_qq...`` / ``qr...`` kernels take e4m3 / e5m2 operands.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxbert.model.fp8 import fp8_matmul  # noqa: E402


def timed(fn, *args, repeats: int = 20) -> float:
    """Mean ms per call over ``repeats`` calls after a warm-up call."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = compiled(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats * 1e3


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    args = p.parse_args(argv)
    h, f, m = args.hidden, args.ffn, args.tokens
    rows = []
    for name, k, n in (("qkv-block", h, h), ("ffn-in", h, f), ("ffn-out", f, h)):
        kx, kw = jax.random.split(jax.random.PRNGKey(0))
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        w = (0.02 * jax.random.normal(kw, (k, n), jnp.float32)).astype(jnp.bfloat16)

        def train(mm):
            return lambda x, w: jax.grad(lambda x, w: jnp.sum(mm(x, w).astype(jnp.float32) ** 2),
                                         argnums=(0, 1))(x, w)

        row = {"gemm": name, "m": m, "k": k, "n": n, "device": str(jax.devices()[0].device_kind)}
        for label, fn, flops in (("bf16_fwd", lambda x, w: x @ w, 2 * m * k * n),
                                 ("fp8_fwd", fp8_matmul, 2 * m * k * n),
                                 ("bf16_train", train(lambda x, w: x @ w), 6 * m * k * n),
                                 ("fp8_train", train(fp8_matmul), 6 * m * k * n)):
            ms = timed(fn, x, w)
            row[label + "_ms"] = round(ms, 4)
            row[label + "_tflops"] = round(flops / ms / 1e9, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"{'gemm':<10} {'bf16 fwd':>9} {'fp8 fwd':>9} {'bf16 train':>11} {'fp8 train':>10}  (ms)")
    for r in rows:
        print(f"{r['gemm']:<10} {r['bf16_fwd_ms']:>9.3f} {r['fp8_fwd_ms']:>9.3f} {r['bf16_train_ms']:>11.3f} "
              f"{r['fp8_train_ms']:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
