"""``jaxbert bench``: throughput of the real pretraining step (masking, forward, backward, loss scaling, AdamW).

Each measured side runs in its own subprocess, so memory pools and compilation caches never meet:

* ``jaxbert``: :func:`jaxbert.train.train_step` (the ``micro_step`` + ``apply_step`` pair the training loop
  runs) on random token ids fed from host memory, as the loader feeds them;
* with ``--peer``: HF transformers ``BertForMaskedLM`` eager and ``torch.compile``-d, same shapes
  (``benchmarks/hf_peer.py`` of a source checkout).

Model FLOPs per token (what the model needs; forward + backward = 3 x forward, 2 FLOPs per multiply-add)::

    encoder    6 * L * (4 H^2 + 2 H F)          q, k, v, output projections and the two FFN matrices
                                                (model.ffn_type=glu: 3 H F, ffn_in being H x 2F)
    attention  12 * L * S * H                   Q K^T and P V: 2 S H each per token and layer, times 3
    MLM head   6 * (H^2 + H V) * m / S          transform + tied decoder at the m predicted positions of a
                                                sequence (jaxbert's sparse head); m = S for a full head (HF)

Embedding gathers, LayerNorm, GELU, softmax, the loss and the optimizer are not counted (no matmuls).
MFU = tokens/s * FLOPs/token / (bf16 matmul rate of an 8192^3 product measured in the same run, times the
number of devices with ``--devices``; peak memory is that of the first device).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from . import config as config_lib
from .config import Config, ModelConfig

SPECIAL_IDS = (0, 1, 2, 3, 4)  # ids the benchmark's masking treats as special; 4 is [MASK]
PEER_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "hf_peer.py"


def flops_per_token(m: ModelConfig, seq: int, predictions: Optional[int]) -> dict[str, float]:
    """Training FLOPs per input token, by part (see the module docstring); ``predictions=None``: full head."""
    h, f, layers = m.hidden, m.ffn, m.layers
    ffn_mats = 3 if m.ffn_type == "glu" else 2  # glu: ffn_in has 2 * ffn columns
    per_seq = seq if predictions is None else predictions
    parts = {"encoder": 6.0 * layers * (4 * h * h + ffn_mats * h * f), "attention": 12.0 * layers * seq * h,
             "head": 6.0 * (h * h + h * m.vocab_size) * per_seq / seq}
    parts["total"] = sum(parts.values())
    return parts


def bench_config(preset: str, batch: int, seq: int, micro_batch: Optional[int], precision: str,
                 overrides: tuple[str, ...] = ()) -> Config:
    """The preset with the benchmark's shapes: one optimizer step of ``batch`` sequences of ``seq`` tokens."""
    micro = micro_batch or batch
    base = config_lib.load(preset)
    predictions = max(base.data.max_predictions, math.ceil(base.data.mlm_probability * seq))
    return config_lib.load(preset, [f"data.seq_len={seq}", f"data.max_predictions={predictions}",
                                    f"train.micro_batch={micro}", f"train.batch_start={batch}",
                                    f"train.batch_end={batch}", f"train.precision={precision}", *overrides])


# ------------------------------------------------------------------------------------------ the jax worker


def jax_matmul_ceiling(n: int = 8192, reps: int = 10) -> float:
    """bf16 TFLOP/s of an ``n``^3 product on random data (mean over ``reps`` after three warm-ups)."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    product = jax.jit(jnp.matmul)
    for _ in range(3):
        product(a, b).block_until_ready()
    start = time.perf_counter()
    outs = [product(a, b) for _ in range(reps)]
    jax.block_until_ready(outs)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def _memory_stats() -> dict[str, int]:
    import jax

    return jax.devices()[0].memory_stats() or {}


def time_train_step(cfg: Config, warmup: int, steps: int, profile_dir: Optional[str] = None,
                    devices: int = 1) -> dict[str, Any]:
    """Compile, warm up and time ``steps`` optimizer steps of :func:`jaxbert.train.train_step`. With ``devices``
    > 1 the step runs on a mesh of the first ``devices`` local devices (``distributed.fsdp`` sets its parameter
    axis), the global batch split over them and fed as ``jaxbert pretrain`` feeds it."""
    import jax
    import numpy as np

    from . import distributed, train

    t = cfg.train
    k = t.batch_end // t.micro_batch
    state = train.init_state(cfg, key=jax.random.PRNGKey(0))
    mesh = None
    if devices > 1:
        if devices > jax.local_device_count():
            raise ValueError(f"--devices {devices}: only {jax.local_device_count()} local device(s) here")
        mesh = distributed.make_mesh(cfg, jax.local_devices()[:devices])
        distributed.check_batch(t.micro_batch, mesh, "--micro-batch")
        state = distributed.shard_state(state, mesh)
    # data.whole_word_masking: every fourth id of the random tokens stands for a "##" continuation piece
    vocab = [f"##{i}" if i % 4 == 3 else f"t{i}" for i in range(cfg.model.vocab_size)]
    spec = train.make_spec(cfg, SPECIAL_IDS, SPECIAL_IDS[-1], mesh, vocab)
    place = (lambda rows: rows) if mesh is None else (lambda rows: distributed.global_batch(rows, mesh))
    rng = np.random.default_rng(0)
    pool = [rng.integers(len(SPECIAL_IDS), cfg.model.vocab_size, (t.batch_end, cfg.data.seq_len), dtype=np.int32)
            for _ in range(4)]

    def run(state: Any, count: int, first: int) -> tuple[Any, Any]:
        metrics = None
        for i in range(first, first + count):
            ids = pool[i % len(pool)]
            micro = [place(ids[j * t.micro_batch:(j + 1) * t.micro_batch]) for j in range(k)]
            state, metrics = train.train_step(state, micro, t.peak_lr, spec)
        jax.block_until_ready((state, metrics))
        return state, metrics

    start = time.perf_counter()
    state, _ = run(state, 1, 0)
    first_step = time.perf_counter() - start
    state, _ = run(state, warmup, 1)
    windows = []
    for w in range(3):
        start = time.perf_counter()
        state, metrics = run(state, steps, 1 + warmup + w * steps)
        windows.append((time.perf_counter() - start) / steps)
    step_s = sorted(windows)[1]  # the median of three windows
    result = {"step_ms": 1e3 * step_s, "step_ms_windows": [1e3 * w for w in windows],
              "compile_s": max(first_step - step_s, 0.0), "first_step_s": first_step,
              "tokens_per_s": t.batch_end * cfg.data.seq_len / step_s,
              "loss": float(metrics["loss"]), "peak_gib": _memory_stats().get("peak_bytes_in_use", 0) / 2**30,
              "limit_gib": _memory_stats().get("bytes_limit", 0) / 2**30}
    if profile_dir:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            run(state, 3, 0)
        result["profile"] = summarise_trace(profile_dir, steps=3)
    return result


_CATEGORIES = (("attention", ("sdpa", "flash", "fmha", "attention", "cudnn")),
               ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "wgmma", "matmul", "dot")),
               ("scatter/gather", ("scatter", "gather", "dynamic")),
               ("reduce/LN fusion", ("reduce", "input_fusion", "layer_norm")),
               ("elementwise fusion", ("fusion", "loop", "convert", "add", "copy", "transpose")))


def _category(name: str) -> str:
    low = name.lower()
    for label, keys in _CATEGORIES:
        if any(key in low for key in keys):
            return label
    return "other"


def summarise_trace(profile_dir: str, steps: int, top: int = 30) -> dict[str, Any]:
    """Device time by kernel and by category from the perfetto trace of ``jax.profiler.trace``."""
    import gzip

    files = sorted(Path(profile_dir).rglob("perfetto_trace.json.gz"))
    if not files:
        return {"error": f"no perfetto trace under {profile_dir}"}
    events = json.load(gzip.open(files[-1]))["traceEvents"]
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and any(s in str(e.get("args", {}).get("name", "")) for s in ("GPU", "gpu", "/device:"))}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e]
    if not gpu_pids:  # CPU: the thunks that ran HLO ops
        kernels = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {}) and "dur" in e]
    if not kernels:
        return {"error": "no device events in the trace"}
    by_name: dict[str, list] = {}
    for e in kernels:
        entry = by_name.setdefault(e["name"], [0.0, 0, e.get("args", {}).get("hlo_op", "")])
        entry[0] += e["dur"]
        entry[1] += 1
    by_cat: dict[str, float] = {}
    for name, (dur, _, _) in by_name.items():
        by_cat[_category(name)] = by_cat.get(_category(name), 0.0) + dur
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    busy = sum(e["dur"] for e in kernels)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {"span_ms_per_step": span / 1e3 / steps, "busy_ms_per_step": busy / 1e3 / steps,
            "kernels_per_step": len(kernels) / steps,
            "by_category_ms": {c: d / 1e3 / steps for c, d in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "trace": str(files[-1]),
            "top": [[name[:100], op[:40], round(d / 1e3 / steps, 3), n // steps] for name, (d, n, op) in ranked]}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    cfg = bench_config(args.config, args.batch, args.seq, args.micro_batch, args.precision, tuple(args.overrides))
    config_lib.apply_xla_flags(cfg.impl)  # as `jaxbert pretrain` does, before the backend starts
    import jax
    result: dict[str, Any] = {"side": "jaxbert", "config": args.config, "batch": args.batch, "seq": args.seq,
                              "micro_batch": cfg.train.micro_batch, "precision": args.precision,
                              "attention": cfg.impl.attention, "norm": cfg.impl.norm, "jax": jax.__version__,
                              "device": jax.devices()[0].device_kind,
                              "xla_flags": os.environ.get("XLA_FLAGS", ""), "overrides": list(args.overrides),
                              "source": str(Path(__file__).resolve().parent)}
    if args.ceiling and jax.default_backend() == "gpu":
        result["ceiling_tflops"] = jax_matmul_ceiling()
    result["devices"] = args.devices
    result.update(time_train_step(cfg, args.warmup, args.steps, args.profile, args.devices))
    return result


# ----------------------------------------------------------------------------------------- the orchestrator


def median_ceiling(rows: list[dict[str, Any]]) -> Optional[float]:
    """The median of the matmul rates the sides measured (each side measures its own)."""
    found = sorted(r["ceiling_tflops"] for r in rows if "ceiling_tflops" in r)
    return found[len(found) // 2] if found else None


def run_json(cmd: list[str], env: dict[str, str], timeout: float, label: str) -> dict[str, Any]:
    """Run one side; its last stdout line is a JSON object. Failures come back as ``{"error": ...}``."""
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"side": label, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"side": label, "error": f"exit {proc.returncode}: {tail[:300]}", "stderr": proc.stderr[-3000:]}
    return json.loads(lines[-1])


def jax_command(args: argparse.Namespace, ceiling: bool) -> list[str]:
    cmd = [sys.executable, "-m", "jaxbert.bench", "--worker", "--config", args.config, "--batch", str(args.batch),
           "--seq", str(args.seq), "--precision", args.precision, "--warmup", str(args.warmup),
           "--steps", str(args.steps)]
    if args.micro_batch:
        cmd += ["--micro-batch", str(args.micro_batch)]
    if args.devices > 1:
        cmd += ["--devices", str(args.devices)]
    if ceiling:
        cmd.append("--ceiling")
    if args.profile:
        cmd += ["--profile", args.profile]
    return cmd + list(args.overrides)


def peer_command(cfg: Config, args: argparse.Namespace, mode: str) -> list[str]:
    if not PEER_SCRIPT.is_file():
        raise FileNotFoundError(f"{PEER_SCRIPT}: the HF peer ships with a source checkout (benchmarks/hf_peer.py)")
    m = cfg.model
    return [sys.executable, str(PEER_SCRIPT), "--mode", mode, "--layers", str(m.layers), "--hidden", str(m.hidden),
            "--heads", str(m.heads), "--ffn", str(m.ffn), "--vocab", str(m.vocab_size), "--seq", str(args.seq),
            "--batch", str(args.batch), "--dropout", str(m.dropout), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--device", args.peer_device, "--ceiling"]


def add_derived(row: dict[str, Any], cfg: Config, ceiling: Optional[float]) -> dict[str, Any]:
    """FLOPs per token (sparse head for jaxbert, full head for HF) and MFU against ``ceiling``."""
    predictions = cfg.data.max_predictions if row["side"] == "jaxbert" else None
    if row["side"] == "jaxbert":  # the masking predicts round(p * seq) positions; the other slots weigh 0
        predictions = min(predictions, round(cfg.data.mlm_probability * cfg.data.seq_len))
    row["mflop_per_token"] = flops_per_token(cfg.model, cfg.data.seq_len, predictions)["total"] / 1e6
    if ceiling and "tokens_per_s" in row:
        row["mfu"] = row["tokens_per_s"] * row["mflop_per_token"] * 1e6 / (ceiling * 1e12 * row.get("devices", 1))
    return row


def table(rows: list[dict[str, Any]], reference: Optional[dict[str, Any]] = None) -> str:
    head = f"{'side':<14} {'tokens/s':>10} {'step ms':>8} {'MFLOP/tok':>9} {'MFU':>6} {'compile s':>9} " \
           f"{'peak GiB':>8} {'vs ref':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['side']:<14} error: {r['error']}")
            continue
        ratio = r["tokens_per_s"] / reference["tokens_per_s"] if reference and "tokens_per_s" in reference else None
        lines.append(f"{r['side']:<14} {r['tokens_per_s']:>10,.0f} {r['step_ms']:>8.2f} {r['mflop_per_token']:>9.0f} "
                     f"{r.get('mfu', 0) * 100:>5.1f}% {r['compile_s']:>9.1f} {r.get('peak_gib') or 0:>8.2f} "
                     f"{'' if ratio is None else f'{ratio:.2f}x':>7}")
    return "\n".join(lines)


def bench_arguments(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jaxbert bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="base", help="preset name or YAML file (default: base)")
    p.add_argument("--batch", type=int, default=256, help="sequences per optimizer step (default: 256)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per forward/backward (default: batch)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16", "fp8", "fp8_delayed"))
    p.add_argument("--devices", type=int, default=1,
                   help="data-parallel over this many local devices; --batch stays global (default: 1)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after the compiling one")
    p.add_argument("--steps", type=int, default=10, help="steps per timed window (three windows)")
    p.add_argument("--peer", action="store_true", help="also time HF transformers, eager and torch.compile")
    p.add_argument("--peer-device", default="cuda", help="torch device of the HF peer (cpu: a smoke test)")
    p.add_argument("--profile", default=None, metavar="DIR", help="trace three steps; print the top kernels")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed to each side")
    p.add_argument("--json", default=None, metavar="FILE", help="append the result rows (JSON lines) here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ceiling", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. impl.attention=xla")
    return p.parse_args(argv)


def orchestrate(args: argparse.Namespace) -> list[dict[str, Any]]:
    """All sides of one benchmark, each in its own subprocess; rows carry FLOPs and MFU."""
    cfg = bench_config(args.config, args.batch, args.seq, args.micro_batch, args.precision, tuple(args.overrides))
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    rows = [run_json(jax_command(args, ceiling=True), env, args.timeout, "jaxbert")]
    if args.peer:
        for mode in ("eager", "compile"):
            rows.append(run_json(peer_command(cfg, args, mode), env, args.timeout, f"hf-{mode}"))
    ceiling = median_ceiling(rows)
    for r in rows:
        r["ceiling_used_tflops"] = ceiling
        if "error" not in r:
            add_derived(r, cfg, ceiling)
    return rows


def main(argv: list[str]) -> int:
    args = bench_arguments(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    rows = orchestrate(args)
    reference = next((r for r in rows if r["side"] == "hf-compile" and "error" not in r), None)
    ceiling = rows[0].get("ceiling_used_tflops")
    print(f"{args.config}, seq {args.seq}, batch {args.batch}, {args.precision}; bf16 matmul ceiling "
          f"{ceiling or float('nan'):.0f} TFLOP/s")
    print(table(rows, reference))
    profile = rows[0].get("profile")
    if profile:
        print(json.dumps(profile, indent=1))
    if args.json:
        with open(args.json, "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    print(json.dumps({"rows": rows}))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
