#!/usr/bin/env bash
# PDL + skinny GEMM: kernel tests, the plain down_proj sweep, then the seed workload end to end over
# the switches (BATCHGEN_SKINNY, BATCHGEN_PDL, BATCHGEN_SKINNY_PREFETCH). Logs and JSON under $OUT.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || export PYTHONPATH=$PWD
timeout 150 python -m pytest -q -x tests/test_kernels_cuda.py -k "skinny or seed or fused" > "$OUT/tests.log" 2>&1; tail -3 "$OUT/tests.log"
timeout 90 python benchmarks/gemm_sweep.py --projs down_proj --no-silu --ms 32 --best "$OUT/best-down.json" > "$OUT/sweep-down.jsonl" 2>&1
grep '"M": 32, "variant": "triton"' "$OUT/sweep-down.jsonl" | head -3 | cut -c1-200; grep cublas "$OUT/sweep-down.jsonl" | cut -c1-200
ALL=qkv_proj,o_proj,gate_up_proj,down_proj
run() {  # name, env...
  local name=$1; shift
  echo "== $name $*"
  env "$@" timeout 100 python -m batchgen.cli bench --workload seed --json "$OUT/e2e-$name.jsonl" 2>&1 | tail -1 | \
    python -c "import json,sys; r=json.loads(sys.stdin.readline()); print(r['output_tok_s'], r['mean_decode_gpu_ms'], r['gpu_busy_fraction'])" 2>&1 | tail -1
}
run base BATCHGEN_SKINNY=0 BATCHGEN_PDL=0
run all-pdl-pf256 BATCHGEN_SKINNY=$ALL BATCHGEN_PDL=1 BATCHGEN_SKINNY_PREFETCH=256
run all-pdl-pf0 BATCHGEN_SKINNY=$ALL BATCHGEN_PDL=1 BATCHGEN_SKINNY_PREFETCH=0
run all-pdl-pf1024 BATCHGEN_SKINNY=$ALL BATCHGEN_PDL=1 BATCHGEN_SKINNY_PREFETCH=1024
run all-nopdl BATCHGEN_SKINNY=$ALL BATCHGEN_PDL=0
run cublas-pdl BATCHGEN_SKINNY=0 BATCHGEN_PDL=1
run all-pdl-pf256-sweptdown BATCHGEN_SKINNY=$ALL BATCHGEN_PDL=1 BATCHGEN_SKINNY_CONFIGS=$OUT/best-down.json
run base2 BATCHGEN_SKINNY=0 BATCHGEN_PDL=0
