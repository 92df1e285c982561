"""GPU check and micro-benchmark of the token-embedding gradient (jaxbert.model.embedding_grad).

    PYTHONPATH=src python3 benchmarks/kernels/check_embedding_grad.py [--data DIR/train.bin] [--repeats 30]

For the budget and base shapes (32,768 tokens, vocab 32,768, hidden 512 / 768): the table gradient of
``lookup`` with ``scatter`` (autodiff's atomic scatter-add) and ``sorted`` (block-wise sums after sorting),
from a bf16 cotangent, on ids taken from a prepared token stream (``--data``: a uint16/uint32 ``train.bin``,
dtype from the meta.json beside it) or, without one, Zipf-distributed ids with every 8th token one id (like
[MASK]). Prints the largest difference between the two against the gradient's scale (PASS below 1e-5
relative: float32 summation order) and the median milliseconds of each (forward + backward of the lookup).
Exits 1 on a FAIL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxbert.model.embedding_grad import lookup
from timing import median_ms


def token_ids(data: str | None, n: int, vocab: int) -> np.ndarray:
    if data:
        meta = json.loads((Path(data).parent / "meta.json").read_text())
        stream = np.memmap(data, dtype=meta.get("dtype", "uint16"), mode="r")
        ids = np.array(stream[:n], dtype=np.int64) % vocab
    else:
        ids = (np.random.default_rng(0).zipf(1.2, size=n) - 1) % vocab
    ids[::8] = 4  # masked positions, as the MLM batches have them
    return ids.astype(np.int32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(jax.devices())
    failed = False
    for hidden in (512, 768):
        vocab, n = 32768, 256 * 128
        ids = jnp.asarray(token_ids(args.data, n, vocab).reshape(256, 128))
        table = jax.random.normal(jax.random.PRNGKey(0), (vocab, hidden), jnp.float32)
        cot = jax.random.normal(jax.random.PRNGKey(1), (256, 128, hidden), jnp.bfloat16)
        grads = {}
        for implementation in ("scatter", "sorted"):
            def fwd_bwd(t, i, c, implementation=implementation):
                out, vjp = jax.vjp(lambda t: lookup(t, i, jnp.bfloat16, implementation), t)
                return vjp(c.astype(out.dtype))[0]
            fn = jax.jit(fwd_bwd)
            grads[implementation] = fn(table, ids, cot)
            ms = median_ms(fn, (table, ids, cot), repeats=args.repeats)
            print(f"hidden {hidden} {implementation:8s} {ms:8.3f} ms")
        scale = float(jnp.abs(grads["scatter"]).max())
        diff = float(jnp.abs(grads["sorted"] - grads["scatter"]).max())
        ok = diff <= 1e-5 * scale
        failed |= not ok
        print(f"hidden {hidden} max |sorted - scatter| {diff:.3e} of scale {scale:.3e}: {'PASS' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
