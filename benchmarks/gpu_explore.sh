#!/usr/bin/env bash
# Block-size / overlap exploration on the GPU (no anchor). Logs under $OUT.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || export PYTHONPATH=$PWD
for args in "--workload seed --block-size 16" "--workload seed --block-size 32" "--workload seed --block-size 64" \
            "--workload nanovllm --block-size 16" "--workload nanovllm --block-size 32" \
            "--workload seed --block-size 32 --no-overlap"; do
  timeout 150 python -m batchgen.cli bench $args --json "$OUT/explore.jsonl" 2>&1 | tail -2 | cut -c1-2000
done
python - "$OUT/explore.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print(r["workload"], "bs", r["block_size"], "ovl", r["overlap"], "tok/s", r["output_tok_s"], "step", r["mean_decode_step_ms"], "gpu", r["mean_decode_gpu_ms"], "busy", r["decode_gpu_busy_fraction"], "host", r["host_ms_per_step"], "s", r["seconds"])
PY
