"""down_proj's input above decode size: SiLU-and-mul then the per-token FP8 quantize (two kernels, the [M, I]
bf16 product written and read back) against fp8_quant.act_and_mul_quantize_fp8 (one), CUDA-graph replays over
enough copies of gate_up's output to stay out of L2. One JSON line per (M, variant).

    python benchmarks/act_quant_bench.py --ms 352,1024 --inter 14336
"""
from __future__ import annotations

import argparse
import json

import torch

from batchgen.engine import fused_ops
from batchgen.engine.kernels.fp8_quant import act_and_mul_quantize_fp8, quantize_fp8
from gemm_sweep import time_graph


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="352,1024")
    ap.add_argument("--inter", type=int, default=14336)
    a = ap.parse_args()
    I = a.inter
    for M in (int(m) for m in a.ms.split(",")):
        copies = max(2, -(-200_000_000 // (M * 2 * I * 2)))
        xs = [torch.randn(M, 2 * I, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        nbytes = M * 2 * I * 2 + M * I  # gate_up read, codes written
        variants = {"silu_and_mul+quantize_fp8": lambda i: quantize_fp8(fused_ops.silu_and_mul(xs[i]), per_group=False)}
        for w in (4, 8, 16):
            variants[f"act_and_mul_quantize_fp8[w{w}]"] = lambda i, w=w: act_and_mul_quantize_fp8(xs[i], num_warps=w)
        for name, fn in variants.items():
            us = time_graph(fn, copies)
            print(json.dumps({"what": "act_quant", "M": M, "I": I, "variant": name, "us": round(us, 2),
                              "TBps": round(nbytes / us / 1e6, 3)}), flush=True)
        del xs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
