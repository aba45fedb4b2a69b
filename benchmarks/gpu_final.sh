#!/usr/bin/env bash
# The committed measurement: batchgen (overlap on, then the --no-overlap ablation) and the
# transformers continuous-batching anchor, same workload, same process family, one GPU.
# Usage on the device: bash benchmarks/gpu_final.sh [tests|bench]; JSON lines in $OUT/results.jsonl
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
if [ "${1:-bench}" = tests ]; then
  timeout 400 python -m pytest -q tests/test_cuda_engine.py tests/test_kernels_cuda.py tests/test_sampler.py 2>&1 | tail -15 | tee "$OUT/cuda-tests.log"
  for wl in nanovllm seed; do
    timeout 120 python -m batchgen.cli bench --workload $wl --no-overlap --json "$OUT/results.jsonl" 2>&1 | tail -1 | cut -c1-300
  done
else
  for wl in seed nanovllm; do
    timeout 290 python -m batchgen.cli bench --workload $wl --compare transformers --json "$OUT/results.jsonl" 2>&1 | tail -3 | cut -c1-400
  done
fi
