#!/usr/bin/env bash
# One device call: install, CUDA tests, then benchmark runs. Logs under $OUT (device tool) or ./gpu-out.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
MODE=${1:-quick}
if [ "$MODE" = quick ] || [ "$MODE" = tests ]; then
  timeout 240 python -m pytest -q -x tests/test_cuda_engine.py tests/test_kernels_cuda.py 2>&1 | tail -40 | tee "$OUT/cuda-tests.log"
fi
if [ "$MODE" = quick ] || [ "$MODE" = bench ]; then
  for wl in nanovllm seed; do
    timeout 200 python -m batchgen.cli bench --workload $wl --json "$OUT/bench.jsonl" 2>&1 | tail -5
    timeout 200 python -m batchgen.cli bench --workload $wl --no-overlap --json "$OUT/bench.jsonl" 2>&1 | tail -3
  done
fi
if [ "$MODE" = anchor ]; then
  for wl in nanovllm seed; do
    timeout 280 python -m batchgen.cli bench --workload $wl --compare transformers --json "$OUT/bench.jsonl" 2>&1 | tail -5
  done
fi
