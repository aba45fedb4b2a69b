"""Prototype: FP8-cache decode attention on Hopper's FP8 tensor cores (wgmma), against the engine's kernel.

    python benchmarks/decode_fp8_mma_proto.py [--cases 32x768,352x1100] [--compile-only]

Triton (3.6) only emits FP8 MMAs as wgmma, whose M side is 64 rows a warpgroup: the engine's kernel
(16 padded query rows, mma.sync) converts every K and V code to fp16 instead, which bounds it by
arithmetic at 2.3 TB/s (notes/KERNELS.md). Here the G query heads of a kv head are padded to 64 rows,
q is quantized per row (amax / 448) and Q K^T runs on e4m3 codes; P V runs either in fp16 (V converted,
PV=16) or on e4m3 too (p * 256 quantized, PV=8; FA3's choice). More exp2 over the padding, no K conversion.
The tokens-on-M kernel (decode_tm, 2026-12-04) turns Q K^T around instead: S^T = K q^T with the tokens on the
wgmma's M side and the 16 padded heads on N (m64n16k32 e4m3: no padding to 64 rows, no K conversion), the
softmax down the tokens, P V in fp16 (V converted: half the engine's conversions) as P V on mma.sync or
V^T P^T on wgmma. Its q and P roundings cost +1.16% NLL against bf16 on SmolLM2 (attention_fp8_nll.py).
One JSON line per case and variant: us, TB/s of the K/V bytes, error against the fp32 reference.
--compile-only: compile for sm_90a on any machine (the triton wheel carries ptxas) and report registers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_LOG2E = 1.4426950408889634


@triton.jit
def _q_e4m3(q_ptr, b, heads, gmask, d, stride_qt, stride_qh):
    """The kv head's query rows [G_PAD, D] in e4m3, one scale a row (amax / 448), and those scales."""
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    q = q.to(tl.float32)
    qs = tl.maximum(tl.max(tl.abs(q), 1) / 448.0, 1e-12)
    return (q / qs[:, None]).to(tl.float8e4nv), qs


@triton.jit
def _kv_tile(k_ptr, v_ptr, bt_row, n0, seq_len, kvh, d, stride_kb, stride_kt, stride_kh,
             BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens [n0, n0 + BLOCK_N) of the paged K and V caches for kv head kvh ([BLOCK_N, D] e4m3), and the mask
    of those below seq_len."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < seq_len
    blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
    off = blk[:, None] * stride_kb + (offs_n % BLOCK_SIZE)[:, None] * stride_kt + kvh * stride_kh + d[None, :]
    k = tl.load(k_ptr + off, mask=nmask[:, None], other=0.0)
    return k, tl.load(v_ptr + off, mask=nmask[:, None], other=0.0), nmask


@triton.jit
def _decode_w64_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, out_ptr, scale_log2, v_scale,
                       stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt,
                       G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       BLOCK_N: tl.constexpr, PV: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(sl_ptr + b)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    heads = kvh * G + g
    gmask = g < G
    q8, qs = _q_e4m3(q_ptr, b, heads, gmask, d, stride_qt, stride_qh)
    row_scale = qs * scale_log2
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(0, seq_len, BLOCK_N):
        k, v, nmask = _kv_tile(k_ptr, v_ptr, bt_row, n0, seq_len, kvh, d, stride_kb, stride_kt, stride_kh,
                               BLOCK_SIZE, BLOCK_N)
        qk = tl.dot(q8, tl.trans(k)) * row_scale[:, None]
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV == 8:
            acc = acc * alpha[:, None] + tl.dot((p * 256.0).to(tl.float8e4nv), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v.to(tl.float16))
        m_i = m_new
    if PV == 8:
        l_i = l_i * 256.0
    acc = acc / l_i[:, None] * v_scale
    tl.store(out_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=gmask[:, None])


@triton.jit
def _decode_tm_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, out_ptr, scale_log2, v_scale,
                      stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt,
                      G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      BLOCK_N: tl.constexpr, PV_T: tl.constexpr):
    """Tokens on the MMA's M side: S^T [BLOCK_N, G_PAD] = K q^T on e4m3 wgmma (M = tokens, N = 16 padded heads,
    K never converted), the softmax down the tokens (axis 0); P V in fp16 with V converted, either as
    O [G_PAD, D] = P V (PV_T 0: P transposed in registers, mma.sync as the engine) or as
    O^T [D, G_PAD] = V^T P^T (PV_T 1: V^T the wgmma's A, M = head_dim)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(sl_ptr + b)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    heads = kvh * G + g
    gmask = g < G
    q8, qs = _q_e4m3(q_ptr, b, heads, gmask, d, stride_qt, stride_qh)
    col_scale = qs * scale_log2
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    if PV_T:
        acc = tl.zeros([D, G_PAD], tl.float32)
    else:
        acc = tl.zeros([G_PAD, D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(0, seq_len, BLOCK_N):
        k, v, nmask = _kv_tile(k_ptr, v_ptr, bt_row, n0, seq_len, kvh, d, stride_kb, stride_kt, stride_kh,
                               BLOCK_SIZE, BLOCK_N)
        st = tl.dot(k, tl.trans(q8)) * col_scale[None, :]  # [BLOCK_N, G_PAD]
        st = tl.where(nmask[:, None], st, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(st, 0))
        alpha = tl.exp2(m_i - m_new)
        pt = tl.exp2(st - m_new[None, :])
        l_i = l_i * alpha + tl.sum(pt, 0)
        if PV_T:
            acc = acc * alpha[None, :] + tl.dot(tl.trans(v.to(tl.float16)), pt.to(tl.float16))
        else:
            acc = acc * alpha[:, None] + tl.dot(tl.trans(pt.to(tl.float16)), v.to(tl.float16))
        m_i = m_new
    if PV_T:
        out = tl.trans(acc / l_i[None, :] * v_scale)
    else:
        out = acc / l_i[:, None] * v_scale
    tl.store(out_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gmask[:, None])


def _launch(kernel, g_pad: int, q, kc, vc, tables, sl, scale, k_scale, v_scale, out, block_n, warps, stages,
            maxnreg, **variant):
    B, H, D = sl.shape[0], q.shape[1], q.shape[2]
    kvh = kc.shape[2]
    kw = {"maxnreg": maxnreg} if maxnreg else {}
    kernel[(B, kvh)](q, kc, vc, tables, sl, out, scale * _LOG2E * k_scale, v_scale,
                     q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), tables.stride(0),
                     G=H // kvh, G_PAD=g_pad, D=D, BLOCK_SIZE=kc.shape[1], BLOCK_N=block_n,
                     num_warps=warps, num_stages=stages, **variant, **kw)
    return out


def decode_tm(q, kc, vc, tables, sl, scale, k_scale, v_scale, out, pv_t: bool, block_n=128, warps=4, stages=2,
              maxnreg=None):
    return _launch(_decode_tm_kernel, 16, q, kc, vc, tables, sl, scale, k_scale, v_scale, out, block_n, warps,
                   stages, maxnreg, PV_T=int(pv_t))


def decode_w64(q, kc, vc, tables, sl, scale, k_scale, v_scale, out, pv: int, block_n=128, warps=4, stages=2,
               maxnreg=None):
    return _launch(_decode_w64_kernel, 64, q, kc, vc, tables, sl, scale, k_scale, v_scale, out, block_n, warps,
                   stages, maxnreg, PV=pv)


def compile_only() -> None:
    import re
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {"q_ptr": "*bf16", "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "bt_ptr": "*i32", "sl_ptr": "*i32",
           "out_ptr": "*bf16", "scale_log2": "fp32", "v_scale": "fp32"}
    sig.update({f"stride_{n}": "i32" for n in ("qt", "qh", "kb", "kt", "kh", "bt")})
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n.startswith("stride_")}
    for pv in (16, 8):
        for bn, stages in ((128, 2), (64, 3)):
            consts = dict(G=4, G_PAD=64, D=128, BLOCK_SIZE=16, BLOCK_N=bn, PV=pv)
            s = dict(sig, **{c: "constexpr" for c in consts})
            k = triton.compile(ASTSource(fn=_decode_w64_kernel, signature=s, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": stages})
            report(k, {"kernel": "w64", "pv": pv, "bn": bn, "stages": stages})
    for pv_t in (0, 1):
        for bn, stages in ((128, 2), (64, 3)):
            consts = dict(G=4, G_PAD=16, D=128, BLOCK_SIZE=16, BLOCK_N=bn, PV_T=pv_t)
            s = dict(sig, **{c: "constexpr" for c in consts})
            k = triton.compile(ASTSource(fn=_decode_tm_kernel, signature=s, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": stages})
            report(k, {"kernel": "tokens-on-M", "pv_t": pv_t, "bn": bn, "stages": stages})


def report(k, tag: dict) -> None:
    """One JSON line: shared memory, the MMA kinds, e4m3 conversions and cp.async copies in the PTX, registers."""
    import re

    from decode_ptx import report as ptx_report  # benchmarks/ is the script's directory
    ptx = k.asm["ptx"]
    print(json.dumps({**tag, "shared": k.metadata.shared,
                      "wgmma": sorted(set(re.findall(r"wgmma\.mma_async[a-z0-9.]*", ptx))),
                      "mma_sync": len(re.findall(r"mma\.sync", ptx)),
                      "cvt_e4m3_f16x2": len(re.findall(r"cvt\.rn\.f16x2\.e4m3x2", ptx)),
                      "cp_async": len(re.findall(r"cp\.async", ptx)),
                      **{n: v for n, v in ptx_report(k).items() if n in ("registers", "stack_bytes")}}))


def bench(cases: str) -> None:
    import triton.testing as tt

    from batchgen.engine.attention.triton_kernels import decode
    from step_breakdown import paged_tables  # benchmarks/ is the script's directory

    H, KVH, D, bs = 32, 8, 128, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    for case in cases.split(","):
        B, L = (int(v) for v in case.split("x"))
        nblk = -(-L // bs)
        sets = 3
        total = B * nblk * sets + 8
        kc = (torch.randn(total, KVH, bs, D, device="cuda", generator=g) / 4).to(torch.float8_e4m3fn).permute(0, 2, 1, 3)
        vc = (torch.randn(total, KVH, bs, D, device="cuda", generator=g) / 4).to(torch.float8_e4m3fn).permute(0, 2, 1, 3)
        tables, sl, qsl = paged_tables(B, L, bs, sets, total, g)
        q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        # fp32 reference over the dequantized cache, for the first 8 sequences
        nref = min(B, 8)
        kr = kc[tables[0][:nref, :nblk].long()].reshape(nref, nblk * bs, KVH, D)[:, :L].float() * 4.0
        vr = vc[tables[0][:nref, :nblk].long()].reshape(nref, nblk * bs, KVH, D)[:, :L].float() * 4.0
        kr = kr.repeat_interleave(H // KVH, dim=2)
        vr = vr.repeat_interleave(H // KVH, dim=2)
        s = torch.einsum("bhd,blhd->bhl", q[:nref].float(), kr) * D ** -0.5
        ref = torch.einsum("bhl,blhd->bhd", s.softmax(-1), vr)
        nbytes = B * L * KVH * D * 2
        outs = [torch.empty_like(q) for _ in range(sets)]
        variants = [("engine-f16dot", None, {}), ("engine-f16dot-r168", None, {"maxnreg": 168}),
                    ("w64-pv16", 16, {}), ("w64-pv8", 8, {}), ("w64-pv8-bn64", 8, {"block_n": 64, "stages": 3}),
                    ("w64-pv16-bn64", 16, {"block_n": 64, "stages": 3}),
                    ("tm-pv", "tm0", {}), ("tm-pvt", "tm1", {}), ("tm-pvt-bn64", "tm1", {"block_n": 64, "stages": 3}),
                    ("tm-pvt-bn64-s4", "tm1", {"block_n": 64, "stages": 4}),
                    ("tm-pv-bn64", "tm0", {"block_n": 64, "stages": 3})]
        for name, pv, kw in variants:
            def f():
                for i in range(sets):
                    if pv is None:
                        decode.paged_decode(q, kc, vc, tables[i], sl, qsl, 4096, D ** -0.5, out=outs[i],
                                            k_scale=4.0, v_scale=4.0, num_splits=1, **kw)
                    elif isinstance(pv, str):  # the tokens-on-M kernel
                        decode_tm(q, kc, vc, tables[i], sl, D ** -0.5, 4.0, 4.0, outs[i], pv == "tm1", **kw)
                    else:
                        decode_w64(q, kc, vc, tables[i], sl, D ** -0.5, 4.0, 4.0, outs[i], pv, **kw)
            tag = {"what": "attention-proto", "B": B, "L": L, "variant": name}
            try:
                f()
                torch.cuda.synchronize()
                us = tt.do_bench_cudagraph(f, rep=100, return_mode="median") * 1e3 / sets
            except Exception as e:
                print(json.dumps({**tag, "skip": str(e)[:200]}), flush=True)
                continue
            err = ((outs[0][:nref].float() - ref).norm() / ref.norm()).item()
            print(json.dumps({**tag, "us": round(us, 2), "TBps": round(nbytes / us / 1e6, 3), "rel_err": err}),
                  flush=True)
        del kc, vc
        torch.cuda.empty_cache()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="32x768,352x1100")
    ap.add_argument("--compile-only", action="store_true")
    a = ap.parse_args()
    compile_only() if a.compile_only else bench(a.cases)
