"""Kernel benchmarks on one GPU: decode attention (Triton vs torch backend vs a bandwidth floor),
prefill attention, and the fused elementwise ops (Triton vs torch). Writes JSON.

    python benchmarks/kernels.py --out kernels.json [--quick]

Floors: decode reads each sequence's K and V once: sum(seq_lens) * kv_heads * head_dim * 2 * bytes,
over --bw (default 3.0e12 B/s, the device-to-device copy rate measured on this workplace's H100).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchgen.engine.attention.base import AttentionMetadata  # noqa: E402
from batchgen.engine.attention.torch_backend import TorchAttention  # noqa: E402

DEV = "cuda"
DECODE_SHAPES = {
    # name: (q heads, kv heads, head_dim, batch, (min ctx, max ctx))
    "llama-3.1-8b": (32, 8, 128, 32, (256, 1280)),
    "qwen3-0.6b": (16, 8, 128, 256, (100, 2000)),
}


PREFILL_CASES = {
    # name: (q heads, kv heads, head_dim, seq_lens, q_lens)
    "llama-8b 16x512 fresh": (32, 8, 128, [512] * 16, [512] * 16),
    "qwen3 chunk 1024 on 1024 ctx + 63 decodes": (16, 8, 128, [2048] + [800] * 63, [1024] + [1] * 63),
}
FUSED_TOKENS = (32, 256, 8192)
FUSED_DIMS = ((4096, 14336), (1024, 3072))


def build(seq_lens, q_lens, H, KVH, D, bs, dtype, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    nblk = [-(-s // bs) for s in seq_lens]
    total = sum(nblk) + 8
    perm = torch.randperm(total, generator=g)
    bt = torch.zeros(B, max(nblk), dtype=torch.int32)
    i = 0
    for b, n in enumerate(nblk):
        bt[b, :n] = perm[i:i + n].to(torch.int32)
        i += n
    kc = torch.randn(total, bs, KVH, D, device=dev, dtype=dtype)
    vc = torch.randn(total, bs, KVH, D, device=dev, dtype=dtype)
    T = sum(q_lens)
    qsl = torch.zeros(B + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    slots = [int(bt[b, p // bs]) * bs + p % bs for b, (s, ql) in enumerate(zip(seq_lens, q_lens)) for p in range(s - ql, s)]
    meta = AttentionMetadata(torch.tensor(slots, device=dev), qsl.to(dev),
                             torch.tensor(seq_lens, dtype=torch.int32, device=dev), bt.to(dev),
                             max(q_lens), max(seq_lens), all(q == 1 for q in q_lens))
    q = torch.randn(T, H, D, device=dev, dtype=dtype)
    return q, kc, vc, meta


def bench(fn, graph: bool):
    import triton.testing as tt

    if graph:  # its own stream does not wait for the default stream's setup kernels: sync first
        torch.cuda.synchronize()
        return tt.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
    return tt.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e3


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def decode_bench(quick: bool, bw: float):
    from batchgen.engine.attention.triton_kernels import decode

    res = []
    for name, (H, KVH, D, B, (lo, hi)) in DECODE_SHAPES.items():
        rng = random.Random(0)
        seq_lens = [rng.randint(lo, hi) for _ in range(B)]
        dtype = torch.bfloat16
        q, kc, vc, meta = build(seq_lens, [1] * B, H, KVH, D, 16, dtype, DEV)
        kv_bytes = sum(seq_lens) * KVH * D * 2 * kc.element_size()
        floor_us = kv_bytes / bw * 1e6
        scale = D ** -0.5
        args = (q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_seq_len, scale)
        torch_be = TorchAttention()
        ref = torch_be.attend(q, kc, vc, meta, scale)
        t_torch = bench(lambda: torch_be.attend(q, kc, vc, meta, scale), graph=False)
        default_splits = decode.choose_num_splits(B, KVH, meta.max_seq_len, q.device, 64)
        row = dict(shape=name, heads=H, kv_heads=KVH, head_dim=D, batch=B, ctx=[lo, hi], mean_ctx=sum(seq_lens) / B,
                   kv_mb=kv_bytes / 1e6, floor_us=floor_us, torch_backend_us=t_torch,
                   default_splits=default_splits, variants=[])
        splits_list = [1, 2, 4, 8, 16] if B < 128 else [1, 2, 4]
        configs = [(s, 64, 4, None) for s in splits_list] + [(default_splits, bn, 4, None) for bn in (16, 32, 128)]
        if not quick:
            configs += [(default_splits, 64, 4, st) for st in (2, 4)] + [(default_splits, 128, 8, None)]
        for splits, bn, nw, st in configs:
            f = lambda: decode.paged_decode(*args, num_splits=splits, block_n=bn, num_warps=nw, num_stages=st)  # noqa: E731
            err = rel(f().float(), ref.float())
            tg = bench(f, graph=True)
            te = bench(f, graph=False)
            row["variants"].append(dict(num_splits=splits, block_n=bn, num_warps=nw, num_stages=st, graph_us=tg,
                                        eager_us=te, rel_err=err, gbps=kv_bytes / tg / 1e3))
            print(f"  decode {name} splits={splits} bn={bn} w={nw} st={st}: {tg:7.1f} us graph, {te:7.1f} us eager, "
                  f"err {err:.1e}", flush=True)
        best = min(row["variants"], key=lambda v: v["graph_us"])
        dflt = [v for v in row["variants"] if v["num_splits"] == default_splits and v["block_n"] == 64
                and v["num_stages"] is None][0]
        row.update(best=best, default=dflt)
        res.append(row)
    return res


def prefill_bench(quick: bool):
    from batchgen.engine.attention.triton_kernels import prefill

    res = []
    for name, (H, KVH, D, seq_lens, q_lens) in PREFILL_CASES.items():
        q, kc, vc, meta = build(seq_lens, q_lens, H, KVH, D, 16, torch.bfloat16, DEV)
        scale = D ** -0.5
        torch_be = TorchAttention()
        try:
            ref = torch_be.attend(q, kc, vc, meta, scale)
            t_torch = bench(lambda: torch_be.attend(q, kc, vc, meta, scale), graph=False)
        except torch.OutOfMemoryError:
            ref, t_torch = None, float("nan")
            torch.cuda.empty_cache()
        flops = sum(4 * ql * (s - ql + (ql + 1) / 2) * H * D for s, ql in zip(seq_lens, q_lens))
        row = dict(case=name, torch_backend_us=t_torch, gflop=flops / 1e9, variants=[])
        cfgs = [(64, 64, 4), (128, 64, 8), (128, 32, 4), (64, 32, 4)] if not quick else [(64, 64, 4)]
        for bm, bn, nw in cfgs:
            f = lambda: prefill.paged_prefill(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,  # noqa: E731
                                              scale, block_m=bm, block_n=bn, num_warps=nw)
            err = rel(f().float(), ref.float()) if ref is not None else float("nan")
            t = bench(f, graph=False)
            row["variants"].append(dict(block_m=bm, block_n=bn, num_warps=nw, us=t, tflops=flops / t / 1e6, rel_err=err))
            print(f"  prefill {name} bm={bm} bn={bn} w={nw}: {t:8.1f} us ({flops / t / 1e6:.0f} TFLOP/s), "
                  f"torch {t_torch:8.1f} us, err {err:.1e}", flush=True)
        res.append(row)
    return res


def fused_bench():
    from batchgen.engine import fused_ops as F

    res = []
    dev, dt = DEV, torch.bfloat16
    for tokens in FUSED_TOKENS:
        for hidden, inter in FUSED_DIMS:
            x = torch.randn(tokens, hidden, device=dev, dtype=dt)
            r = torch.randn(tokens, hidden, device=dev, dtype=dt)
            w = torch.randn(hidden, device=dev, dtype=dt)
            gu = torch.randn(tokens, 2 * inter, device=dev, dtype=dt)
            H, KVH, D = (32, 8, 128) if hidden == 4096 else (16, 8, 128)
            qkv = torch.randn(tokens, (H + 2 * KVH) * D, device=dev, dtype=dt)
            q, k, _ = qkv.view(tokens, H + 2 * KVH, D).split([H, KVH, KVH], dim=1)
            pos = torch.randint(0, 4096, (tokens,), device=dev)
            cache = F.rope_cos_sin_cache(F.rope_inv_freq(D, 500000.0), 8192, device=dev)
            qn = torch.randn(tokens, H, D, device=dev, dtype=dt)  # qwen3 per-head q_norm
            wn = torch.randn(D, device=dev, dtype=dt)
            ops = {
                "rms_norm": lambda force: F.rms_norm(x, w, 1e-6, force=force),
                "rms_norm+residual": lambda force: F.rms_norm(x, w, 1e-6, residual=r, force=force),
                "rms_norm per-head (q_norm)": lambda force: F.rms_norm(qn, wn, 1e-6, force=force),
                "silu_and_mul": lambda force: F.silu_and_mul(gu, force=force),
                "apply_rope": lambda force: F.apply_rope(q, k, pos, cache, force=force),
            }
            for op, fn in ops.items():
                tt = bench(lambda: fn("torch"), graph=True)
                tr = bench(lambda: fn("triton"), graph=True)
                res.append(dict(op=op, tokens=tokens, hidden=hidden, torch_us=tt, triton_us=tr, speedup=tt / tr))
                print(f"  {op:28s} T={tokens:5d} hidden={hidden}: torch {tt:7.1f} us  triton {tr:7.1f} us  "
                      f"x{tt / tr:.2f}", flush=True)
    return res


class _SeedRegime:
    """Decode attention in the seed regime: llama-3.1-8b heads (32/8/128), equal context lengths, head-major
    cache (the runner's layout), host bound max_seq_len=4096 (as in CUDA graphs), NSETS rotating input sets
    per timed graph (L2 cold, graph launch gaps included)."""
    H, KVH, D, bs, NSETS = 32, 8, 128, 16, 3

    def __init__(self, bw: float) -> None:
        self.bw, self.dtype, self.scale = bw, torch.bfloat16, self.D ** -0.5
        self.g = torch.Generator(device=DEV).manual_seed(0)
        self.cases: dict = {}

    def case(self, B: int, L: int):
        if (B, L) not in self.cases:
            self.cases[(B, L)] = self._make_case(B, L)
        return self.cases[(B, L)]

    def _make_case(self, B: int, L: int):
        from batchgen.engine.attention.torch_backend import TorchAttention

        H, KVH, D, bs, NSETS, g, dtype = self.H, self.KVH, self.D, self.bs, self.NSETS, self.g, self.dtype
        nblk = -(-L // bs)
        total = B * nblk * NSETS + 8
        kc = torch.randn(total, KVH, bs, D, device=DEV, dtype=dtype, generator=g).permute(0, 2, 1, 3)
        vc = torch.randn(total, KVH, bs, D, device=DEV, dtype=dtype, generator=g).permute(0, 2, 1, 3)
        perm = torch.randperm(total, device=DEV, generator=g).to(torch.int32)
        tables = []
        for i in range(NSETS):
            t = torch.zeros(B, 4096 // bs, dtype=torch.int32, device=DEV)
            t[:, :nblk] = perm[i * B * nblk:(i + 1) * B * nblk].view(B, nblk)
            tables.append(t)
        sl = torch.full((B,), L, dtype=torch.int32, device=DEV)
        qsl = torch.arange(B + 1, dtype=torch.int32, device=DEV)
        q = torch.randn(B, H, D, device=DEV, dtype=dtype, generator=g)
        outs = [torch.empty_like(q) for _ in range(NSETS)]
        meta = AttentionMetadata(torch.zeros(B, dtype=torch.int64, device=DEV), qsl, sl, tables[0], 1, L, True)
        ref = TorchAttention().attend(q.float(), kc.float(), vc.float(), meta, self.scale)
        return kc, vc, tables, sl, qsl, q, outs, ref

    def run(self, B: int, L: int, cfg: dict) -> dict:
        from batchgen.engine.attention.triton_kernels import decode

        kc, vc, tables, sl, qsl, q, outs, ref = self.case(B, L)
        kw = dict(num_splits=cfg["S"], block_n=cfg["bn"], num_warps=cfg["w"], num_stages=cfg["st"])

        def f():
            for i in range(self.NSETS):
                decode.paged_decode(q, kc, vc, tables[i], sl, qsl, 4096, self.scale, out=outs[i], **kw)
        for o in outs:
            o.fill_(float("nan"))
        f()
        err = rel(outs[0].float(), ref)
        us = bench(f, graph=True) / self.NSETS
        KVH, D = self.KVH, self.D
        floor = B * L * KVH * D * 2 * 2 / self.bw * 1e6
        r = dict(B=B, L=L, **cfg, us=us, err=err, floor_us=floor, tbps=B * L * KVH * D * 4 / us / 1e6)
        print(f"  sweep B={B:3d} L={L:5d} S={cfg['S']} bn={cfg['bn']:3d} w={cfg['w']} st={cfg['st']}: "
              f"{us:6.1f} us ({r['tbps']:.2f} TB/s, floor {floor:5.1f}) err {err:.1e}",
              flush=True)
        assert err < 2e-2, r
        return r


def _best_of_phase2(phase2: list[dict]) -> tuple[tuple, dict]:
    """The (S, bn, w, st) with the least time summed over the three lengths, and its record."""
    tot: dict = {}
    for r in phase2:
        k = (r["S"], r["bn"], r["w"], r["st"])
        tot[k] = tot.get(k, 0.0) + r["us"]
    best = min(tot, key=tot.get)
    return best, dict(zip(("S", "bn", "w", "st"), best), sum_us=tot[best], base_sum_us=tot[(4, 64, 4, None)])


def seed_sweep(bw: float, out_path: str | None = None):
    """The seed regime (_SeedRegime). Phase 1: splits x block_n at ctx 768; phase 2: warps/stages for the
    best (splits, block_n) at ctx 384/768/1152; phase 3: splits vs batch size."""
    sweep = _SeedRegime(bw)
    t_start = time.time()
    res = dict(phase1=[], phase2=[], phase3=[])
    for S in (1, 2, 3, 4, 5, 6, 8):
        for bn in (32, 64, 128):
            res["phase1"].append(sweep.run(32, 768, dict(S=S, bn=bn, w=4, st=None)))
    top = []
    for r in sorted(res["phase1"], key=lambda r: r["us"]):
        if (r["S"], r["bn"]) not in top:
            top.append((r["S"], r["bn"]))
    for L in (384, 768, 1152):
        res["phase2"].append(sweep.run(32, L, dict(S=4, bn=64, w=4, st=None)))  # the base
    for S, bn in top[:3]:
        for w, st in ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3)):
            for L in (384, 768, 1152):
                res["phase2"].append(sweep.run(32, L, dict(S=S, bn=bn, w=w, st=st)))
    best, res["best"] = _best_of_phase2(res["phase2"])
    print(f"SWEEP best over L=384/768/1152: {res['best']}", flush=True)
    S0, bn, w, st = best
    print(f"SWEEP_BEST paged_decode(num_splits={S0}, block_n={bn}, num_warps={w}, num_stages={st})", flush=True)
    for B in (8, 16, 64, 128, 256):
        for S in (1, 2, 4, 8, 16):
            if B * sweep.KVH * S <= 8192 and time.time() - t_start < 150:
                res["phase3"].append(sweep.run(B, 768, dict(S=S, bn=bn, w=w, st=st)))
    if out_path:
        Path(out_path).write_text(json.dumps(res, indent=1))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="kernels.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bw", type=float, default=3.0e12)
    ap.add_argument("--only", default="decode,prefill,fused")
    ap.add_argument("--seed-sweep", default=None, metavar="JSON", help="only the seed-regime decode sweep")
    a = ap.parse_args()
    if a.seed_sweep:
        seed_sweep(a.bw, a.seed_sweep)
        return
    t0 = time.time()
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, bw=a.bw)
    import triton

    out["triton"] = triton.__version__
    parts = a.only.split(",")
    if "decode" in parts:
        out["decode"] = decode_bench(a.quick, a.bw)
    if "prefill" in parts:
        out["prefill"] = prefill_bench(a.quick)
    if "fused" in parts:
        out["fused"] = fused_bench()
    out["wall_s"] = time.time() - t0
    Path(a.out).write_text(json.dumps(out, indent=1))
    print("\nSUMMARY (H100 unless noted; us = microseconds per layer call)")
    for row in out.get("decode", []):
        d, b = row["default"], row["best"]
        print(f"decode {row['shape']:14s} B={row['batch']:3d} ctx~{row['mean_ctx']:.0f}: floor {row['floor_us']:6.1f} | "
              f"triton default {d['graph_us']:6.1f} (splits {d['num_splits']}) | best {b['graph_us']:6.1f} "
              f"(splits {b['num_splits']} bn {b['block_n']} w {b['num_warps']} st {b['num_stages']}) | "
              f"torch {row['torch_backend_us']:7.1f}")
    for row in out.get("prefill", []):
        b = min(row["variants"], key=lambda v: v["us"])
        print(f"prefill {row['case']}: triton {b['us']:.1f} us ({b['tflops']:.0f} TFLOP/s, bm {b['block_m']} bn "
              f"{b['block_n']} w {b['num_warps']}) | torch {row['torch_backend_us']:.1f} us")
    for row in out.get("fused", []):
        print(f"{row['op']:28s} T={row['tokens']:5d} h={row['hidden']}: x{row['speedup']:.2f}")


if __name__ == "__main__":
    main()
