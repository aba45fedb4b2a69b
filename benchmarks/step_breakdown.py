"""Where a decode step's GPU time goes, measured with CUDA events (the torch profiler records no kernels on
the H200 hosts this project is lent), and the decode attention kernel by KV dtype.

    python benchmarks/step_breakdown.py engine --batch 352 --context 1100 [--quantization fp8] [--kv-cache-dtype fp8]
    python benchmarks/step_breakdown.py attention --cases 32x768,352x1100

engine: eager steps (no CUDA graphs) of the 8B shape at a steady batch; every projection, norm, activation,
attention call and _scaled_mm is bracketed by a pair of events, nested calls under their caller's name
(`qkv_proj/quantize`). Per step: each part's GPU ms, and the whole step's. Eager launches are slower than
graph replay: at small batches the figures include launch gaps, at 352 sequences the GPU is the bottleneck.
attention: paged_decode at B sequences of L tokens, 16-bit against FP8 caches (bf16 dots and fp16 dots),
over tile configs; GB/s against the bytes it must read. One JSON line per measurement.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class EventLog:
    """Nested CUDA-event brackets: name -> list of (start, end) per step."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def wrap(self, fn, name_of):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            self.stack.append(name_of(*args))
            name = "/".join(self.stack)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            try:
                return fn(*args, **kwargs)
            finally:
                e.record()
                self.stack.pop()
                self.pending.append((name, s, e))
        return inner

    def collect(self) -> None:
        torch.cuda.synchronize()
        for name, s, e in self.pending:
            self.totals[name] += s.elapsed_time(e)
            self.counts[name] += 1
        self.pending.clear()


def _proj_name(cfg) -> dict[tuple[int, int], str]:
    H, KVH, D, hid, inter = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    return {(hid, (H + 2 * KVH) * D): "qkv_proj", (H * D, hid): "o_proj", (hid, 2 * inter): "gate_up_proj",
            (inter, hid): "down_proj", (hid, cfg.vocab_size): "lm_head"}


def engine_breakdown(a) -> None:
    from batchgen.bench import SHAPES
    from batchgen.engine import fused_ops
    from batchgen.engine.attention.triton_backend import TritonAttention
    from batchgen.engine.engine import Engine
    from batchgen.engine.kernels import fp8_quant
    from batchgen.engine.loader import build_model, init_random
    from batchgen.engine.models import linear_layout
    from batchgen.engine.models.config import ModelConfig
    from batchgen.engine.quant.fp8_linear import Fp8Linear
    from batchgen.engine.request import GenerationRequest, SamplingParams

    log = EventLog()
    cfg = ModelConfig.from_hf(SHAPES[a.shape])
    names = _proj_name(cfg)

    def lin(self, *_):
        k, n = (self.in_features, self.out_features) if hasattr(self, "in_features") else tuple(self.weight_t.shape)
        return names.get((k, n), f"linear{k}x{n}")
    for cls in (Fp8Linear, torch.nn.Linear, linear_layout.InputMajorLinear):
        for meth in ("forward", "normed", "add_to"):
            if meth in cls.__dict__:
                setattr(cls, meth, log.wrap(cls.__dict__[meth], lin))
    TritonAttention.forward_rope = log.wrap(TritonAttention.forward_rope, lambda *_: "attention")
    TritonAttention.attend = log.wrap(TritonAttention.attend, lambda *_: "attend")
    for mod, fn in ((fused_ops, "rms_norm"), (fused_ops, "silu_and_mul"), (fp8_quant, "rms_norm_fp8"),
                    (fp8_quant, "quantize_fp8")):
        setattr(mod, fn, log.wrap(getattr(mod, fn), lambda *_, n=fn: n))
    torch._scaled_mm = log.wrap(torch._scaled_mm, lambda *_: "_scaled_mm")

    model = build_model(cfg, torch.device("cuda"), torch.bfloat16, qkv_bias=False)
    init_random(model)
    kv = {"kv_cache_dtype": a.kv_cache_dtype} if a.kv_cache_dtype else {}
    eng = Engine(None, model=model, device="cuda", max_num_seqs=a.batch, max_model_len=4096, cuda_graphs=False,
                 prefix_caching=False, quantization=a.quantization, **kv)
    prompts = [[100 + (i * 7 + j) % 5000 for j in range(a.context)] for i in range(a.batch)]
    eng.add([GenerationRequest(p, SamplingParams(max_new_tokens=4000 - a.context, ignore_eos=True)) for p in prompts])
    for _ in range(-(-a.batch * a.context // eng.max_batch_tokens) + 4):  # admit everything, reach steady decode
        eng.step()
    log.collect()
    log.totals.clear()
    log.counts.clear()
    step_ms = 0.0
    for _ in range(a.steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        eng.step()
        e.record()
        log.collect()
        step_ms += s.elapsed_time(e)
    top = {k: v for k, v in log.totals.items() if "/" not in k}
    rec = {"what": "engine", "shape": a.shape, "batch": a.batch, "context": a.context,
           "quantization": a.quantization or "none", "kv_cache_dtype": a.kv_cache_dtype or "auto",
           "step_ms": round(step_ms / a.steps, 3), "parts_ms": round(sum(top.values()) / a.steps, 3),
           "ms_per_step": {k: round(v / a.steps, 4) for k, v in sorted(log.totals.items(), key=lambda kv: -kv[1])},
           "calls_per_step": {k: log.counts[k] // a.steps for k in log.totals}}
    print(json.dumps(rec), flush=True)
    eng.abort()
    eng.close()


def paged_tables(B: int, L: int, bs: int, sets: int, total: int, g: torch.Generator):
    """`sets` block tables of B sequences of L tokens over disjoint random blocks of a `total`-block cache (so
    the timed repeats read cold KV), with the seq_lens and query_start_loc of one decode token each."""
    nblk = -(-L // bs)
    perm = torch.randperm(total, device="cuda", generator=g).to(torch.int32)
    tables = []
    for i in range(sets):
        t = torch.zeros(B, 4096 // bs, dtype=torch.int32, device="cuda")
        t[:, :nblk] = perm[i * B * nblk:(i + 1) * B * nblk].view(B, nblk)
        tables.append(t)
    sl = torch.full((B,), L, dtype=torch.int32, device="cuda")
    qsl = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    return tables, sl, qsl


def attention_bench(a) -> None:
    import triton.testing as tt

    from batchgen.engine.attention.triton_kernels import decode

    H, KVH, D, bs = 32, 8, 128, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    for case in a.cases.split(","):
        B, L = (int(v) for v in case.split("x"))
        nblk = -(-L // bs)
        sets = 3
        total = B * nblk * sets + 8
        kc16 = torch.randn(total, KVH, bs, D, device="cuda", dtype=torch.bfloat16, generator=g).permute(0, 2, 1, 3)
        vc16 = torch.randn(total, KVH, bs, D, device="cuda", dtype=torch.bfloat16, generator=g).permute(0, 2, 1, 3)
        kc8, vc8 = (c.float().div(4).clamp(-448, 448).to(torch.float8_e4m3fn) for c in (kc16, vc16))
        tables, sl, qsl = paged_tables(B, L, bs, sets, total, g)
        q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        outs = [torch.empty_like(q) for _ in range(sets)]
        # do_bench_cudagraph runs on a stream of its own, which does not wait for this default-stream setup:
        # without the sync its first launch read half-written block tables (the "illegal address" on the case
        # after the first, 2026-12-02..04; never under compute-sanitizer, which serialises the streams)
        torch.cuda.synchronize()
        ref8 = None
        for name, kc, vc, extra in (("bf16", kc16, vc16, {}), ("fp8-bf16dot", kc8, vc8, {"fp8_dot_f16": False}),
                                    ("fp8", kc8, vc8, {})):
            nbytes = B * L * KVH * D * 2 * kc.element_size()
            for bn, w, st, splits, regs in a.configs:
                if name == "fp8-bf16dot" and (bn, w, st, splits, regs) != a.configs[0]:
                    continue
                kw = dict(block_n=bn, num_warps=w, num_stages=st, k_scale=4.0, v_scale=4.0,
                          num_splits=splits or None, maxnreg=regs or None, **extra)

                def f():
                    for i in range(sets):
                        decode.paged_decode(q, kc, vc, tables[i], sl, qsl, 4096, D ** -0.5, out=outs[i], **kw)
                tag = {"what": "attention", "B": B, "L": L, "kv": name, "bn": bn, "w": w, "st": st,
                       "splits": splits, "maxnreg": regs}
                try:
                    f()
                    us = tt.do_bench_cudagraph(f, rep=100, return_mode="median") * 1e3 / sets
                except Exception as e:  # out of shared memory etc.
                    print(json.dumps({**tag, "skip": str(e)[:160]}), flush=True)
                    continue
                err = None
                if name != "bf16":
                    if ref8 is None:
                        ref8 = outs[0].float().clone()
                    err = ((outs[0].float() - ref8).norm() / ref8.norm()).item()
                print(json.dumps({**tag, "us": round(us, 2), "TBps": round(nbytes / us / 1e6, 3),
                                  "rel_to_first_fp8": err}), flush=True)
        del kc16, vc16, kc8, vc8
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    e = sub.add_parser("engine")
    e.add_argument("--shape", default="llama-3.1-8b")
    e.add_argument("--batch", type=int, default=352)
    e.add_argument("--context", type=int, default=1100)
    e.add_argument("--steps", type=int, default=10)
    e.add_argument("--quantization", default=None, choices=["fp8"])
    e.add_argument("--kv-cache-dtype", default=None)
    t = sub.add_parser("attention")
    t.add_argument("--cases", default="32x768,352x1100")
    t.add_argument("--configs", default="128:4:2:0:0,128:4:2:0:168,128:4:2:0:128,128:4:3:0:168,64:4:2:0:128,"
                   "128:8:2:0:0", help="BLOCK_N:warps:stages:splits:maxnreg (0 = the heuristic / no cap), comma-separated")
    a = ap.parse_args()
    if a.what == "attention":
        a.configs = [tuple(int(v) for v in (c + ":0").split(":")[:5]) for c in a.configs.split(",")]
    (engine_breakdown if a.what == "engine" else attention_bench)(a)


if __name__ == "__main__":
    main()
