"""Fused mixture-of-experts MLP in Triton: y[t] = sum_k w[t, k] * down_e(SiLU(gate_e(x[t])) * up_e(x[t])),
e = ids[t, k].

    y = fused_moe(x, gate_up, down, ids, weights)   # x [T, H]; gate_up [E, 2I, H]; down [E, H, I];
                                                     # ids [T, k] int; weights [T, k] float32 -> y [T, H]

Five kernels and a sum, with no host sync (every size is a bound known from T alone, so a decode step is
captured in a CUDA graph):
1. moe_align: the T*k token-expert pairs (pair p = t * k + j) sorted by expert, stable, each expert's run
   padded to a multiple of BM rows, in three small kernels: _count_kernel (per chunk of pairs, its count per
   expert), _offsets_kernel (one program: the experts' padded runs, each chunk's first row per expert, and per
   block of BM rows its expert, -1 past the last, and how many of its rows hold pairs), _scatter_kernel (per
   chunk, every pair to its row). At most min(T*k, E) experts have pairs, so the rows fit
   T*k + min(T*k, E) * (BM - 1).
2. _gate_up_kernel, grid (block, I tile): the block's rows of x (gathered by token) times its expert's gate
   and up rows, SiLU(gate) * up in the epilogue (each rounded to the model dtype first, as transformers),
   stored by row into an intermediate [rows, I].
3. _down_kernel, grid (block, H tile): intermediate rows times the expert's down_proj, the result rounded to
   the model dtype and times the pair's routing weight (float32), stored by pair into [T * k, H].
4. the sum over the top k: [T, k, H] summed in float32 (torch's sum of a bf16 tensor), one rounding. Each
   pair's row is computed by one program with a fixed reduction order and no atomics anywhere, so a result
   never depends on timing (deterministic: overlapped and synchronous steps agree exactly).

Blocks past the used ones exit at once. Programs run block-major (the block index varies fastest), so the
blocks of one expert run side by side and share its weight tiles in L2. Experts with no pair get no block.
Configs (CONFIGS): BM=32 swept on an H200 (benchmarks/moe_sweep.py); the others are first guesses from vLLM's
tables for similar shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused import silu_mul
from .launch import launch_fitting


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, N, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """Chunk c of the pairs: how many pairs of it each expert has -> counts[c, :]."""
    c = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < N, other=-1).to(tl.int32)
    tl.store(counts_ptr + c * E_PAD + e, tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0))


@triton.jit
def _offsets_kernel(counts_ptr, base_ptr, block_expert_ptr, block_rows_ptr, n_chunks, max_blocks,
                    BM: tl.constexpr, E_PAD: tl.constexpr, CT: tl.constexpr):
    """One program: each expert's run of rows (padded to BM), the first row of each chunk's pairs of each
    expert -> base[c, :], and per block its expert (-1: unused) and how many of its rows hold pairs."""
    e = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], tl.int32)
    for c0 in range(0, n_chunks, CT):
        c = c0 + tl.arange(0, CT)
        tile = tl.load(counts_ptr + c[:, None] * E_PAD + e[None, :], mask=(c < n_chunks)[:, None], other=0)
        counts += tl.sum(tile, axis=0)
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    # a block's expert: the number of experts whose padded run ends at or before the block's first row
    for b0 in range(0, max_blocks, CT):
        b = b0 + tl.arange(0, CT)
        row0 = b * BM
        ex = tl.sum((ends[None, :] <= row0[:, None]).to(tl.int32), axis=1)
        filled = tl.sum(tl.where(e[None, :] == ex[:, None], starts + counts, 0), axis=1) - row0
        used = row0 < total
        tl.store(block_expert_ptr + b, tl.where(used, ex, -1), mask=b < max_blocks)
        tl.store(block_rows_ptr + b, tl.where(used, tl.minimum(filled, BM), 0), mask=b < max_blocks)
    cursor = starts
    for c0 in range(0, n_chunks, CT):
        c = c0 + tl.arange(0, CT)
        cmask = (c < n_chunks)[:, None]
        tile = tl.load(counts_ptr + c[:, None] * E_PAD + e[None, :], mask=cmask, other=0)
        tl.store(base_ptr + c[:, None] * E_PAD + e[None, :], cursor[None, :] + tl.cumsum(tile, axis=0) - tile,
                 mask=cmask)
        cursor += tl.sum(tile, axis=0)


@triton.jit
def _scatter_kernel(ids_ptr, base_ptr, sorted_ptr, N, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """Chunk c: each pair to its row, base[c, its expert] + the pairs of that expert before it in the chunk
    (so the sort is stable: within an expert, pairs keep their order)."""
    c = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < N, other=-1).to(tl.int32)
    hit = (ids[:, None] == e[None, :]).to(tl.int32)
    base = tl.load(base_ptr + c * E_PAD + e)
    dest = tl.sum(hit * (base[None, :] + tl.cumsum(hit, axis=0) - hit), axis=1)
    tl.store(sorted_ptr + dest, offs, mask=offs < N)


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, block_rows_ptr, H, I, TOPK,
                    stride_xm, stride_we, stride_wn, stride_om,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr):
    pb = tl.program_id(0)
    pn = tl.program_id(1)
    ex = tl.load(block_expert_ptr + pb)
    if ex < 0:
        return
    nrows = tl.load(block_rows_ptr + pb)
    r = tl.arange(0, BM)
    rmask = r < nrows
    pairs = tl.load(sorted_ptr + pb * BM + r, mask=rmask, other=0)
    tok = (pairs // TOPK).to(tl.int64)
    rn = pn * BN + tl.arange(0, BN)
    nmask = rn < I
    rk = tl.arange(0, BK)
    a_ptrs = x_ptr + tok[:, None] * stride_xm + rk[None, :]
    g_ptrs = w_ptr + ex.to(tl.int64) * stride_we + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]
    u_ptrs = g_ptrs + I * stride_wn
    acc_g = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, H, BK):
        kmask = (k0 + rk) < H
        a = tl.load(a_ptrs + k0, mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & nmask[None, :]
        g = tl.load(g_ptrs + k0, mask=wmask, other=0.0)
        u = tl.load(u_ptrs + k0, mask=wmask, other=0.0)
        acc_g += tl.dot(a, g, input_precision=DOT_PREC)
        acc_u += tl.dot(a, u, input_precision=DOT_PREC)
    dt = out_ptr.dtype.element_ty
    h = silu_mul(acc_g.to(dt), acc_u.to(dt))  # gate and up rounded to the model dtype, as transformers
    rows = (pb * BM + r).to(tl.int64)
    tl.store(out_ptr + rows[:, None] * stride_om + rn[None, :], h.to(dt), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _down_kernel(a_ptr, w_ptr, wt_ptr, out_ptr, sorted_ptr, block_expert_ptr, block_rows_ptr, H, I,
                 stride_am, stride_we, stride_wn, stride_om,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr):
    pb = tl.program_id(0)
    pn = tl.program_id(1)
    ex = tl.load(block_expert_ptr + pb)
    if ex < 0:
        return
    nrows = tl.load(block_rows_ptr + pb)
    r = tl.arange(0, BM)
    rmask = r < nrows
    pairs = tl.load(sorted_ptr + pb * BM + r, mask=rmask, other=0)
    rn = pn * BN + tl.arange(0, BN)
    nmask = rn < H
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + (pb * BM + r).to(tl.int64)[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + ex.to(tl.int64) * stride_we + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, I, BK):
        kmask = (k0 + rk) < I
        a = tl.load(a_ptrs + k0, mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc += tl.dot(a, w, input_precision=DOT_PREC)
    dt = out_ptr.dtype.element_ty
    wt = tl.load(wt_ptr + pairs, mask=rmask, other=0.0)
    y = acc.to(dt).to(tl.float32) * wt[:, None]  # the expert's output in the model dtype, times its weight
    out = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, y.to(dt), mask=rmask[:, None] & nmask[None, :])


# BM -> ((gate_up BN, BK, warps, stages), (down BN, BK, warps, stages)); BN of gate_up is per half
Config = tuple[tuple[int, int, int, int], tuple[int, int, int, int]]
CONFIGS: dict[int, Config] = {  # benchmarks/moe_sweep.py times others
    16: ((64, 128, 4, 4), (64, 128, 4, 4)),
    32: ((64, 128, 4, 3), (128, 128, 4, 3)),  # H200, qwen3-30b-a3b at T=256: 320 us/layer, 0.89 of the copy rate
    64: ((64, 64, 4, 3), (128, 64, 4, 3)),
}


def block_m(pairs: int, experts: int) -> int:
    """Rows per expert block: about twice the mean pairs per expert, so most experts take one block (decode:
    one read of each weight tile), 16..64 (tensor-core rows; larger prefill blocks reuse a tile more)."""
    return min(64, max(16, triton.next_power_of_2(max(1, 2 * pairs // experts))))


def max_blocks(pairs: int, experts: int, bm: int) -> int:
    """The most blocks T*k pairs can need: each expert that has pairs wastes at most BM - 1 rows of padding."""
    return (pairs + min(pairs, experts) * (bm - 1)) // bm


def moe_align(ids: torch.Tensor, experts: int, bm: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted pair ids [blocks * bm] int32, block expert [blocks] int32 (-1: unused), block rows [blocks] int32)
    for ids [T, k]; rows past a block's count are left unwritten (never read)."""
    flat = ids.reshape(-1)
    n = flat.numel()
    nb = max_blocks(n, experts, bm)
    dev = ids.device
    e_pad = triton.next_power_of_2(experts)
    chunk = max(16, min(64, 8192 // e_pad))
    chunks = triton.cdiv(n, chunk)
    counts = torch.empty(chunks, e_pad, dtype=torch.int32, device=dev)
    base = torch.empty(chunks, e_pad, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(nb * bm, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    block_rows = torch.empty(nb, dtype=torch.int32, device=dev)
    _count_kernel[(chunks,)](flat, counts, n, E_PAD=e_pad, CHUNK=chunk, num_warps=4)
    _offsets_kernel[(1,)](counts, base, block_expert, block_rows, chunks, nb, BM=bm, E_PAD=e_pad,
                          CT=max(16, min(64, 8192 // e_pad)), num_warps=8)
    _scatter_kernel[(chunks,)](flat, base, sorted_ids, n, E_PAD=e_pad, CHUNK=chunk, num_warps=4)
    return sorted_ids, block_expert, block_rows


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor, bm: int | None = None, config: Config | None = None) -> torch.Tensor:
    """bm (rows per expert block) and config ((BN, BK, warps, stages) of gate_up, then of down) override the
    defaults (block_m, CONFIGS): tests and benchmarks/moe_sweep.py."""
    T, H = x.shape
    E, I2, _ = gate_up.shape
    inter, topk = I2 // 2, ids.shape[1]
    assert gate_up.shape[2] == H and down.shape == (E, H, inter) and weights.shape == ids.shape
    assert x.stride(1) == 1 and gate_up.stride(2) == 1 and down.stride(2) == 1
    if T == 0:
        return torch.zeros_like(x)
    n = T * topk
    bm = bm or block_m(n, E)
    sorted_ids, block_expert, block_rows = moe_align(ids, E, bm)
    nb = block_expert.numel()
    (bn1, bk1, w1, s1), (bn2, bk2, w2, s2) = config or CONFIGS[bm]
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    hidden = torch.empty(nb * bm, inter, dtype=x.dtype, device=x.device)
    launch_fitting(_gate_up_kernel, (nb, triton.cdiv(inter, bn1)), w1, s1,
                   x, gate_up, hidden, sorted_ids, block_expert, block_rows, H, inter, topk,
                   x.stride(0), gate_up.stride(0), gate_up.stride(1), hidden.stride(0),
                   BM=bm, BN=bn1, BK=bk1, DOT_PREC=prec)
    out = torch.empty(n, H, dtype=x.dtype, device=x.device)
    launch_fitting(_down_kernel, (nb, triton.cdiv(H, bn2)), w2, s2,
                   hidden, down, weights.reshape(-1).float().contiguous(), out, sorted_ids, block_expert, block_rows,
                   H, inter,
                   hidden.stride(0), down.stride(0), down.stride(1), out.stride(0),
                   BM=bm, BN=bn2, BK=bk2, DOT_PREC=prec)
    return out.view(T, topk, H).sum(dim=1)
