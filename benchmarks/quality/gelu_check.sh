#!/usr/bin/env bash
# Issue 17 lever 1: the loss curve of exact GELU against its tanh approximation, 3,000 steps of the budget shape
# at batch 256 on the budget corpus (prepared by rung.sh), same seed and data order; held-out MLM every 500 steps.
# usage: bash benchmarks/quality/gelu_check.sh   (logs in $LOGS/gelu-*.log)
logs=${LOGS:-/tmp/q/logs}; mkdir -p "$logs"
for act in gelu gelu_tanh; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 jaxbert pretrain --config budget --quiet --run-dir /tmp/q/gelu-$act \
    data.source=scratch/budget/wiki data.cache_dir=/tmp/jaxbert-cache train.budget_minutes=null train.steps=3000 \
    train.batch_end=256 train.eval_every=500 impl.log_every=100 model.activation=$act \
    > "$logs/gelu-$act.log" 2>&1 &
done
wait
for act in gelu gelu_tanh; do
  cp /tmp/q/gelu-$act/metrics.jsonl "$logs/gelu-$act-metrics.jsonl" 2>/dev/null  # the curves (eval every 500)
  echo "== $act"; grep -h "held-out MLM" "$logs/gelu-$act.log"
done
