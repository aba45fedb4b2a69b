"""FP8 GEMM for steps above decode size: y[M, N] = (xq * xs)[M, K] @ (w * ws)[N, K].T on FP8 tensor cores.

The numerics of torch._scaled_mm with row-wise scales (and of Fp8Linear's float32 emulation): x quantized
per token (fp8_quant.quantize_fp8, per_group=False: one fp32 scale a row), the weight per output channel,
the dot accumulated in fp32 and both scales applied once in the epilogue. Why not _scaled_mm itself: on the
H200 this kernel is 1.15-1.6x faster on the 8B shape's projections at 128 rows and within 10% either way at
352 and above, about even over a layer (benchmarks/results/2026-12-02-h200-fp8-gemm-big.jsonl); its tiles and
epilogues are ours to tune and fuse (the residual epilogue serves Fp8Linear.add_to at any size).

Tiles BM x BN over the output, grouped GROUP_M tiles down M so neighbouring programs share weight tiles in
L2; K in BK = 128 steps, both operands K-contiguous (the layout FP8 wgmma reads). Epilogues: bias, and
residual (y = residual + x @ w.T, in place: o_proj / down_proj add into the residual stream).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .launch import launch_fitting, sm_count as device_sm_count

Fp8GemmConfig = tuple[int, int, int, int, int, int]  # BM, BN, BK, GROUP_M, num_warps, num_stages


@triton.jit
def _fp8_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, res_ptr, y_ptr, M, N, K,
                     stride_xm, stride_wn, stride_rm, stride_ym,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pm = first_m + (pid % in_group) % group_m
    pn = (pid % in_group) // group_m
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    # rows past the edge read the last row (no load masks on M / N; their results are not stored)
    x_ptrs = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn + rk[None, :]
    if USE_PDL:  # pdl.py: nothing below may run before the previous kernel has completed
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            kmask = (k0 + rk) < K
            a = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
        x_ptrs += BK
        w_ptrs += BK
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    mmask = rm < M
    nmask = rn < N
    xs = tl.load(xs_ptr + rm, mask=mmask, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=nmask, other=0.0)
    acc = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    ymask = mmask[:, None] & nmask[None, :]
    if HAS_RES:  # the product rounded to the model dtype first, as residual.add_(x @ w.T) would
        acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.load(res_ptr + rm.to(tl.int64)[:, None] * stride_rm + rn[None, :], mask=ymask,
                       other=0.0).to(tl.float32)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=ymask)


# (BM, BN, num_warps, TFLOP/s of one such program on one SM): H200, the 8B shape's projections, x given quantized
# (benchmarks/results/2026-12-04-h200-fp8-stream-k.jsonl, the tile-a-program rows)
_TILES = ((64, 128, 4, 5.9), (128, 128, 8, 9.4), (128, 256, 8, 11.3))


def default_config(M: int, N: int, K: int, sm_count: int = 132) -> Fp8GemmConfig:
    """The tiles whose waves take least time: ceil(tiles / SMs) waves, each one tile's FLOPs at its rate (_TILES;
    ties go to the larger tile). Between decode and prefill sizes the tile count decides: qkv_proj at 256 rows
    takes 14.3 us on 128 x 128 tiles (96, one wave) against 23.2 on 128 x 256 (48: one wave too, each tile twice
    the work); gate_up_proj at 128 rows 36.6 on 128 x 256 (112 tiles) against 55.4 on 64 x 128 (448: four
    waves). On the 8B shape this picks the sweep's fastest tiles, or ones within 5% of them, at every measured
    size from 128 to 8192 rows. Stages: 5 on 128-column tiles, 4 on 128 x 256 up to 512 rows, 3 above."""
    def waves_time(tile: tuple[int, int, int, float]) -> float:
        bm, bn, _, rate = tile
        waves = triton.cdiv(triton.cdiv(M, bm) * triton.cdiv(N, bn), sm_count)
        return waves * bm * bn / rate
    bm, bn, warps, _ = min(reversed(_TILES), key=waves_time)
    return bm, bn, 128, 8, warps, 5 if bn == 128 else 4 if M <= 512 else 3


def fp8_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
             bias: torch.Tensor | None = None, *, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16,
             config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """y = (xq * xs) @ (w * ws[:, None]).T (+ bias) in `dtype`. xq [M, K] e4m3 with xs [M] or [M, 1] fp32
    (one scale a row), w [N, K] e4m3 with ws [N] fp32; residual: y = residual + the product, rounded once
    each (out=residual updates it in place)."""
    M, K = xq.shape
    N = w.shape[0]
    assert xq.stride(-1) == 1 and w.stride(-1) == 1 and w.shape[1] == K and ws.numel() == N and xs.numel() == M
    assert residual is None or (residual.shape == (M, N) and residual.stride(-1) == 1)
    y = out if out is not None else torch.empty((M, N), dtype=dtype, device=w.device)
    if M == 0:
        return y
    BM, BN, BK, group, warps, stages = config or default_config(M, N, K, device_sm_count(w.device))
    res = residual if residual is not None else y
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    launch_fitting(_fp8_gemm_kernel, grid, warps, stages, xq, xs, w, ws, bias if bias is not None else ws, res, y,
                   M, N, K, xq.stride(0), w.stride(0), res.stride(0), y.stride(0),
                   BM=BM, BN=BN, BK=BK, GROUP_M=group, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                   EVEN_K=K % BK == 0, **pdl.launch_options(w.device))
    return y
