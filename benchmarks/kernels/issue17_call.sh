#!/usr/bin/env bash
# One device call for issue 17 (throughput II): the kernels against their XLA references, then every lever as a
# case of benchmarks/throughput.py in one run, with the code before this work and the HF torch.compile peer.
# Carry .whl (omegaconf) and scratch/old-src (`git archive <before> src`). Results under $OUT.
#   bash benchmarks/kernels/issue17_call.sh [seconds for the throughput suite, default 430]
set -uo pipefail
out=${OUT:-/tmp/issue17}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/device.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$out/device.txt" 2>&1
# correctness side by side (three processes share the GPU: their timings are indicative only)
XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 timeout 110 python3 benchmarks/kernels/check_norm.py --no-sweep --iters 20 \
  > "$out/check_norm.log" 2>&1 &
XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 timeout 110 python3 benchmarks/kernels/check_attention.py \
  --shapes 256,128,12,64 --repeats 10 > "$out/check_attention.log" 2>&1 &
XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 timeout 110 python3 benchmarks/kernels/fp8_delayed.py --runs 10 \
  > "$out/check_fp8_delayed.log" 2>&1 &
wait
timeout "${1:-430}" python3 benchmarks/throughput.py --cases benchmarks/cases/issue17.json --out "$out/tp" \
  --timeout 100 > "$out/throughput.log" 2>&1
echo "throughput rc $?" >> "$out/throughput.log"
cd "$out" && tar czf tp.tgz tp && rm -rf tp
