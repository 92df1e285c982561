#!/usr/bin/env bash
# The budget run on one GPU: tokenizer + data preparation, pretraining on a time budget, GLUE finetuning.
# usage: bash benchmarks/budget_run.sh WIKI_DIR GLUE_DIR BUDGET_MINUTES OUT_DIR [overrides for prepare and pretrain...]
# (benchmarks/budget_run.md records the device command that carried the data and wheels.)
set -euo pipefail
wiki=$1 glue=$2 minutes=$3 out=$4; shift 4
mkdir -p "$out"
export PYTHONUNBUFFERED=1
stamp() { date -u +%H:%M:%S; }
timer=(); [ -x /usr/bin/time ] && timer=(/usr/bin/time -v)
tasks=${GLUE_TASKS:-mnli,rte,mrpc,stsb,cola,sst2,wnli,qnli,qqp}  # MNLI first: it matters most
glue_timeout=${GLUE_TIMEOUT:-0}  # seconds for all GLUE tasks (0: no limit)
echo "[$(stamp)] prepare: tokenizer + token stream from $wiki"
"${timer[@]}" jaxbert prepare --config budget --quiet data.source="$wiki" data.cache_dir=/tmp/jaxbert-cache "$@" \
  2> >(tee "$out/prepare.time" >&2) | tee "$out/prepare.log"
echo "[$(stamp)] pretrain: budget $minutes minutes"
jaxbert pretrain --config budget --quiet --run-dir "$out/run-${minutes}m" data.source="$wiki" \
  data.cache_dir=/tmp/jaxbert-cache train.budget_minutes="$minutes" train.run_name="budget-${minutes}m" "$@" \
  2>&1 | tee "$out/pretrain.log"
echo "[$(stamp)] glue: every task in $glue"
timeout "$glue_timeout" jaxbert glue --tasks "$tasks" --init "$out/run-${minutes}m" --glue-dir "$glue" --config budget --no-progress \
  finetune.out_dir="$out/glue-${minutes}m" 2>&1 | tee "$out/glue.log"
echo "[$(stamp)] done"
