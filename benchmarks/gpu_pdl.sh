#!/usr/bin/env bash
# PDL + skinny GEMM ablation on the seed workload: an o_proj config sweep (BN 32/64), then the
# workload end to end over the switches (BATCHGEN_SKINNY, BATCHGEN_PDL, BATCHGEN_SKINNY_PREFETCH).
# Usage on the device: bash benchmarks/gpu_pdl.sh; logs and JSON under $OUT.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || export PYTHONPATH=$PWD
BATCHGEN_PDL=0 timeout 100 python benchmarks/gemm_sweep.py --projs o_proj --ms 32 --bns 32,64 --stages 4,6 \
  --best "$OUT/best-o.json" > "$OUT/sweep-o.jsonl" 2>&1
grep -E '"variant": "(triton|cublas)"' "$OUT/sweep-o.jsonl" | head -4 | cut -c1-200
run() {  # name, env...
  local name=$1; shift
  echo "== $name $*"
  env "$@" timeout 100 python -m batchgen.cli bench --workload seed --json "$OUT/e2e-$name.jsonl" 2>&1 | tail -1 | \
    python -c "import json,sys; r=json.loads(sys.stdin.readline()); print(r['output_tok_s'], r['mean_decode_gpu_ms'], r['gpu_busy_fraction'])" 2>&1 | tail -1
}
run base BATCHGEN_SKINNY=0 BATCHGEN_PDL=0
run qkv-gu BATCHGEN_SKINNY=qkv_proj,gate_up_proj
run qkv-gu-o BATCHGEN_SKINNY=qkv_proj,gate_up_proj,o_proj BATCHGEN_SKINNY_CONFIGS=$OUT/best-o.json
run qkv-gu-pf128 BATCHGEN_SKINNY=qkv_proj,gate_up_proj BATCHGEN_SKINNY_PREFETCH=128
run qkv-gu-2 BATCHGEN_SKINNY=qkv_proj,gate_up_proj
run base2 BATCHGEN_SKINNY=0 BATCHGEN_PDL=0
