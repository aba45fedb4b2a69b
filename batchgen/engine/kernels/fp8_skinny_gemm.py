"""FP8 skinny GEMM for decode steps: y[M, N] = x[M, K] @ (w * w_scale)[N, K].T with M <= 64.

The FP8 twin of skinny_gemm.py. The weight stays in e4m3, output-major ([N, K], K contiguous: the
layout FP8 tensor cores need for both operands), one fp32 scale per output channel applied in the
epilogue. At decode sizes the GEMM only streams its weight, so the 1-byte weight halves the time.

The product is computed transposed (acc[BN, BM] = w_tile @ x_tile.T, "swap AB"): the weight's BN
rows fill the tensor core's M side, which has to be >= 64, and the few tokens its N side, which may be
as small as 16. Activations (X_MODE):
- W8A16: the e4m3 codes are widened to the model dtype (exact) and multiplied by x as it is;
- W8A8: x in e4m3 with one fp32 scale per token per 128-column group (amax / 448), the dot on FP8
  tensor cores, each group's partial product scaled as it is accumulated. x comes quantized (Fp8Rows:
  from fp8_quant.rms_norm_fp8, or from the gate_up GEMM's epilogue with out_fp8) or is quantized on
  load (the attention output into o_proj). No kernel is launched only to quantize x, and a group
  scale is finer than a token scale.
fp8.emulate_skinny() computes both in float32 on any device: the CUDA tests compare against it.

Fusions as in skinny_gemm.py: gated (w is gate | up, [2I, K]; SiLU-and-mul in the epilogue), residual
(y = residual + x @ w, in place) and a K split whose last program per N tile sums the partials (in split
order) and runs the same epilogue, gated and out_fp8 included. With
PDL (pdl.py) each program prefetches the first lines of its weight slice while the kernel before it
is still running.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .counters import zeroed_counters
from .launch import launch_fitting
from .fused import silu_mul
from ..quant.fp8 import Fp8Rows

MAX_M = 256  # the kernel's limit; Fp8Linear takes it up to BATCHGEN_FP8_DECODE_MAX_M rows (default 64)
MAX_M_QUANTIZE_ON_LOAD = 64  # above this x is quantized once (fp8_quant.quantize_fp8), not by every program
ACT_GROUP = 128  # W8A8: columns of x per activation scale; the kernel's BK is this group
E4M3_MAX = tl.constexpr(448.0)  # a constexpr global: the kernel can read it


@triton.jit
def _fp8_skinny_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, res_ptr, y_ptr, ys_ptr, part_ptr, sem_ptr,
                       M, N, K, k_per_split, stride_xm, stride_xsm, stride_wn, stride_rm, stride_ym, stride_ysm,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                       GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, X_MODE: tl.constexpr,
                       OUT_FP8: tl.constexpr, DTYPE: tl.constexpr, PREFETCH: tl.constexpr, USE_PDL: tl.constexpr):
    # X_MODE 0: x in 16 bits, the weight widened (W8A16); 1: x quantized here per 128 columns; 2: x given
    # quantized (e4m3 codes and one scale per token per 128 columns at xs). OUT_FP8 (GATED, BN = 128): y
    # written quantized the same way, codes at y and this tile's scales at ys[:, program]. DTYPE: the model's.
    pn = tl.program_id(0)
    pk = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mmask = rm < M
    nmask = rn < N
    k_lo = pk * k_per_split  # this split's columns: [k_lo, k_lo + k_per_split) and below K
    w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn  # [BN, 1]; GATED: gate rows
    up_rows = w_rows + N * stride_wn  # GATED only: the up half of w
    if PREFETCH > 0:
        # the weights do not depend on the kernel before: its first PREFETCH 128-byte lines per row to L2
        pc = tl.minimum(k_lo + tl.arange(0, PREFETCH) * 128, K - 1)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [w_rows + pc[None, :]],
                                  dtype=tl.int32, is_pure=False, pack=1)
        if GATED:
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [up_rows + pc[None, :]],
                                      dtype=tl.int32, is_pure=False, pack=1)
    if USE_PDL:  # pdl.py: nothing below may run before the previous kernel has completed
        tl.extra.cuda.gdc_wait()
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    xs_rows = xs_ptr + rm.to(tl.int64) * stride_xsm  # X_MODE 2 only
    acc = tl.zeros([BN, BM], tl.float32)
    acc_up = tl.zeros([BN, BM], tl.float32)  # GATED only
    for k0 in range(0, k_per_split, BK):  # bounds independent of the program id (the interpreter needs that)
        kk = k_lo + k0 + rk
        kmask = kk < K
        a = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)  # [BM, BK]
        wmask = nmask[:, None] & kmask[None, :]
        w = tl.load(w_rows + kk[None, :], mask=wmask, other=0.0)  # [BN, BK] e4m3
        if X_MODE == 0:
            acc += tl.dot(w.to(a.dtype), tl.trans(a))
            if GATED:
                w_up = tl.load(up_rows + kk[None, :], mask=wmask, other=0.0)
                acc_up += tl.dot(w_up.to(a.dtype), tl.trans(a))
        else:
            if X_MODE == 1:
                a32 = a.to(tl.float32)
                xs = tl.maximum(tl.max(tl.abs(a32), axis=1) / E4M3_MAX, 1e-12)  # [BM]: this group's scale per token
                # the fast division: this runs on every x tile of every program (the epilogue's is IEEE)
                aq = tl.clamp(a32 / xs[:, None], -E4M3_MAX, E4M3_MAX).to(w.dtype)
            else:
                aq = a
                xs = tl.load(xs_rows + (k_lo + k0) // BK, mask=mmask, other=0.0)
            acc += tl.dot(w, tl.trans(aq)) * xs[None, :]
            if GATED:
                w_up = tl.load(up_rows + kk[None, :], mask=wmask, other=0.0)
                acc_up += tl.dot(w_up, tl.trans(aq)) * xs[None, :]
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    acc *= tl.load(ws_ptr + rn, mask=nmask, other=0.0)[:, None]
    if GATED:
        acc_up *= tl.load(ws_ptr + N + rn, mask=nmask, other=0.0)[:, None]
    if SPLIT_K == 1:
        _epilogue(acc, acc_up, rm, rn, pn, mmask, nmask, bias_ptr, res_ptr, y_ptr, ys_ptr, N, stride_rm, stride_ym,
                  stride_ysm, GATED, HAS_BIAS, HAS_RES, OUT_FP8, DTYPE)
    else:
        # partials laid out [SPLIT_K, BM, N] (GATED: [SPLIT_K, BM, 2N], up after gate); the last split of this
        # N tile to arrive sums them in split order, so the sum does not depend on who arrives last
        wide = N * (2 if GATED else 1)
        part = part_ptr + rm[None, :] * wide + rn[:, None]
        pmask = nmask[:, None] & mmask[None, :]
        tl.store(part + pk * BM * wide, acc, mask=pmask)
        if GATED:
            tl.store(part + pk * BM * wide + N, acc_up, mask=pmask)
        tl.debug_barrier()  # every thread's partial store precedes the counter's release
        sem = sem_ptr + pn
        cnt = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
        if cnt == SPLIT_K - 1:
            total = tl.zeros([BN, BM], tl.float32)
            total_up = tl.zeros([BN, BM], tl.float32)  # GATED only
            for j in range(0, SPLIT_K):
                total += tl.load(part + j * BM * wide, mask=pmask, other=0.0, cache_modifier=".cg")
                if GATED:
                    total_up += tl.load(part + j * BM * wide + N, mask=pmask, other=0.0, cache_modifier=".cg")
            _epilogue(total, total_up, rm, rn, pn, mmask, nmask, bias_ptr, res_ptr, y_ptr, ys_ptr, N, stride_rm,
                      stride_ym, stride_ysm, GATED, HAS_BIAS, HAS_RES, OUT_FP8, DTYPE)
            tl.atomic_xchg(sem, 0, sem="relaxed", scope="gpu")


@triton.jit
def _epilogue(acc, acc_up, rm, rn, pn, mmask, nmask, bias_ptr, res_ptr, y_ptr, ys_ptr, N, stride_rm, stride_ym,
              stride_ysm, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, OUT_FP8: tl.constexpr,
              DTYPE: tl.constexpr):
    """y[rm, rn] (written transposed from the [BN, BM] tile) from the scaled products: bias, SiLU-and-mul
    (GATED), the residual, and OUT_FP8's per-token quantize over this tile's 128 columns (scales at ys[:, pn])."""
    ymask = nmask[:, None] & mmask[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]  # [BN, BM]: y is written transposed
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
        if GATED:
            acc_up += tl.load(bias_ptr + N + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
    if GATED:  # on gate and up rounded to the model dtype, as HF computes them
        acc = silu_mul(acc.to(DTYPE), acc_up.to(DTYPE))
    if HAS_RES:
        res_ptrs = res_ptr + rm.to(tl.int64)[None, :] * stride_rm + rn[:, None]
        acc += tl.load(res_ptrs, mask=ymask, other=0.0).to(tl.float32)
    if OUT_FP8:  # the model-dtype output, quantized per token over this tile's 128 columns
        acc = acc.to(DTYPE).to(tl.float32)
        ys = tl.maximum(tl.max(tl.abs(acc), axis=0) / E4M3_MAX, 1e-12)  # [BM]
        tl.store(ys_ptr + rm.to(tl.int64) * stride_ysm + pn, ys, mask=mmask)
        acc = tl.clamp(tl.math.div_rn(acc, ys[None, :]), -E4M3_MAX, E4M3_MAX)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


Fp8SkinnyConfig = tuple[int, int, int, int, int]  # BN, BK, SPLIT_K, num_warps, num_stages
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def default_config(N: int, K: int, sm_count: int, gated: bool = False) -> Fp8SkinnyConfig:
    """(BN, BK, SPLIT_K, num_warps, num_stages): 128 weight rows per program, K split until there are
    ~2 programs per SM; gated does not split by default (it can: the last split runs the epilogue; untimed)."""
    BN, BK = 128, ACT_GROUP
    tiles = triton.cdiv(N, BN)
    split = 1
    while not gated and tiles * split < 2 * sm_count and K // (split * 2) >= 1024:
        split *= 2
    return BN, BK, split, 8, 4


def fp8_skinny_gemm(x: torch.Tensor | Fp8Rows, w: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, *, gated: bool = False, residual: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, act_fp8: bool = False, out_fp8: bool = False,
                    dtype: torch.dtype = torch.bfloat16, config: Fp8SkinnyConfig | None = None,
                    sm_count: int = 132, prefetch: int = 2) -> torch.Tensor | Fp8Rows:
    """y = x @ (w * w_scale[:, None]).T (+ bias) for w [N, K] e4m3, y in `dtype` (the model's). x is
    [M, K] in that dtype (act_fp8: quantized per token per 128 columns here, on FP8 tensor cores; else the
    weight is widened) or an Fp8Rows already quantized that way (quant.fp8.Fp8Rows).
    gated: w is [2I, K] (gate | up) and y = silu(x @ gate.T) * (x @ up.T), [M, I]; with out_fp8 (needs
    BN = 128) y comes back as Fp8Rows, ready for the next FP8 GEMM;
    residual: y = residual + x @ w.T, one rounding; out=residual updates it in place;
    prefetch: 128-byte lines of each weight row a program pulls into L2 before it waits (PDL only)."""
    xq = x if isinstance(x, Fp8Rows) else None
    xt = xq.codes if xq is not None else x
    M, K = xt.shape
    Nw = w.shape[0]
    N = Nw // 2 if gated else Nw
    assert M <= MAX_M and xt.stride(-1) == 1 and w.stride(-1) == 1 and w.shape[1] == K and w_scale.numel() == Nw
    assert residual is None or (residual.shape == (M, N) and residual.stride(-1) == 1)
    BN, BK, split, warps, stages = config or default_config(N, K, sm_count, gated)
    if (act_fp8 or xq is not None or out_fp8) and BK != ACT_GROUP:
        raise ValueError(f"fp8_skinny_gemm: FP8 activations come in groups of {ACT_GROUP} columns, so BK must be "
                         f"{ACT_GROUP}, got config {config}")
    if out_fp8 and not (gated and BN == ACT_GROUP and residual is None):
        raise ValueError(f"fp8_skinny_gemm: out_fp8 needs gated, no residual and BN = {ACT_GROUP}, got {config}")
    tiles = triton.cdiv(N, BN)
    if out_fp8:
        y = torch.empty((M, N), dtype=w.dtype, device=w.device)
        ys = torch.empty((M, tiles), dtype=torch.float32, device=w.device)
    else:
        y = out if out is not None else torch.empty((M, N), dtype=dtype, device=w.device)
        ys = w_scale
    if M == 0:
        return Fp8Rows(y, ys) if out_fp8 else y
    BM = max(16, triton.next_power_of_2(M))
    k_per = triton.cdiv(triton.cdiv(K, split), BK) * BK
    split = triton.cdiv(K, k_per)  # no empty splits
    part = torch.empty((split, BM, Nw), dtype=torch.float32, device=w.device) if split > 1 else y
    sem = zeroed_counters("fp8_skinny_gemm", tiles, w.device) if split > 1 else y
    res = residual if residual is not None else y
    xs = xq.scales if xq is not None else w_scale
    pdl_opts = pdl.launch_options(w.device)
    lines = triton.next_power_of_2(max(1, min(prefetch, k_per // 128))) if pdl_opts["USE_PDL"] and prefetch > 0 else 0
    # launch_fitting: at large M (or on a GPU with less shared memory) the x tiles outgrow the decode depth
    launch_fitting(
        _fp8_skinny_kernel, (tiles, split), warps, stages,
        xt, xs, w, w_scale, bias if bias is not None else w_scale, res, y, ys, part, sem,
        M, N, K, k_per, xt.stride(0), xs.stride(0), w.stride(0), res.stride(0), y.stride(0), ys.stride(0),
        BM=BM, BN=BN, BK=BK, SPLIT_K=split, GATED=gated, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, X_MODE=2 if xq is not None else 1 if act_fp8 else 0, OUT_FP8=out_fp8,
        DTYPE=_TL_DTYPES[dtype], PREFETCH=lines, **pdl_opts)
    return Fp8Rows(y, ys) if out_fp8 else y
