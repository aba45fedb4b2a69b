#!/usr/bin/env bash
# Skinny GEMM on the GPU: kernel tests, the per-projection sweep, then the seed workload end to end
# with the Triton path off / default configs / swept configs / + fused SiLU down projection.
# Usage on the device: bash benchmarks/gpu_gemm.sh; logs and JSON under $OUT.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || export PYTHONPATH=$PWD
timeout 150 python -m pytest -q -x tests/test_kernels_cuda.py -k "skinny" 2>&1 | tail -5 | tee "$OUT/skinny-tests.log"
timeout 240 python benchmarks/gemm_sweep.py --shape llama-3.1-8b --ms ${SWEEP_MS:-32,16,8,1,64} --best "$OUT/best.json" > "$OUT/sweep.jsonl" 2>&1
sed -n '/SUMMARY/,$p' "$OUT/sweep.jsonl"; grep '"cublas' "$OUT/sweep.jsonl" | cut -c1-200
for v in 0 default best best-silu; do
  case $v in
    0) env="BATCHGEN_SKINNY=0" ;;
    default) env="" ;;
    best) env="BATCHGEN_SKINNY_CONFIGS=$OUT/best.json" ;;
    best-silu) env="BATCHGEN_SKINNY_CONFIGS=$OUT/best.json BATCHGEN_SKINNY=qkv_proj,o_proj,down_proj" ;;
  esac
  echo "== $v"
  env $env timeout 120 python -m batchgen.cli bench --workload seed --json "$OUT/e2e-$v.jsonl" 2>&1 | tail -1 | cut -c1-400
done
