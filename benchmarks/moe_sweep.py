"""The Triton fused MoE (engine/kernels/fused_moe.py) on the GPU at decode sizes: time per layer against the
bytes it must read (the experts its tokens touch), for the default configs and a sweep of others.

Each layer's experts (qwen3-30b-a3b: 128 x 9.4 MB) are cycled over enough copies that they do not stay in L2,
timed as CUDA-graph replays, on uniform random routings (top-8 of 128 by random logits). Prints one JSON
line per (T, BM, config): us per layer, GB/s of the touched experts' bytes and the fraction of --bandwidth;
then the routing + align part alone; then, per T, the best config (paste into CONFIGS).

    python benchmarks/moe_sweep.py --ts 1,32,64,128,256 [--sweep] [--copies 3]
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from batchgen.engine.kernels.fused_moe import CONFIGS, block_m, fused_moe, moe_align

SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "mixtral-8x7b": (4096, 14336, 8, 2)}  # hidden, inter, E, k


def graph_us(fn, n_inner: int, reps: int = 10) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1000 / reps / n_inner


def layers(shape: str, copies: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    H, I, E, _ = SHAPES[shape]
    return [(torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02,
             torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(copies)]


def run(shape: str, T: int, ws, config=None, bm=None, bandwidth: float = 4.23e12) -> dict:
    H, I, E, K = SHAPES[shape]
    torch.manual_seed(T)  # the same routing for every config of one T
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w, ids = torch.topk(torch.softmax(torch.randn(T, E, device="cuda"), -1), K)
    touched = int(torch.unique(ids).numel())
    bm = bm or block_m(T * K, E)

    def layer_calls():
        for w1, w2 in ws:
            fused_moe(x, w1, w2, ids, w, bm=bm, config=config)
    us = graph_us(layer_calls, len(ws))
    align_us = graph_us(lambda: [moe_align(ids, E, bm) for _ in ws], len(ws))
    nbytes = touched * 3 * H * I * 2
    return dict(shape=shape, T=T, bm=bm, config=config or CONFIGS[bm], us=round(us, 2), align_us=round(align_us, 2),
                experts_touched=touched, gb_s=round(nbytes / us / 1e3, 1),
                fraction=round(nbytes / (us * 1e-6) / bandwidth, 3))


def candidates():
    gate_up = [(bn, bk, w, s) for bn, bk, w, s in itertools.product((32, 64, 128), (64, 128), (4, 8), (3, 4, 5))
               if not (bn == 128 and bk == 128 and s > 3)]
    down = [(bn, bk, w, s) for bn, bk, w, s in itertools.product((64, 128), (64, 128), (4, 8), (3, 4, 5))]
    return gate_up, down


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--ts", default="1,32,64,128,256")
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="also time other (BN, BK, warps, stages) per kernel")
    ap.add_argument("--bandwidth", type=float, default=4.23e12, help="bytes/s for the fraction (H200 copy rate)")
    a = ap.parse_args()
    ws = layers(a.shape, a.copies)
    best = {}
    for T in map(int, a.ts.split(",")):
        base = run(a.shape, T, ws, bandwidth=a.bandwidth)
        print(json.dumps({"variant": "default", **base}), flush=True)
        if not a.sweep:
            continue
        gate_up, down = candidates()
        top = base
        # one kernel at a time: gate_up configs with the default down, then down configs with the best gate_up
        for i, options in enumerate((gate_up, down)):
            for c in options:
                config = (c, top["config"][1]) if i == 0 else (top["config"][0], c)
                try:
                    r = run(a.shape, T, ws, config=config, bm=base["bm"], bandwidth=a.bandwidth)
                except Exception as e:  # a config that does not fit shared memory
                    print(json.dumps({"T": T, "config": config, "skip": str(e)[:120]}), flush=True)
                    continue
                print(json.dumps({"variant": "sweep", **r}), flush=True)
                if r["us"] < top["us"]:
                    top = r
        best[T] = top
    if best:
        print("SUMMARY (best per T)")
        for T, r in best.items():
            print(json.dumps({"T": T, "bm": r["bm"], "config": r["config"], "us": r["us"], "fraction": r["fraction"]}))


if __name__ == "__main__":
    main()
