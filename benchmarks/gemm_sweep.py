"""Decode-size GEMMs on the GPU: cuBLAS (x @ W, W input-major) against the Triton skinny GEMM.

For each projection of a named shape, every weight is cycled over enough copies that they do not
stay in L2 (as in a real forward, where each layer has its own), timed as CUDA-graph replays.
Prints one JSON line per (projection, M, variant) and writes the best Triton config per (K, N) at
M=32 to --best (the format BATCHGEN_SKINNY_CONFIGS reads), plus a summary table.

    python benchmarks/gemm_sweep.py --shape llama-3.1-8b --best best.json
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from batchgen.engine.kernels import fused
from batchgen.engine.kernels.skinny_gemm import default_config, skinny_gemm

SHAPES = {  # hidden, inter, q_heads, kv_heads, head_dim
    "llama-3.1-8b": (4096, 14336, 32, 8, 128),
    "qwen3-0.6b": (1024, 3072, 16, 8, 128),
}


def projections(shape: str) -> dict[str, tuple[int, int]]:
    h, f, qh, kvh, hd = SHAPES[shape]
    return {"qkv_proj": (h, (qh + 2 * kvh) * hd), "o_proj": (qh * hd, h), "gate_up_proj": (h, 2 * f),
            "down_proj": (f, h)}


def graph_us(fn, n_inner: int, reps: int = 20) -> float:
    """us per inner call: fn() (making n_inner calls) captured once in a CUDA graph, replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1000 / reps / n_inner


def time_graph(fn, copies: int) -> float:
    """us per call of fn(i), one call per weight copy i in the graph."""
    def all_copies():
        for i in range(copies):
            fn(i)
    return graph_us(all_copies, copies)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--ms", default="1,8,16,32,64")
    ap.add_argument("--best", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--projs", default="qkv_proj,o_proj,gate_up_proj,down_proj")
    ap.add_argument("--bns", default="64,128,256")
    ap.add_argument("--stages", default="3,5")
    ap.add_argument("--no-silu", action="store_true", help="down_proj without the fused SiLU-and-mul")
    return ap.parse_args()


def _emit(rec: dict) -> dict:
    print(json.dumps(rec), flush=True)
    return rec


def _time_cublas(args, name, K, N, M, xin, ws, silu, copies, rows) -> float:
    """cuBLAS on the same GEMM (with the SiLU-and-mul kernel before it for down_proj), recorded in rows."""
    mb = K * N * 2 / 1e6

    def cublas(i):
        return (fused.silu_and_mul(xin) if silu else xin) @ ws[i]

    t_cublas = time_graph(cublas, copies)
    rec = {"shape": args.shape, "proj": name, "K": K, "N": N, "M": M, "variant": "cublas" + ("+silu" if silu else ""),
           "us": round(t_cublas, 2), "TBps": round(mb / t_cublas, 3)}
    rows.append(_emit(rec))
    if silu:
        t_plain = time_graph(lambda i: xin[:, :K] @ ws[i], copies)  # the GEMM alone
        rows.append(_emit({**rec, "variant": "cublas", "us": round(t_plain, 2)}))
    return t_cublas


def _time_configs(name, M, xin, ws, ref, silu, copies, K, cands) -> list[tuple[float, tuple]]:
    """(us, config) of every candidate that runs and is accurate, fastest first."""
    results = []
    for cfg in dict.fromkeys(map(tuple, cands)):
        BN, BK, split, warps, stages = cfg
        if split > 1 and K // split < BK:
            continue
        try:
            y = skinny_gemm(xin, ws[0], silu_mul=silu, config=cfg)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                _emit({"proj": name, "M": M, "cfg": cfg, "error": err})
                continue
            t = time_graph(lambda i: skinny_gemm(xin, ws[i], silu_mul=silu, config=cfg), copies)
        except Exception as e:  # out of shared memory etc.
            _emit({"proj": name, "M": M, "cfg": cfg, "skip": str(e)[:120]})
            continue
        results.append((t, cfg))
    return sorted(results)


def _sweep_projection(args, name, K, N, full, sms, best, rows) -> None:
    """Every M of --ms for one projection: cuBLAS, then the grid (M=32) or the best/default configs."""
    dev, dt = "cuda", torch.bfloat16
    copies = max(2, -(-200_000_000 // (K * N * 2)))  # >= 200 MB of weights per replay (L2 is 50 MB)
    ws = [torch.randn(K, N, device=dev, dtype=dt) / K ** 0.5 for _ in range(copies)]
    mb = K * N * 2 / 1e6
    silu = name == "down_proj" and not args.no_silu

    def fits(c):  # shared memory per stage, and at least half a program per SM
        BN, BK, split, warps, stages = c
        smem = (BN * BK + 32 * BK * (2 if silu else 1)) * 2 * stages
        return smem <= 200_000 and -(-N // BN) * split >= sms // 2 and (warps == 4 or BN * BK >= 128 * 128)

    for M in map(int, args.ms.split(",")):
        xin = torch.randn(M, 2 * K if silu else K, device=dev, dtype=dt)
        ref = (fused.silu_and_mul(xin) if silu else xin).float() @ ws[0].float()
        t_cublas = _time_cublas(args, name, K, N, M, xin, ws, silu, copies, rows)
        dflt = default_config(M, N, K, sms)
        cands = [c for c in full if fits(c)] if M == 32 else [tuple(best.get(f"{K},{N}", dflt)), dflt]
        results = _time_configs(name, M, xin, ws, ref, silu, copies, K, cands)
        t_default = next((t for t, c in results if c == tuple(dflt)), None)
        for t, cfg in results[:5]:
            _emit({"shape": args.shape, "proj": name, "K": K, "N": N, "M": M, "variant": "triton", "cfg": cfg,
                   "us": round(t, 2), "TBps": round(mb / t, 3), "vs_cublas": round(t_cublas / t, 3)})
        if results:
            rows.append({"shape": args.shape, "proj": name, "M": M, "variant": "triton-best", "cfg": results[0][1],
                         "us": round(results[0][0], 2), "default_us": t_default and round(t_default, 2),
                         "cublas_us": round(t_cublas, 2)})
            if M == 32:
                best[f"{K},{N}"] = list(results[0][1])
    del ws
    torch.cuda.empty_cache()


def main() -> None:
    args = _args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    full = list(itertools.product(map(int, args.bns.split(",")), (64, 128, 256), (1, 2, 4, 8, 16), (4, 8),
                                  map(int, args.stages.split(","))))
    if args.quick:
        full = list(itertools.product((64, 128), (128,), (2, 4, 8, 16), (4,), (4,)))
    best: dict[str, list[int]] = {}
    rows: list[dict] = []
    for name, (K, N) in projections(args.shape).items():
        if name not in args.projs.split(","):
            continue
        _sweep_projection(args, name, K, N, full, sms, best, rows)
        if args.best:  # written after each projection: a sweep cut short still leaves what it found
            with open(args.best, "w") as f:
                json.dump(best, f)
    print("SUMMARY")
    for r in rows:
        if r["variant"] == "triton-best":
            print(json.dumps(r))


if __name__ == "__main__":
    main()
