"""The short-sequence Pallas attention kernel on the GPU: correct against XLA, and how fast against XLA and cuDNN.

    PYTHONPATH=src python3 benchmarks/kernels/check_attention.py [--setting bq=64,w=4,wb=8 ...]
        [--shapes 256,128,12,64 256,128,8,64] [--dtype bf16] [--repeats 30] [--warmup 5] [--interpret]

For each shape (batch, seq, heads, head_dim), without and with a right-padded key mask (row 0 full, the
others of random lengths in [seq/4, seq]), it computes output and the gradients wrt q, k, v:

- the reference: XLA attention on float32 copies of the inputs, float32 matmuls at full precision;
- XLA and cuDNN (``jax.nn.dot_product_attention``) in ``--dtype``: their errors are the yardstick;
- the Pallas kernel once per ``--setting`` (bq: query rows per forward program, w / wb: warps of the
  forward / backward kernel, st: stages).

Errors are max |x - ref| / max |ref| per array. A Pallas setting PASSes when each of its four errors is at
most twice XLA's error on the same array, or under a floor (1e-2 for 16-bit dtypes, 1e-4 for float32). Times
are medians over ``--repeats`` calls after ``--warmup`` calls, each call waited for (forward, and forward +
backward as a training step runs them). Exit status 1 when any setting FAILs or does not compile.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxbert.model.attention_kernel import KernelOptions, short_attention  # noqa: E402
from timing import median_ms  # noqa: E402

DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
SETTING_KEYS = {"bq": "block_q", "w": "num_warps", "wb": "num_warps_bwd", "st": "num_stages"}
DEFAULT_SETTINGS = ["bq=64,w=4,wb=8", "bq=128,w=4,wb=8", "bq=128,w=8,wb=8", "bq=64,w=4,wb=4"]  # first: the default


def parse_setting(text: str) -> KernelOptions:
    fields = {}
    for item in filter(None, text.split(",")):
        name, value = item.split("=")
        fields[SETTING_KEYS[name.strip()]] = int(value)
    return KernelOptions(**fields)


def xla(q, k, v, mask):
    bias_mask = None if mask is None else mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, implementation="xla")


def cudnn(q, k, v, mask):
    lengths = None if mask is None else mask.sum(-1).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")


def pallas(options: KernelOptions, interpret: bool = False):
    return lambda q, k, v, mask: short_attention(q, k, v, mask, interpret=interpret, options=options)


def forward_backward(attend):
    def run(q, k, v, do, mask):
        out, pull = jax.vjp(lambda a, b, c: attend(a, b, c, mask), q, k, v)
        return (out, *pull(do))

    return jax.jit(run)




def rel_errors(got, want) -> list[float]:
    return [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w))) for g, w in zip(got, want)]


def inputs(shape, dtype, masked: bool, seed: int = 0):
    batch, seq = shape[:2]
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v, do = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys[:4])
    mask = None
    if masked:
        lengths = jax.random.randint(keys[4], (batch,), seq // 4, seq + 1).at[0].set(seq)
        mask = jnp.arange(seq)[None] < lengths[:, None]
    return q, k, v, do, mask


def fmt(errs: list[float]) -> str:
    return " ".join(f"{name}={e:.2e}" for name, e in zip(("out", "dq", "dk", "dv"), errs))


def check_case(shape, dtype, masked: bool, settings: list[str], args) -> tuple[bool, dict[str, float]]:
    """One shape and mask: reference, XLA and cuDNN yardsticks, each Pallas setting. (all passed, times)"""
    q, k, v, do, mask = inputs(shape, dtype, masked)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    with jax.default_matmul_precision("float32"):
        want = forward_backward(xla)(*f32, mask)
    tag = f"shape={','.join(map(str, shape))} mask={'right-padded' if masked else 'none'}"
    floor = 1e-4 if dtype == jnp.float32 else 1e-2
    times: dict[str, float] = {}
    yardstick = None
    for name, attend in [("xla", xla), ("cudnn", cudnn)]:
        try:
            fn = forward_backward(attend)
            errs = rel_errors(fn(q, k, v, do, mask), want)
            fwd = median_ms(jax.jit(attend), (q, k, v, mask), args.warmup, args.repeats)
            times[name] = median_ms(fn, (q, k, v, do, mask), args.warmup, args.repeats)
            yardstick = errs if name == "xla" else yardstick
            print(f"INFO {tag} impl={name} err {fmt(errs)} fwd={fwd:.3f}ms fwd+bwd={times[name]:.3f}ms", flush=True)
        except Exception as e:  # cuDNN may be unavailable for a dtype or shape: a yardstick, not a check
            print(f"SKIP {tag} impl={name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    ok = True
    for setting in settings:
        name = f"pallas[{setting}]"
        try:
            options = parse_setting(setting)
            fn = forward_backward(pallas(options, args.interpret))
            errs = rel_errors(fn(q, k, v, do, mask), want)
            limits = [max(2 * y, floor) for y in (yardstick or [floor] * 4)]
            passed = all(e <= lim for e, lim in zip(errs, limits)) and all(np.isfinite(errs))
            fwd = median_ms(jax.jit(pallas(options, args.interpret)), (q, k, v, mask), args.warmup, args.repeats)
            times[name] = median_ms(fn, (q, k, v, do, mask), args.warmup, args.repeats)
            print(f"{'PASS' if passed else 'FAIL'} {tag} impl={name} err {fmt(errs)} "
                  f"(limits {fmt(limits)}) fwd={fwd:.3f}ms fwd+bwd={times[name]:.3f}ms", flush=True)
        except Exception as e:
            passed = False
            traceback.print_exc()
            print(f"FAIL {tag} impl={name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
        ok = ok and passed
    return ok, times


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["256,128,12,64", "256,128,8,64"],
                   help="batch,seq,heads,head_dim")
    p.add_argument("--setting", action="append", default=None,
                   help=f"Pallas launch setting, repeatable: keys {sorted(SETTING_KEYS)} (default: {DEFAULT_SETTINGS})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--interpret", action="store_true", help="run the kernel interpreted (a CPU smoke test of this script)")
    args = p.parse_args(argv)
    settings = args.setting or DEFAULT_SETTINGS
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; dtype {args.dtype}", flush=True)
    all_ok, table = True, []
    for shape_text in args.shapes:
        shape = tuple(int(x) for x in shape_text.split(","))
        for masked in (False, True):
            ok, times = check_case(shape, DTYPES[args.dtype], masked, settings, args)
            all_ok = all_ok and ok
            table.append((shape_text, "padded" if masked else "none", times))
    print("\nfwd+bwd median ms")
    for shape_text, mask, times in table:
        best = min((t, n) for n, t in times.items() if n.startswith("pallas")) if any(
            n.startswith("pallas") for n in times) else None
        line = "  ".join(f"{n}={t:.3f}" for n, t in times.items())
        print(f"  {shape_text} mask={mask}: {line}" + (f"  | best pallas {best[1]} {best[0]:.3f}" if best else ""))
    print("ALL PASS" if all_ok else "SOME FAIL")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
