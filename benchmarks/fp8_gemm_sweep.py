"""Decode-size FP8 GEMMs on the GPU: the Triton FP8 skinny GEMM (W8A16 and W8A8) against torch._scaled_mm
(with its per-token activation quantize) and the bf16 cuBLAS GEMM of the same projection.

Weights cycled over enough copies to stay out of L2, timed as CUDA-graph replays (gemm_sweep.py's
method). One JSON line per (projection, M, variant); --best writes the fastest config per (K, N) at
M=32 for each activation mode, in FP8_TUNED's format (quant/fp8_linear.py).

    python benchmarks/fp8_gemm_sweep.py --shape llama-3.1-8b --best fp8_best.json
    python benchmarks/fp8_gemm_sweep.py --big --ms 128,352,1024,8192   # kernels/fp8_gemm.py's tiles vs _scaled_mm
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from batchgen.engine.kernels.fp8_skinny_gemm import default_config, fp8_skinny_gemm
from batchgen.engine.quant import fp8
from gemm_sweep import SHAPES, projections, time_graph


def _emit(rec: dict) -> dict:
    print(json.dumps(rec), flush=True)
    return rec


def _scaled_mm(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    xq, xs = fp8.quantize_activation(x)
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16)


def _sweep(shape: str, name: str, K: int, N: int, ms: list[int], cands: list[tuple], sms: int, best: dict,
           acts: tuple[int, ...]) -> None:
    gated = name == "gate_up_proj"
    copies = max(2, -(-400_000_000 // (K * N)))  # >= 400 MB of FP8 weights per replay (L2 is 50 MB)
    wqs, wss = [], []
    for _ in range(copies):
        q, s = fp8.quantize_weight(torch.randn(N, K, device="cuda") / K ** 0.5)
        wqs.append(q)
        wss.append(s)
    wb = [torch.randn(K, N, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, copies // 2))]
    mb = K * N / 1e6
    base = {"shape": shape, "proj": name, "K": K, "N": N}
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        t = time_graph(lambda i: x @ wb[i % len(wb)], copies)
        _emit({**base, "M": M, "variant": "bf16-cublas", "us": round(t, 2), "TBps": round(2 * mb / t, 3)})
        t = time_graph(lambda i: _scaled_mm(x, wqs[i], wss[i]), copies)
        _emit({**base, "M": M, "variant": "scaled_mm", "us": round(t, 2), "TBps": round(mb / t, 3)})
        for act in acts:
            dflt = default_config(N // 2 if gated else N, K, sms, gated)
            configs = cands if M == 32 else [tuple(best.get(f"{K},{N},{int(act)}", dflt))]
            results = []
            xin = fp8.Fp8Rows(*fp8.quantize_activation_groups(x)) if act == 2 else x  # 2: rows come quantized
            for cfg in dict.fromkeys([tuple(dflt)] + configs):
                try:
                    ref = fp8.emulate_skinny(xin, wqs[0], wss[0], act > 0)
                    y = fp8_skinny_gemm(xin, wqs[0], wss[0], gated=gated, act_fp8=act > 0, config=cfg)
                    if not gated and ((y.float() - ref).norm() / ref.norm()).item() > 1e-2:
                        _emit({**base, "M": M, "cfg": cfg, "act_fp8": act, "error": "wrong result"})
                        continue
                    t = time_graph(lambda i: fp8_skinny_gemm(xin, wqs[i], wss[i], gated=gated, act_fp8=act > 0,
                                                             config=cfg), copies)
                except Exception as e:  # out of shared memory etc.
                    _emit({**base, "M": M, "cfg": cfg, "skip": str(e)[:160]})
                    continue
                results.append((t, cfg))
            results.sort()
            for t, cfg in results[:3]:
                _emit({**base, "M": M, "variant": ("w8a16", "w8a8", "w8a8-rows")[act], "cfg": cfg, "us": round(t, 2),
                       "TBps": round(mb / t, 3), "default": cfg == tuple(dflt)})
            if results and M == 32:
                best[f"{K},{N},{int(act)}"] = list(results[0][1])
    del wqs, wss, wb
    torch.cuda.empty_cache()


BIG_CONFIGS = [(bm, bn, 128, 8, w, st) for bm in (64, 128) for bn in (128, 256) for w in (4, 8) for st in (3, 4, 5)
               if not (bm == 128 and bn == 256 and w == 4) and (bm + bn) * 128 * st <= 200_000]


def _big(shape: str, name: str, K: int, N: int, ms: list[int], best: dict) -> None:
    """Steps above decode size: bf16 cuBLAS, _scaled_mm and kernels/fp8_gemm.py (each FP8 one with the
    Triton per-token quantize of x it runs with in Fp8Linear), over fp8_gemm's tiles."""
    from batchgen.engine.kernels.fp8_gemm import default_config as big_default, fp8_gemm
    from batchgen.engine.kernels.fp8_quant import quantize_fp8

    copies = max(2, -(-400_000_000 // (K * N)))
    wqs, wss = zip(*(fp8.quantize_weight(torch.randn(N, K, device="cuda") / K ** 0.5) for _ in range(copies)))
    wb = [torch.randn(K, N, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, copies // 2))]
    base = {"shape": shape, "proj": name, "K": K, "N": N, "big": True}
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        flop = 2 * M * N * K
        rec = lambda variant, t, **kw: _emit({**base, "M": M, "variant": variant, "us": round(t, 2),  # noqa: E731
                                              "TFLOPs": round(flop / t / 1e6, 1), **kw})
        rec("bf16-cublas", time_graph(lambda i: x @ wb[i % len(wb)], copies))

        def scaled(i):
            xq, xs = quantize_fp8(x, per_group=False)
            return torch._scaled_mm(xq, wqs[i].t(), scale_a=xs, scale_b=wss[i].view(1, -1), out_dtype=torch.bfloat16)
        rec("scaled_mm", time_graph(scaled, copies))
        xq, xs = quantize_fp8(x, per_group=False)
        rec("quantize-only", time_graph(lambda i: quantize_fp8(x, per_group=False), copies))
        ref = fp8.dequantize(xq, xs) @ fp8.dequantize(wqs[0], wss[0]).t()
        results = []
        for cfg in dict.fromkeys([big_default(M, N, K)] + BIG_CONFIGS):
            try:
                y = fp8_gemm(xq, xs, wqs[0], wss[0], config=cfg)
                if ((y.float() - ref).norm() / ref.norm()).item() > 1e-2:
                    _emit({**base, "M": M, "cfg": cfg, "error": "wrong result"})
                    continue
                results.append((time_graph(lambda i: fp8_gemm(*quantize_fp8(x, per_group=False), wqs[i], wss[i],
                                                              config=cfg), copies), cfg))
            except Exception as e:  # out of shared memory etc.
                _emit({**base, "M": M, "cfg": cfg, "skip": str(e)[:160]})
        results.sort()
        for t, cfg in results[:3]:
            rec("triton-fp8", t, cfg=cfg, default=cfg == big_default(M, N, K))
        if results:
            best[f"{M},{K},{N}"] = list(results[0][1])
    del wqs, wss, wb
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--ms", default="32,8,64,1")
    ap.add_argument("--best", default=None)
    ap.add_argument("--acts", default="0,1", help="0 = W8A16, 1 = W8A8 quantized on load, 2 = W8A8 on rows given quantized")
    ap.add_argument("--big", action="store_true", help="steps above decode size: kernels/fp8_gemm.py vs _scaled_mm")
    args = ap.parse_args()
    if args.big:
        best_big: dict[str, list[int]] = {}
        for name, (K, N) in projections(args.shape).items():
            _big(args.shape, name, K, N, [int(m) for m in args.ms.split(",")], best_big)
        if args.best:
            with open(args.best, "w") as f:
                json.dump(best_big, f)
        return
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cands = [c for c in itertools.product((64, 128, 256), (128,), (1, 2, 4, 8), (4, 8), (3, 4, 6))
             if c[0] * 128 * c[4] <= 160_000 and not (c[0] == 256 and c[3] == 4)]
    best: dict[str, list[int]] = {}
    for name, (K, N) in projections(args.shape).items():
        _sweep(args.shape, name, K, N, [int(m) for m in args.ms.split(",")], cands, sms, best,
               tuple(int(a) for a in args.acts.split(",")))
        if args.best:
            with open(args.best, "w") as f:
                json.dump(best, f)


if __name__ == "__main__":
    main()
