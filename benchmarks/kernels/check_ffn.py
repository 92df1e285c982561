"""GPU check and micro-benchmark of the fused GELU-backward GEMM (jaxbert.model.ffn_kernels).

    PYTHONPATH=src python3 benchmarks/kernels/check_ffn.py [--repeats 30] [--sweep 128x128x64w4s3,...]

For the budget and base shapes (32,768 tokens; ffn x hidden 2048 x 512 and 3072 x 768), bf16, tanh GELU:
``d_pre`` and ``d_w`` of ``gelu_matmul`` with ``pallas`` against ``xla``, both against a float32 computation on
the same inputs. PASS when the kernel's largest error from float32 is at most 2x the reference's plus one bf16
ulp of the largest value. Then the median milliseconds of forward + backward for: the model's unfused path
(``activation`` + matmul, what ``impl.ffn=xla`` runs), ``gelu_matmul`` xla, ``gelu_matmul`` pallas. Exits 1 on
a FAIL. ``--sweep``: also time the kernel under each listed tile setting (``MxNxK`` tile, ``w`` warps, ``s``
stages; ``jaxbert.model.ffn_kernels.KernelOptions``), each checked like the default. The model-level figure is `benchmarks/throughput.py --cases benchmarks/cases/issue17f.json`.
"""

from __future__ import annotations

import argparse
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxbert.model.ffn_kernels import KernelOptions, gelu_matmul
from jaxbert.model.layers import activation
from timing import median_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sweep", default="")
    args = parser.parse_args()
    settings = {}
    for text in filter(None, args.sweep.split(",")):
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)", text)
        if not m:
            parser.error(f"--sweep: expected MxNxKwWsS, e.g. 128x128x64w4s3, got {text!r}")
        bm, bn, bk, warps, stages = map(int, m.groups())
        settings[f"pallas {text}"] = KernelOptions(bm, bn, bk, warps, stages)
    print(jax.devices())
    failed = False
    for ffn, hidden in ((2048, 512), (3072, 768)):
        k = jax.random.split(jax.random.PRNGKey(0), 3)
        pre = (2.0 * jax.random.normal(k[0], (256, 128, ffn))).astype(jnp.bfloat16)
        w = (0.03 * jax.random.normal(k[1], (ffn, hidden))).astype(jnp.bfloat16)
        g = jax.random.normal(k[2], (256, 128, hidden)).astype(jnp.bfloat16)

        def grads(fn):
            return jax.jit(lambda p, w, g: jax.vjp(fn, p, w)[1](g))

        paths = {
            "unfused": lambda p, w: activation(p, "gelu_tanh") @ w,
            "xla": lambda p, w: gelu_matmul(p, w, True, "xla"),
            "pallas": lambda p, w: gelu_matmul(p, w, True, "pallas"),
            **{name: (lambda p, w, o=o: gelu_matmul(p, w, True, "pallas", o)) for name, o in settings.items()},
        }
        results = {name: grads(fn)(pre, w, g) for name, fn in paths.items()}
        exact = jax.jit(lambda p, w, g: jax.vjp(lambda p, w: jax.nn.gelu(p, approximate=True) @ w, p, w)[1](g))(
            pre.astype(jnp.float32), w.astype(jnp.float32), g.astype(jnp.float32))
        for i, name in enumerate(("d_pre", "d_w")):
            truth = np.asarray(exact[i], np.float32)
            ulp = float(np.abs(truth).max()) * 2.0 ** -8
            err = {p: float(np.abs(np.asarray(results[p][i], np.float32) - truth).max()) for p in results}
            ok = all(e <= 2 * err["xla"] + ulp for p, e in err.items() if p.startswith("pallas"))
            failed |= not ok
            print(f"ffn {ffn} hidden {hidden} {name}: max error vs float32 " +
                  " ".join(f"[{p}] {e:.3e}" for p, e in err.items()) + f"  {'PASS' if ok else 'FAIL'}")
        for name, fn in paths.items():
            ms = median_ms(grads(fn), (pre, w, g), repeats=args.repeats)
            print(f"ffn {ffn} hidden {hidden} {name:24s} forward + backward {ms:8.3f} ms")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
