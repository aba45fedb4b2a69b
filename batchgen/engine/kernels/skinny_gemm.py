"""Skinny GEMM for decode steps: y[M, N] = x[M, K] @ w[K, N] with M <= 64, w input-major ([in, out]).

At decode batch sizes a projection only streams its weight. On its own this kernel matches cuBLAS
(within ~2%, notes/KERNELS.md): both stream at ~3 TB/s and pay a fixed few microseconds to start and
drain. What it adds is the early start: launched with PDL (pdl.py), it prefetches the first rows of
its weight slice into L2 while the kernel before it is still finishing, then waits for it.

K may be split as well (grid = N tiles x K splits): the last program of each N tile to finish sums
the fp32 partials (a counter per tile, reset by that program), in one launch.

Fusions for the decode layer (llama.py forward_fused), measured on H100 (notes/KERNELS.md):
- gated: w is gate | up, the epilogue applies SiLU-and-mul: the activation kernel goes away (used);
- residual: y = residual + x @ w in the epilogue, in place (used where o/down take the skinny GEMM);
- silu_mul: SiLU-and-mul of x on load (slower than a separate kernel for the 8B down projection;
  kept for benchmarks).
An RMSNorm of x inside the GEMM (on load, or with its weight folded into w) measured 2.4-3x slower
than the norm kernel it saves: any use of the x tile in registers stops its loads from being
pipelined. It was removed (notes/KERNELS.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .counters import zeroed_counters
from .fused import silu_mul
from .launch import launch_fitting
from ..switches import switches


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, part_ptr, sem_ptr, M, N, K, k_per_split,
                        stride_xm, stride_wk, stride_rm, stride_ym,
                        BM: tl.constexpr, WN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                        SILU_MUL: tl.constexpr, GATED: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, DOT_PREC: tl.constexpr,
                        PREFETCH: tl.constexpr, PF_COLS: tl.constexpr, USE_PDL: tl.constexpr):
    # WN output columns per program; GATED: w is [K, 2N] (gate | up), a tile reads WN columns of each half.
    pn = tl.program_id(0)
    pk = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pn * WN + tl.arange(0, WN)
    rk = tl.arange(0, BK)
    mmask = rm < M
    nmask = rn < N
    k_lo = pk * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if PREFETCH > 0:
        # The weights do not depend on the previous kernel: pull the first PREFETCH rows of this
        # program's slice into L2 (one address per 64 columns, a 128-byte line) while it still runs.
        pr = tl.minimum(k_lo + tl.arange(0, PREFETCH), k_hi - 1).to(tl.int64)
        pj = tl.arange(0, PF_COLS)
        if GATED:  # half of the addresses in the gate half of w, half in the up half
            pc = tl.minimum(pn * WN + (pj % (PF_COLS // 2)) * 64, N - 1) + tl.where(pj >= PF_COLS // 2, N, 0)
        else:
            pc = tl.minimum(pn * WN + pj * 64, N - 1)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l",
                                  [w_ptr + pr[:, None] * stride_wk + pc[None, :]],
                                  dtype=tl.int32, is_pure=False, pack=1)
    if USE_PDL:  # see pdl.py: nothing below may run before the previous kernel has completed
        tl.extra.cuda.gdc_wait()
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BM, WN], tl.float32)
    acc_up = tl.zeros([BM, WN], tl.float32)  # GATED only
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + rk
        kmask = kk < k_hi
        w_rows = w_ptr + kk.to(tl.int64)[:, None] * stride_wk
        wmask = kmask[:, None] & nmask[None, :]
        w = tl.load(w_rows + rn[None, :], mask=wmask, other=0.0)
        amask = mmask[:, None] & kmask[None, :]
        a = tl.load(x_rows + kk[None, :], mask=amask, other=0.0)
        if SILU_MUL:
            up = tl.load(x_rows + K + kk[None, :], mask=amask, other=0.0)
            a = silu_mul(a, up).to(up.dtype)
        acc += tl.dot(a, w, input_precision=DOT_PREC)
        if GATED:
            w_up = tl.load(w_rows + N + rn[None, :], mask=wmask, other=0.0)
            acc_up += tl.dot(a, w_up, input_precision=DOT_PREC)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    ymask = mmask[:, None] & nmask[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    res_ptrs = res_ptr + rm.to(tl.int64)[:, None] * stride_rm + rn[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_up += tl.load(bias_ptr + N + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if GATED:  # on the gate and up outputs rounded to the model dtype, as HF computes them
            acc = silu_mul(acc.to(y_ptr.dtype.element_ty), acc_up.to(y_ptr.dtype.element_ty))
        if HAS_RES:
            acc += tl.load(res_ptrs, mask=ymask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        # partials laid out [SPLIT_K, BM, N]; the last split of this N tile to arrive sums them.
        part = part_ptr + rm[:, None] * N + rn[None, :]
        tl.store(part + pk * BM * N, acc, mask=ymask)
        tl.debug_barrier()  # every thread's partial store precedes the counter's release
        sem = sem_ptr + pn
        cnt = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
        if cnt == SPLIT_K - 1:
            total = tl.zeros([BM, WN], tl.float32)
            for j in range(0, SPLIT_K):
                total += tl.load(part + j * BM * N, mask=ymask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            if HAS_RES:
                total += tl.load(res_ptrs, mask=ymask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=ymask)
            tl.atomic_xchg(sem, 0, sem="relaxed", scope="gpu")


MAX_M = 64


def _prefetch_rows(rows: int | None, k_per: int, device: torch.device) -> int:
    """Power of 2, at most the program's slice; 0 where there is no early launch to hide it behind."""
    rows = switches().skinny_prefetch if rows is None else rows  # BATCHGEN_SKINNY_PREFETCH
    if rows <= 0 or not pdl.enabled(device):
        return 0
    return min(triton.next_power_of_2(rows), triton.next_power_of_2(k_per))


def default_config(M: int, N: int, K: int, sm_count: int) -> tuple[int, int, int, int, int]:
    """(BN, BK, SPLIT_K, num_warps, num_stages): enough programs for ~2 per SM, each streaming
    whole 128-column rows of w (256 bytes per row in 16-bit)."""
    BN = 128 if N % 128 == 0 else 64
    tiles = triton.cdiv(N, BN)
    split = 1
    while tiles * split < 2 * sm_count and K // (split * 2) >= 256:
        split *= 2
    return BN, 128, split, 4, 4


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, silu_mul: bool = False,
                gated: bool = False, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                config: tuple[int, int, int, int, int] | None = None, sm_count: int = 132,
                prefetch: int | None = None) -> torch.Tensor:
    """y = x @ w (+ bias) for x [M, K] and w [K, N] row-major, in x's dtype. Options:
    silu_mul  x is [M, 2K] (gate | up), SiLU-and-mul applied on load;
    gated     w is [K, 2I] (gate | up) and y = silu(x @ gate) * (x @ up), [M, I]; needs a config
              without a K split;
    residual  y = residual + x @ w (+ bias), one rounding; out=residual updates it in place."""
    M = x.shape[0]
    K, Nw = w.shape
    N = Nw // 2 if gated else Nw
    assert M <= MAX_M and x.stride(-1) == 1 and w.stride(-1) == 1 and x.shape[1] == (2 * K if silu_mul else K)
    assert residual is None or (residual.shape == (M, N) and residual.stride(-1) == 1)
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    BN, BK, split, warps, stages = config or default_config(M, Nw, K, sm_count)
    if gated and split > 1:
        raise ValueError(f"skinny_gemm: gated needs a config without a K split, got {config}")
    BM = max(16, triton.next_power_of_2(M))
    k_per = triton.cdiv(triton.cdiv(K, split), BK) * BK
    split = triton.cdiv(K, k_per)  # no empty splits
    WN = BN // 2 if gated else BN  # output columns per program
    tiles = triton.cdiv(N, WN)
    part = torch.empty((split, BM, N), dtype=torch.float32, device=x.device) if split > 1 else y
    sem = zeroed_counters("skinny_gemm", tiles, x.device) if split > 1 else y
    res = residual if residual is not None else y
    launch_fitting(
        _skinny_gemm_kernel, (tiles, split), warps, stages,
        x, w, bias if bias is not None else y, res, y, part, sem,
        M, N, K, k_per, x.stride(0), w.stride(0), res.stride(0), y.stride(0),
        BM=BM, WN=WN, BK=BK, SPLIT_K=split, SILU_MUL=silu_mul, GATED=gated,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        PREFETCH=_prefetch_rows(prefetch, k_per, x.device), PF_COLS=max(BN // 64, 2 if gated else 1),
        **pdl.launch_options(x.device))
    return y
