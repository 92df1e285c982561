#!/usr/bin/env bash
# MNLI finetuning of one pretrained run with seeds 0 and 1 at once (finetuning is dispatch-bound: several processes
# share the GPU). Used by rung.sh after pretraining, and on its own for finetuning-only rungs of a run already there.
# usage (after `source benchmarks/finetune/device_setup.sh`):
#   bash benchmarks/quality/finetune_seeds.sh NAME RUN_DIR [finetune overrides...]
# Logs: $LOGS/NAME-s0.log, NAME-s1.log (default /tmp/q/logs); prints each seed's best epoch. FT_MEM is each
# process's share of GPU memory (default 0.2; lower it when more processes share the GPU).
set -uo pipefail
name=$1 run=$2; shift 2
logs=${LOGS:-/tmp/q/logs}; mkdir -p "$logs"
pids=()
for seed in 0 1; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=${FT_MEM:-0.2} jaxbert finetune --task mnli --init "$run" --glue-dir /tmp/glue \
    --config budget --no-progress finetune.seed=$seed finetune.out_dir=/tmp/q/ft finetune.run_name="$name-s$seed" "$@" \
    > "$logs/$name-s$seed.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
for seed in 0 1; do echo "$name-s$seed $(grep -h 'best epoch' "$logs/$name-s$seed.log" | tail -1)"; done
