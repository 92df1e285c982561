#!/usr/bin/env bash
# Issue 17 lever 1: the loss curve of exact GELU against its tanh approximation, 3,000 steps of the budget shape
# at batch 256 on the budget corpus, same seed and data order; held-out MLM every 500 steps (loss_check.sh).
# usage: bash benchmarks/quality/gelu_check.sh   (logs in $LOGS/check-gelu*.log; before loss_check.sh existed
# the same runs wrote $LOGS/gelu-gelu*.log, as in quality/logs-2026-12-02b/)
exec bash "$(dirname "$0")/loss_check.sh" gelu "model.activation=gelu" gelu_tanh "model.activation=gelu_tanh"
