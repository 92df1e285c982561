#!/usr/bin/env bash
# One rung of the quality ladder on the GPU: pretrain on the budget corpus for MINUTES with the given overrides,
# then finetune MNLI with seeds 0 and 1 at once (finetuning is dispatch-bound: two processes share the GPU).
# usage (after `source benchmarks/finetune/device_setup.sh`):
#   bash benchmarks/quality/rung.sh NAME MINUTES [pretraining overrides...]
# FT="finetune overrides" adds finetuning overrides (benchmarks/quality/finetune_seeds.sh; FT_MEM: each seed's
# share of GPU memory); SIDE="command" runs alongside the finetuning (never alongside the timed pretraining). Logs: $LOGS/NAME-*.log (default /tmp/q/logs); the last lines are the
# held-out MLM accuracy, the last row of benchmarks/quality/gap.py (passes, held-out minus training loss) and each
# seed's best MNLI epoch.
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
bash benchmarks/quality/finetune_seeds.sh "$name" "$run" ${FT:-} > "$logs/$name-ft.txt" &
ft=$!
if [ -n "${SIDE:-}" ]; then bash -c "$SIDE"; fi
wait $ft
echo "== $name: $(grep -h 'held-out MLM' "$logs/$name-pretrain.log" | tail -1)"
grep -h "tokens/s\|tokens_per" "$logs/$name-pretrain.log" | tail -1
corpus=$(grep -ohm1 'train [0-9,]* tokens' "$logs/$name-pretrain.log" | tr -dc 0-9)  # one pass over the corpus
if [ -n "$corpus" ]; then  # memorisation at the end: held-out minus training loss, passes read
  python3 benchmarks/quality/gap.py --tokens "$corpus" "$logs/$name-metrics.jsonl" | tail -1
fi
cat "$logs/$name-ft.txt"
