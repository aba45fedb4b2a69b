"""The decode fusions of one llama-3.1-8b layer, piece by piece, against the kernels they replace.

M=32 rows, bf16, weights cycled over copies (cold L2), CUDA-graph replay (gemm_sweep.time_graph).
(The RMSNorm-inside-the-GEMM variants measured 2.4-3x slower and were removed from the kernel.)
Prints one JSON line per variant: us per call.

    python benchmarks/fused_check.py [--copies 6]
"""
from __future__ import annotations

import argparse
import json

import torch

from batchgen.engine.kernels import fused
from batchgen.engine.kernels.skinny_gemm import skinny_gemm
from gemm_sweep import time_graph  # run as python benchmarks/fused_check.py

QKV, GU, O, DOWN = (64, 128, 1, 4, 5), (256, 64, 1, 4, 3), (32, 256, 1, 4, 4), (64, 128, 2, 4, 5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--gated-configs", default="256,64,1,4,3;256,64,1,4,4;512,64,1,8,3")
    args = ap.parse_args()
    dev, dt, M, H, F = "cuda", torch.bfloat16, 32, 4096, 14336
    n = args.copies
    w = {name: [torch.randn(k, nn, device=dev, dtype=dt) / k ** 0.5 for _ in range(n)]
         for name, (k, nn) in {"qkv": (H, 6144), "gu": (H, 2 * F), "o": (H, H), "down": (F, H)}.items()}
    g = torch.ones(H, device=dev, dtype=dt)
    x = torch.randn(M, H, device=dev, dtype=dt)
    h = torch.randn(M, H, device=dev, dtype=dt)
    act = torch.randn(M, F, device=dev, dtype=dt)

    def report(name: str, fn) -> None:
        print(json.dumps({"variant": name, "us": round(time_graph(fn, n), 2)}), flush=True)

    report("qkv: rms_norm + skinny", lambda i: skinny_gemm(fused.rms_norm(x, g, 1e-5, None, dt), w["qkv"][i], config=QKV))
    report("qkv: skinny alone", lambda i: skinny_gemm(x, w["qkv"][i], config=QKV))
    report("gate_up: rms_norm + skinny + silu", lambda i: fused.silu_and_mul(
        skinny_gemm(fused.rms_norm(x, g, 1e-5, None, dt), w["gu"][i], config=GU)))
    report("gate_up: rms_norm + skinny gated", lambda i: skinny_gemm(
        fused.rms_norm(x, g, 1e-5, None, dt), w["gu"][i], gated=True, config=GU))
    report("gate_up: skinny alone", lambda i: skinny_gemm(x, w["gu"][i], config=GU))
    for c in args.gated_configs.split(";"):
        cfg = tuple(map(int, c.split(",")))
        report(f"gate_up: skinny gated {cfg}", lambda i, cfg=cfg: skinny_gemm(x, w["gu"][i], gated=True, config=cfg))
    for name, a, cfg in (("o", x, O), ("down", act, DOWN)):
        report(f"{name}: cuBLAS mm", lambda i, a=a, name=name: a @ w[name][i])
        report(f"{name}: cuBLAS mm + add", lambda i, a=a, name=name: h + a @ w[name][i])
        report(f"{name}: cuBLAS addmm_", lambda i, a=a, name=name: h.addmm_(a, w[name][i]))
        report(f"{name}: cuBLAS addmm", lambda i, a=a, name=name: torch.addmm(h, a, w[name][i]))
        report(f"{name}: skinny", lambda i, a=a, name=name, cfg=cfg: skinny_gemm(a, w[name][i], config=cfg))
        report(f"{name}: skinny residual", lambda i, a=a, name=name, cfg=cfg: skinny_gemm(
            a, w[name][i], residual=h, out=h, config=cfg))


if __name__ == "__main__":
    main()
