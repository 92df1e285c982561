#!/usr/bin/env bash
# Does FP8 keep training quality? The same pretraining run (same seed, data, schedule, fixed step count) in
# bf16 and in fp8 (bf16 + FP8 encoder matmuls), held-out MLM loss every 250 steps, on one GPU.
# usage: bash benchmarks/fp8_quality.sh WIKI_DIR OUT_DIR [STEPS] [PRESET] [overrides...]
# Writes OUT_DIR/<precision>/metrics.jsonl and plots, and OUT_DIR/compare.txt (eval loss side by side).
set -euo pipefail
wiki=$1 out=$2 steps=${3:-4000} preset=${4:-budget}; shift $(( $# < 4 ? $# : 4 ))
export PYTHONUNBUFFERED=1
mkdir -p "$out"
jaxbert prepare --config "$preset" --quiet data.source="$wiki" data.cache_dir=/tmp/jaxbert-cache "$@" | tail -n 2
for precision in bf16 fp8; do
  rm -rf "/tmp/fp8q/$precision"
  jaxbert pretrain --config "$preset" --quiet data.source="$wiki" data.cache_dir=/tmp/jaxbert-cache \
    train.budget_minutes=null train.steps="$steps" train.batch_start=256 train.batch_end=256 train.micro_batch=256 \
    train.eval_every=250 train.eval_batches=20 train.checkpoint_every=0 train.keep_checkpoints=1 \
    train.precision="$precision" train.out_dir=/tmp/fp8q train.run_name="$precision" "$@" 2>&1 | tail -n 4
  mkdir -p "$out/$precision"
  cp -r "/tmp/fp8q/$precision/metrics.jsonl" "/tmp/fp8q/$precision/plots" "/tmp/fp8q/$precision/config.yaml" "$out/$precision/"
done
python3 - "$out" <<'PY' | tee "$out/compare.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {p: {r["step"]: r for r in map(json.loads, open(out / p / "metrics.jsonl")) if r.get("split") == "eval"}
        for p in ("bf16", "fp8")}
train = {p: [r for r in map(json.loads, open(out / p / "metrics.jsonl")) if r.get("split") == "train"]
         for p in ("bf16", "fp8")}
print(f"{'step':>6} {'bf16 loss':>10} {'fp8 loss':>10} {'bf16 acc':>9} {'fp8 acc':>9}")
for step in sorted(set(runs["bf16"]) & set(runs["fp8"])):
    a, b = runs["bf16"][step], runs["fp8"][step]
    print(f"{step:>6} {a['loss']:>10.4f} {b['loss']:>10.4f} {a['accuracy']:>9.4f} {b['accuracy']:>9.4f}")
for p in ("bf16", "fp8"):
    tps = sorted(r["tokens_per_second"] for r in train[p][len(train[p]) // 4:])
    skipped = max((r.get("skipped_total", 0) for r in train[p]), default=0)
    print(f"{p}: median {tps[len(tps) // 2]:,.0f} tokens/s over the last 3/4 of the logs, skipped steps {skipped:.0f}")
PY
