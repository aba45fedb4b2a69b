#!/usr/bin/env bash
# Same-machine A/B of engine switches on one workload: runs the variants in turn, ROUNDS times,
# so drift hits all alike. Each variant is name or name:VAR=val+VAR=val (environment switches).
# Usage on the device: bash benchmarks/gpu_ab.sh seed 2 fused plain:BATCHGEN_FUSED_DECODE=0
# Prints output tok/s, GPU ms per decode step, decode busy, host ms per step; JSON lines in $OUT/ab-*.jsonl
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || export PYTHONPATH=$PWD
wl=$1 rounds=$2; shift 2
for i in $(seq 1 "$rounds"); do
  for variant in "$@"; do
    name=${variant%%:*}; envs=""; [[ $variant == *:* ]] && envs=${variant#*:}
    printf '%s %s-%s %s: ' "$wl" "$name" "$i" "$envs"
    env ${envs//+/ } timeout 150 python -m batchgen.cli bench --workload "$wl" --json "$OUT/ab-$wl-$name.jsonl" 2>&1 | tail -1 | \
      python -c "import json,sys; r=json.loads(sys.stdin.readline()); print(r['output_tok_s'], r['mean_decode_gpu_ms'], r['decode_gpu_busy_fraction'], r['host_ms_per_step'])" 2>&1 | tail -1
  done
done
