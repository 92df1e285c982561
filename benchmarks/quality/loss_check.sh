#!/usr/bin/env bash
# Loss at equal steps for speed options that should not change results much: 3,000 steps of the budget shape at
# batch 256 on the budget corpus, same seed and data order, held-out MLM every 500 steps; up to four runs share
# the GPU at once (memory fraction CHECK_MEM each, default 0.2). Prepares the corpus first (cache /tmp/jaxbert-cache,
# as rung.sh) unless WIKI is a prepared directory (meta.json, train.bin, ...), e.g. /tmp/fullwiki/prepared.
# usage: bash benchmarks/quality/loss_check.sh NAME "overrides" [NAME "overrides" ...]   (logs in $LOGS)
# e.g.   bash benchmarks/quality/loss_check.sh ref "" bf16logits "train.mlm_logits=compute"
logs=${LOGS:-/tmp/q/logs}; mkdir -p "$logs"
wiki=${WIKI:-scratch/budget/wiki}
data="data.source=$wiki data.cache_dir=/tmp/jaxbert-cache"
if [ ! -f "$wiki/meta.json" ]; then
  jaxbert prepare --config budget --quiet $data > "$logs/check-prepare.log" 2>&1 || { cat "$logs/check-prepare.log"; exit 1; }
fi
names=()
while [ $# -ge 2 ]; do
  name=$1; overrides=$2; shift 2; names+=("$name")
  XLA_PYTHON_CLIENT_MEM_FRACTION=${CHECK_MEM:-0.2} jaxbert pretrain --config budget --quiet --run-dir "/tmp/q/check-$name" $data \
    train.budget_minutes=null train.steps=3000 train.batch_end=256 train.eval_every=500 impl.log_every=100 \
    $overrides > "$logs/check-$name.log" 2>&1 &
done
wait
for name in "${names[@]}"; do
  cp "/tmp/q/check-$name/metrics.jsonl" "$logs/check-$name-metrics.jsonl" 2>/dev/null
  echo "== $name"; grep -h "held-out MLM" "$logs/check-$name.log" | tail -n 7
done
