#!/usr/bin/env bash
# Same-machine A/B for the open questions of notes/KERNELS.md (2026-11-27 session 2): PDL on the
# nanovllm workload, and the skinny GEMM on seed. Alternates variants so drift hits both alike.
# Usage on the device: bash benchmarks/gpu_ab.sh; JSON lines under $OUT/ab-*.jsonl
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || export PYTHONPATH=$PWD
run() {  # workload name env...
  local wl=$1 name=$2; shift 2
  echo "== $wl $name $*"
  env "$@" timeout 120 python -m batchgen.cli bench --workload "$wl" --json "$OUT/ab-$wl-$name.jsonl" 2>&1 | tail -1 | \
    python -c "import json,sys; r=json.loads(sys.stdin.readline()); print(r['output_tok_s'], r['mean_decode_gpu_ms'], r['decode_gpu_busy_fraction'], r['host_ms_per_step'])" 2>&1 | tail -1
}
for i in 1 2; do
  run nanovllm pdl-on-$i
  run nanovllm pdl-off-$i BATCHGEN_PDL=0
  run seed default-$i
  run seed cublas-nopdl-$i BATCHGEN_SKINNY=0 BATCHGEN_PDL=0
done
