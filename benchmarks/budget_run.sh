#!/usr/bin/env bash
# The budget run on one GPU: tokenizer + data preparation, pretraining on a time budget, GLUE finetuning.
# usage: bash benchmarks/budget_run.sh WIKI_DIR GLUE_DIR BUDGET_MINUTES OUT_DIR [overrides for prepare and pretrain...]
# (benchmarks/budget_run.md records the device commands that carried the data and wheels.)
#
# Safe to run again after a stop: preparation reuses its cache, a pretraining run with a checkpoint in
# OUT_DIR is resumed (the time budget continues where it stopped), so a budget longer than one device call
# is covered by repeating the same command on the same (warm) machine. Set PRETRAIN_TIMEOUT (seconds) to stop
# pretraining with SIGTERM, which saves a checkpoint, before a call's limit.
# GLUE: `jaxbert glue --all`, which finetunes several tasks at once on the one GPU (--jobs, default 4 there);
# GLUE_JOBS sets --jobs, SKIP_GLUE=1 stops after pretraining.
# WIKI_DIR may also be a prepared directory (meta.json, train.bin, validation.bin, tokenizer.json; made by
# `jaxbert prepare`, e.g. the one benchmarks/quality/fullwiki_unpack.sh unpacks): preparation is then skipped and
# pretraining reads it as it is (its data and tokenizer settings are those it was prepared with).
set -euo pipefail
wiki=$1 glue=$2 minutes=$3 out=$4; shift 4
mkdir -p "$out"
export PYTHONUNBUFFERED=1
stamp() { date -u +%H:%M:%S; }
timer=(); [ -x /usr/bin/time ] && timer=(/usr/bin/time -v)
glue_timeout=${GLUE_TIMEOUT:-0}  # seconds for all GLUE tasks (0: no limit)
pretrain_timeout=${PRETRAIN_TIMEOUT:-0}
run="$out/run-${minutes}m"
if [ -f "$wiki/meta.json" ]; then
  echo "[$(stamp)] prepared data: $wiki (no preparation)"
else
  echo "[$(stamp)] prepare: tokenizer + token stream from $wiki"
  "${timer[@]}" jaxbert prepare --config budget --quiet data.source="$wiki" data.cache_dir=/tmp/jaxbert-cache "$@" \
    2> >(tee -a "$out/prepare.time" >&2) | tee -a "$out/prepare.log"
fi
if [ -d "$run/checkpoints" ] && [ -n "$(ls -A "$run/checkpoints")" ]; then
  echo "[$(stamp)] pretrain: resuming $run"
  cmd=(jaxbert pretrain --resume --quiet --run-dir "$run")
else
  echo "[$(stamp)] pretrain: budget $minutes minutes"
  cmd=(jaxbert pretrain --config budget --quiet --run-dir "$run" data.source="$wiki" data.cache_dir=/tmp/jaxbert-cache
       train.budget_minutes="$minutes" train.run_name="budget-${minutes}m" "$@")
fi
timeout -k 60 -s TERM "$pretrain_timeout" "${cmd[@]}" 2>&1 | tee -a "$out/pretrain.log" || true
if tail -n 1 "$out/pretrain.log" | grep -q "continue with"; then
  echo "[$(stamp)] pretraining stopped before its budget: run this command again to continue it"
  exit 0
fi
if [ "${SKIP_GLUE:-0}" = 1 ]; then
  echo "[$(stamp)] done (SKIP_GLUE=1)"
  exit 0
fi
echo "[$(stamp)] glue: every task found in $glue"
start=$(date +%s)
timeout "$glue_timeout" jaxbert glue --all --jobs "${GLUE_JOBS:-0}" --init "$run" --glue-dir "$glue" --config budget \
  --no-progress finetune.out_dir="$out" finetune.run_name="glue-${minutes}m" 2>&1 | tee "$out/glue-${minutes}m.log" || true
echo "[$(stamp)] done: glue took $(( $(date +%s) - start )) s"
