#!/usr/bin/env bash
# Issue 10's GPU acceptance, against a baseline checkout measured in the same call:
#   tests: the CUDA suites (overlap == sync == transformers, the CUDA stress test), then the n=8 workload of
#          benchmarks/n8_stress.py on the baseline (it stalled there) and on this tree;
#   bench: both workloads, baseline and this tree alternating, ROUNDS times (default 2);
#   constrained: issue 14's figure, the 256-request workload on the llama-3.1-8b shape with and without a JSON
#          schema on every request (same tokens), twice each, plus the constrained CUDA tests.
# Before the call, here: rm -rf gpu_old && mkdir gpu_old && git archive <base commit> batchgen | tar -x -C gpu_old
# (gpu_old/ is untracked, so it travels with the tree; delete it afterwards).
# Usage on the device: bash benchmarks/gpu_robustness.sh tests|bench|constrained; JSON lines under $OUT.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
old() { PYTHONPATH=$PWD/gpu_old "$@"; }  # the baseline package shadows the installed one
if [ "${1:-tests}" = constrained ]; then
  # llguidance is not on the device: carry its wheel (here: pip download --no-deps llguidance -d .whl; carry .whl)
  python -m pip install -q --no-deps .whl/llguidance-*.whl > "$OUT/llguidance.log" 2>&1 || echo "no llguidance wheel in .whl/"
  timeout 200 python -m pytest -q tests/test_engine_constrained.py 2>&1 | tail -3 | tee "$OUT/constrained-tests.log"
  for i in 1 2; do
    for c in none json; do
      printf 'nanovllm@8b constraint=%s-%s: ' "$c" "$i"
      timeout 200 python -m batchgen.cli bench --workload nanovllm --shape llama-3.1-8b --constraint $c \
        --json "$OUT/constrained.jsonl" 2>&1 | tail -1 | cut -c1-300
    done
  done
  exit 0
fi
[ -d gpu_old/batchgen ] || { echo "gpu_old/batchgen missing: extract the baseline first"; exit 2; }
if [ "${1:-tests}" = tests ]; then
  timeout 420 python -m pytest -q tests/test_cuda_engine.py tests/test_kernels_cuda.py tests/test_sampler.py 2>&1 \
    | tail -15 | tee "$OUT/cuda-tests.log"
  for label in new old; do
    run=""; [ $label = old ] && run=old
    $run timeout 150 python benchmarks/n8_stress.py --label $label --json "$OUT/n8.jsonl" 2>&1 | tail -1 | cut -c1-400
  done
else
  for i in $(seq 1 "${ROUNDS:-2}"); do
    for wl in seed nanovllm; do
      for label in old new; do
        run=""; [ $label = old ] && run=old
        printf '%s %s-%s: ' "$wl" "$label" "$i"
        $run timeout 150 python -m batchgen.cli bench --workload $wl --json "$OUT/bench-$label.jsonl" 2>&1 | tail -1 | \
          python -c "import json,sys; r=json.loads(sys.stdin.readline()); print(r['output_tok_s'], r['mean_decode_gpu_ms'], r['decode_gpu_busy_fraction'], r['host_ms_per_step'])" 2>&1 | tail -1
      done
    done
  done
fi
