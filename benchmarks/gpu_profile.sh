#!/usr/bin/env bash
# Decode-step kernel breakdown (8B shape) and KV layout A/B on the seed workload. Logs under $OUT.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || export PYTHONPATH=$PWD
for wl in ${WEIGHTS:-in out}; do export BATCHGEN_WEIGHT_LAYOUT=$wl; echo "== weights $wl"
for layout in ${LAYOUTS:-hnd nhd}; do
  BATCHGEN_KV_LAYOUT=$layout timeout 120 python benchmarks/profile_decode.py --shape llama-3.1-8b --batch 32 --context 768 2>&1 | tail -26 > "$OUT/profile-$layout.txt"
  head -22 "$OUT/profile-$layout.txt"
  [ "${1:-}" = profile-only ] || BATCHGEN_KV_LAYOUT=$layout timeout 150 python -m batchgen.cli bench --workload seed --json "$OUT/layout.jsonl" 2>&1 | tail -1 | cut -c1-600
done
done
