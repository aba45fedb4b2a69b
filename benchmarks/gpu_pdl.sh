#!/usr/bin/env bash
# PDL + skinny GEMM: kernel tests, the plain down_proj sweep, then the seed workload end to end over
# the switches (BATCHGEN_SKINNY, BATCHGEN_PDL, BATCHGEN_SKINNY_PREFETCH). Logs and JSON under $OUT.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || export PYTHONPATH=$PWD
: tests skipped this round


ALL=qkv_proj,o_proj,gate_up_proj,down_proj
run() {  # name, env...
  local name=$1; shift
  echo "== $name $*"
  env "$@" timeout 100 python -m batchgen.cli bench --workload seed --json "$OUT/e2e-$name.jsonl" 2>&1 | tail -1 | \
    python -c "import json,sys; r=json.loads(sys.stdin.readline()); print(r['output_tok_s'], r['mean_decode_gpu_ms'], r['gpu_busy_fraction'])" 2>&1 | tail -1
}








run base BATCHGEN_SKINNY=0 BATCHGEN_PDL=0
run all-nopdl BATCHGEN_SKINNY=$ALL BATCHGEN_PDL=0
run all-pdl-pf0 BATCHGEN_SKINNY=$ALL BATCHGEN_PDL=1 BATCHGEN_SKINNY_PREFETCH=0
run all-pdl-pf256 BATCHGEN_SKINNY=$ALL BATCHGEN_PDL=1 BATCHGEN_SKINNY_PREFETCH=256
run attn-pdl-pf0 BATCHGEN_SKINNY=qkv_proj,o_proj BATCHGEN_PDL=1 BATCHGEN_SKINNY_PREFETCH=0
run qkv-pdl-pf256 BATCHGEN_SKINNY=qkv_proj,gate_up_proj BATCHGEN_PDL=1 BATCHGEN_SKINNY_PREFETCH=256
run base2 BATCHGEN_SKINNY=0 BATCHGEN_PDL=0
