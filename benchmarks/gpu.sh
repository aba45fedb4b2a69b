#!/usr/bin/env bash
# The GPU runner: one device call = one subcommand. benchmarks/README.md says what each measures.
#   bash benchmarks/gpu.sh tests [pytest args]         CUDA test files, then the n=8 stress workload
#   bash benchmarks/gpu.sh bench                       this tree vs ./gpu_old, both workloads, ROUNDS rounds
#   bash benchmarks/gpu.sh constrained                 256 requests on the 8B shape, JSON schema on / off
#   bash benchmarks/gpu.sh anchor|final [workload...]  batchgen vs the transformers CB anchor, same run
#   bash benchmarks/gpu.sh ab WORKLOAD ROUNDS VARIANT...  same-run A/B of switches or bench flags
#   bash benchmarks/gpu.sh fp8 | kernels|gemm|fp8gemm|pdl|profile|breakdown [args]
#   bash benchmarks/gpu.sh moe                         MoE CUDA tests, fused-MoE timings, qwen3-30b-a3b bench
# Results: JSON lines and logs under $OUT (the device tool's folder; ./gpu-out elsewhere).
set -euo pipefail

OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
CUDA_TESTS=(tests/test_cuda_engine.py tests/test_kernels_cuda.py tests/test_sampler.py)
BENCH_TIMEOUT="${BENCH_TIMEOUT:-150}"  # seconds per `batchgen bench` run (start-up and graph capture included)

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

setup() {  # install this tree (no deps: the image has them); fall back to the source tree on the path
  python -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || export PYTHONPATH="$PWD"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1 || true
}

need_baseline() {
  [[ -d gpu_old/batchgen ]] || {
    echo "gpu_old/batchgen missing: extract the baseline first (benchmarks/README.md)" >&2
    exit 2
  }
}

figures() {  # the last line of a bench run (its JSON record) -> tok/s, GPU ms/decode step, decode busy, host ms/step
  python -c 'import json,sys; r=json.loads(sys.stdin.readlines()[-1])
print(r["output_tok_s"], r["mean_decode_gpu_ms"], r["decode_gpu_busy_fraction"], r["host_ms_per_step"])'
}

bench_run() {  # JSON_FILE ENV_ASSIGNMENTS(space-free, '+'-joined or empty) BENCH_ARGS...: one run, one line
  local json=$1 envs=$2 log rc=0
  shift 2
  local -a env_args=()
  [[ -z $envs ]] || IFS='+' read -r -a env_args <<<"$envs"
  log=$(mktemp)
  env ${env_args[@]+"${env_args[@]}"} timeout "$BENCH_TIMEOUT" python -m batchgen.cli bench "$@" --json "$json" \
    >"$log" 2>&1 || rc=$?
  if [[ $rc -eq 0 ]] && figures <"$log" 2>/dev/null; then :; else
    echo "FAILED (exit $rc): $(tail -3 "$log" | tr '\n' ' ' | cut -c1-300)"
  fi
  rm -f "$log"
}

tagged_run() {  # FILE NAME SPEC BENCH_ARGS...: bench_run with SPEC = VAR=val / --flag[=val] joined by '+';
  # the record is appended to FILE with "variant": NAME (one file for all variants: few files come back)
  local file=$1 name=$2 spec=$3 tmp item envs=""
  shift 3
  local -a items=() flags=()
  [[ -z $spec ]] || IFS='+' read -r -a items <<<"$spec"
  for item in ${items[@]+"${items[@]}"}; do
    if [[ $item == --* ]]; then flags+=("$item"); else envs+="${envs:++}$item"; fi
  done
  tmp=$(mktemp -u)
  bench_run "$tmp" "$envs" "$@" ${flags[@]+"${flags[@]}"}
  [[ -f $tmp ]] || return 0
  python - "$tmp" "$file" "$name" "$spec" <<'PY'
import json, sys
src, dst, name, spec = sys.argv[1:]
with open(dst, "a") as out:
    for line in open(src):
        if line.strip():
            out.write(json.dumps({**json.loads(line), "variant": name, "switches": spec}) + "\n")
PY
  rm -f "$tmp"
}

cmd_tests() {  # the CUDA test files, then the n=8 workload that once stalled (on ./gpu_old too when it is there)
  timeout 360 python -m pytest -q "${CUDA_TESTS[@]}" "$@" 2>&1 | tee "$OUT/cuda-tests.log" | tail -15 || true
  local -a labels=(new)
  [[ -d gpu_old/batchgen ]] && labels+=(old)
  for label in "${labels[@]}"; do
    local -a pp=()
    [[ $label == old ]] && pp=("PYTHONPATH=$PWD/gpu_old")
    env ${pp[@]+"${pp[@]}"} timeout 110 python benchmarks/n8_stress.py --label "$label" --json "$OUT/n8.jsonl" 2>&1 \
      | tail -1 | cut -c1-400 || echo "n8 $label: FAILED"
  done
}

cmd_bench() {  # issue 10's same-run comparison: baseline (old) and this tree (new) alternating, ROUNDS times
  need_baseline
  local i wl label
  for i in $(seq 1 "${ROUNDS:-2}"); do
    for wl in seed nanovllm; do
      for label in old new; do
        printf '%s %s-%s: ' "$wl" "$label" "$i"
        if [[ $label == old ]]; then
          bench_run "$OUT/bench-$label.jsonl" "PYTHONPATH=$PWD/gpu_old" --workload "$wl"
        else
          bench_run "$OUT/bench-$label.jsonl" "" --workload "$wl"
        fi
      done
    done
  done
  python - "$OUT/bench-old.jsonl" "$OUT/bench-new.jsonl" <<'PY'
import json, os, statistics, sys
def mean_tok_s(path):
    by = {}
    for line in open(path) if os.path.exists(path) else []:
        r = json.loads(line)
        by.setdefault(r["workload"], []).append(r["output_tok_s"])
    return {w: statistics.mean(v) for w, v in by.items()}
old, new = map(mean_tok_s, sys.argv[1:])
for w in sorted(set(old) & set(new)):
    print(f"{w}: new {new[w]:,.0f} / old {old[w]:,.0f} output tok/s (x{new[w] / old[w]:.3f})")
PY
}

cmd_constrained() {  # issue 14's figure: every request under a JSON schema vs none, same tokens, twice each
  # llguidance is not on the device: carry its wheel in .whl/ (benchmarks/README.md)
  python -m pip install -q --no-deps .whl/llguidance-*.whl >"$OUT/llguidance.log" 2>&1 \
    || echo "no llguidance wheel in .whl/"
  timeout 200 python -m pytest -q tests/test_engine_constrained.py 2>&1 | tee "$OUT/constrained-tests.log" | tail -3 \
    || true
  local i c
  for i in 1 2; do
    for c in none json; do
      printf 'nanovllm@8b constraint=%s-%s: ' "$c" "$i"
      BENCH_TIMEOUT=200 bench_run "$OUT/constrained.jsonl" "" --workload nanovllm --shape llama-3.1-8b --constraint "$c"
    done
  done
}

cmd_anchor() {  # the committed measurement: batchgen and transformers' generate_batch on the same work, same run
  local -a workloads=("$@")
  [[ ${#workloads[@]} -gt 0 ]] || workloads=(seed nanovllm)
  local wl
  for wl in "${workloads[@]}"; do
    echo "== $wl vs transformers"
    timeout 290 python -m batchgen.cli bench --workload "$wl" --compare transformers --json "$OUT/results.jsonl" \
      2>&1 | tail -3 | cut -c1-400 || echo "FAILED"
  done
}

cmd_ab() {  # WORKLOAD ROUNDS VARIANT...: VARIANT = name or name:SPEC, SPEC = VAR=val / --flag[=val] joined by '+'
  [[ $# -ge 3 ]] || { echo "usage: gpu.sh ab WORKLOAD ROUNDS VARIANT..." >&2; exit 2; }
  local wl=$1 rounds=$2 i variant name spec
  shift 2
  for i in $(seq 1 "$rounds"); do
    for variant in "$@"; do
      name=${variant%%:*}
      spec=""
      [[ $variant == *:* ]] && spec=${variant#*:}
      printf '%s %s-%s%s: ' "$wl" "$name" "$i" "${spec:+ $spec}"
      tagged_run "$OUT/ab.jsonl" "$name" "$spec" --workload "$wl"
    done
  done
}

cmd_kernels() {  # attention and fused-op kernels against the torch backend and the copy-rate floor
  timeout 540 python benchmarks/kernels.py --out "$OUT/kernels.json" "$@" 2>&1 | tail -40 || echo "FAILED"
}

cmd_gemm() {  # skinny GEMM: its tests, the per-projection sweep, then the seed workload over the configs
  timeout 150 python -m pytest -q -x tests/test_kernels_cuda.py -k skinny 2>&1 | tail -5 | tee "$OUT/skinny-tests.log" \
    || true
  timeout 240 python benchmarks/gemm_sweep.py --shape llama-3.1-8b --ms "${SWEEP_MS:-32,16,8,1,64}" \
    --best "$OUT/best.json" >"$OUT/sweep.jsonl" 2>&1 || echo "sweep FAILED"
  sed -n '/SUMMARY/,$p' "$OUT/sweep.jsonl"
  grep '"cublas' "$OUT/sweep.jsonl" | cut -c1-200 || true
  local -a variants=("cublas:BATCHGEN_SKINNY=0" "default:")
  [[ -s $OUT/best.json ]] && variants+=("swept:BATCHGEN_SKINNY_CONFIGS=$OUT/best.json")
  cmd_ab seed 1 "${variants[@]}"
}

cmd_fp8gemm() {  # the FP8 decode GEMM: its CUDA tests, the seed workload bf16 / W8A8 / W8A16 / _scaled_mm, the sweep
  timeout 200 python -m pytest -q -x tests/test_fp8_decode_kernel.py tests/test_quant_fp8.py 2>&1 | tail -8 \
    | tee "$OUT/fp8-tests.log" || true
  cmd_ab seed 1 ${FP8_VARIANTS:-"bf16:" "w8a8:--quantization=fp8" "w8a16:--quantization=fp8+BATCHGEN_FP8_DECODE_ACT=bf16" \
    "scaled_mm:--quantization=fp8+BATCHGEN_FP8_SKINNY=0"}
  timeout "${SWEEP_S:-200}" python benchmarks/fp8_gemm_sweep.py --shape llama-3.1-8b --ms "${SWEEP_MS:-32,8}" --acts "${SWEEP_ACTS:-0,1}" \
    --best "$OUT/fp8_best.json" >"$OUT/fp8_sweep.jsonl" 2>&1 || echo "sweep stopped (timeout or error)"
  grep -v '"skip"' "$OUT/fp8_sweep.jsonl" | cut -c1-220 | tail -60
}

cmd_fp8() {  # issue 13's figures: seed bf16 / fp8 / fp8 + fp8 KV, then the long workloads (FP8_SEED=0 skips seed;
  # LONG_VARIANTS="bf16: fp8-kv:..." measures bf16 there too, in the same run)
  local wl v
  [[ ${FP8_SEED:-1} == 0 ]] || cmd_ab seed 1 "bf16:" "fp8:--quantization=fp8" "fp8-kv:--quantization=fp8+--kv-cache-dtype=fp8"
  for wl in ${FP8_LONG:-isl128-osl2048:352 isl1000-osl1000:384}; do
    for v in ${LONG_VARIANTS:-"fp8-kv:--quantization=fp8+--kv-cache-dtype=fp8"}; do
      printf '%s %s max_num_seqs %s: ' "${wl%%:*}" "${v%%:*}" "${wl#*:}"
      BENCH_TIMEOUT=${LONG_TIMEOUT:-420} tagged_run "$OUT/ab.jsonl" "${v%%:*}" "${v#*:}" \
        --workload "${wl%%:*}" --max-num-seqs "${wl#*:}"
    done
  done
}

cmd_pdl() {  # programmatic dependent launch: the kernel-chain check, then the seed workload with PDL / prefetch off
  timeout 120 python benchmarks/pdl_check.py >"$OUT/pdl.jsonl" 2>&1 || echo "pdl_check FAILED"
  cut -c1-200 "$OUT/pdl.jsonl"
  cmd_ab seed "${ROUNDS:-1}" "base:BATCHGEN_SKINNY=0+BATCHGEN_PDL=0" "no-pdl:BATCHGEN_PDL=0" \
    "no-prefetch:BATCHGEN_SKINNY_PREFETCH=0" "default:"
}

cmd_profile() {  # torch-profiler kernel breakdown of decode steps (8B shape, 32 sequences of 768 tokens)
  timeout 240 python benchmarks/profile_decode.py --shape llama-3.1-8b --batch 32 --context 768 "$@" 2>&1 \
    | tail -30 | tee "$OUT/profile.txt" || echo "FAILED"
}

cmd_breakdown() {  # where decode steps go: attention by KV dtype, eager steps by part (CUDA events), big-M GEMMs
  timeout "${ATTN_S:-150}" python benchmarks/step_breakdown.py attention --cases "${ATTN_CASES:-32x768,352x1100}" \
    >"$OUT/attention.jsonl" 2>&1 || echo "attention stopped (timeout or error)"
  cut -c1-200 "$OUT/attention.jsonl"
  local v
  for v in ${BREAKDOWN_VARIANTS:-"352:1100:--quantization=fp8+--kv-cache-dtype=fp8" "352:1100:" "32:768:--quantization=fp8+--kv-cache-dtype=fp8"}; do
    IFS=: read -r b c flags <<<"$v"
    timeout "${BREAKDOWN_S:-150}" python benchmarks/step_breakdown.py engine --batch "$b" --context "$c" ${flags//+/ } \
      >>"$OUT/breakdown.jsonl" 2>"$OUT/breakdown.err" || { echo "breakdown $v FAILED"; tail -3 "$OUT/breakdown.err"; }
  done
  cut -c1-900 "$OUT/breakdown.jsonl"
  [[ -z ${GEMM_MS:-352,128} ]] || timeout "${GEMM_S:-120}" python benchmarks/fp8_gemm_sweep.py --shape llama-3.1-8b \
    --ms "${GEMM_MS:-352,128}" --acts 2 >"$OUT/gemm_bigm.jsonl" 2>&1 || echo "gemm stopped (timeout or error)"
  grep -v '"skip"' "$OUT/gemm_bigm.jsonl" 2>/dev/null | cut -c1-200
}

cmd_moe() {  # issue 15: the MoE CUDA tests, the fused MoE per layer against its bytes, the 30B-A3B shape's bench
  timeout 200 python -m pytest -q tests/test_fused_moe.py tests/test_model_moe.py tests/test_run_dry_run.py -k \
    "cuda or graph" 2>&1 | tail -12 | tee "$OUT/moe-tests.log" || true
  timeout 120 python benchmarks/moe_sweep.py --ts "${MOE_TS:-1,32,64,128,256}" ${MOE_SWEEP:+--sweep} \
    >"$OUT/moe_sweep.jsonl" 2>&1 || echo "moe_sweep stopped (timeout or error)"
  grep -v '"sweep"' "$OUT/moe_sweep.jsonl" | cut -c1-240 | tail -20
  local wl
  for wl in ${MOE_WORKLOADS:-nanovllm seed}; do
    printf 'qwen3-30b-a3b %s: ' "$wl"
    BENCH_TIMEOUT=${MOE_TIMEOUT:-240} bench_run "$OUT/moe-bench.jsonl" "" --workload "$wl" --shape qwen3-30b-a3b
  done
  python -c 'import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l); print(r["workload"], r["output_tok_s"], r["mean_decode_gpu_ms"], json.dumps(r.get("decode_floor")))' \
    "$OUT/moe-bench.jsonl" 2>/dev/null || true
}

what=${1:-help}
[[ $# -gt 0 ]] && shift
case $what in
  tests | bench | constrained | anchor | ab | kernels | gemm | fp8gemm | fp8 | pdl | profile | moe | breakdown)
    setup
    "cmd_$what" "$@"
    ;;
  final)
    setup
    cmd_anchor "$@"
    ;;
  help | -h | --help)
    usage
    ;;
  *)
    usage >&2
    exit 2
    ;;
esac
