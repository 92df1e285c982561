#!/usr/bin/env bash
# The device command used for the recorded runs (GPU machine: wheels for omegaconf etc. carried in .whl/).
# usage: bash benchmarks/cases/device_call.sh CASES.json [--timeout S]; results go to $OUT
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import jax, jaxlib, torch, transformers; print('jax', jax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"
python3 benchmarks/throughput.py --cases "$@" --out $OUT 2>&1 | tee $OUT/log
