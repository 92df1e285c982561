#!/usr/bin/env bash
# One rung of the quality ladder on the GPU: pretrain on the budget corpus for MINUTES with the given overrides,
# then finetune MNLI with seeds 0 and 1 at once (finetuning is dispatch-bound: two processes share the GPU).
# usage (after `source benchmarks/finetune/device_setup.sh`):
#   bash benchmarks/quality/rung.sh NAME MINUTES [pretraining overrides...]
# FT="finetune overrides" adds finetuning overrides; SIDE="command" runs alongside the finetuning (never
# alongside the timed pretraining). Logs: $LOGS/NAME-*.log (default /tmp/q/logs); the last lines are the
# held-out MLM accuracy and each seed's best MNLI epoch.
# WIKI=path pretrains on another corpus than scratch/budget/wiki: a WikiExtractor tree, or a prepared directory
# (meta.json, train.bin, ...), which is used as it is. All of the shared Wikipedia: WIKI=/tmp/fullwiki/prepared after
# benchmarks/quality/fullwiki_unpack.sh (benchmarks/budget_run.md, "All of the shared Wikipedia").
set -uo pipefail
name=$1 minutes=$2; shift 2
logs=${LOGS:-/tmp/q/logs}; mkdir -p "$logs"
out=/tmp/q/$name
SKIP_GLUE=1 bash benchmarks/budget_run.sh "${WIKI:-scratch/budget/wiki}" /tmp/glue "$minutes" "$out" "$@" \
  > "$logs/$name-pretrain.log" 2>&1
run=$out/run-${minutes}m
cp "$run/metrics.jsonl" "$logs/$name-metrics.jsonl" 2>/dev/null  # the loss curve and throughput per log step
pids=()
for seed in 0 1; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 jaxbert finetune --task mnli --init "$run" --glue-dir /tmp/glue --config budget \
    --no-progress finetune.seed=$seed finetune.out_dir=/tmp/q/ft finetune.run_name="$name-s$seed" ${FT:-} \
    > "$logs/$name-s$seed.log" 2>&1 &
  pids+=($!)
done
if [ -n "${SIDE:-}" ]; then bash -c "$SIDE"; fi
wait "${pids[@]}"
echo "== $name: $(grep -h 'held-out MLM' "$logs/$name-pretrain.log" | tail -1)"
grep -h "tokens/s\|tokens_per" "$logs/$name-pretrain.log" | tail -1
for seed in 0 1; do echo "$name-s$seed $(grep -h 'best epoch' "$logs/$name-s$seed.log" | tail -1)"; done
