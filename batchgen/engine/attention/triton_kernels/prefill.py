"""Paged varlen attention for prefill chunks and mixed steps.

Each sequence b has q_len = qsl[b+1] - qsl[b] new tokens at absolute positions
[seq_len - q_len, seq_len); query i attends causally to cached positions [0, pos_i] (and, with a
sliding window w, only to positions > pos_i - w), reading K/V from the paged cache through the
block table (the new tokens' K/V must already be written).

A program handles BLOCK_Q consecutive query tokens of one sequence and all G query heads of one kv
head (rows = BLOCK_Q * G_PAD, flattened token-major), so K/V tiles are loaded once per GQA group.
The grid is (T // BLOCK_Q + B, kv_heads): an upper bound of the number of q tiles over all
sequences, computed from host shapes only; a program finds its sequence by binary search over
query_start_loc and exits if it lies beyond its sequence's tiles (CUDA-graph friendly).

An FP8 cache is read as in decode.py: codes converted to the query's dtype, the k scale folded into the
softmax scale, the v scale into the output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kernels.launch import TRITON_DEFAULT_STAGES, launch_fitting
from .decode import load_kv_tile, online_softmax_update, tile_scores

_LOG2E = 1.4426950408889634


@triton.jit
def _find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    # largest b with qsl[b] // BLOCK_Q + b <= tile
    lo = tile * 0  # int32 tensors (num_seqs may arrive as a constexpr 1)
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        v = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if v <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
    scale_log2, v_scale, window, num_seqs, cap_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt,
    G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    KV_FP8: tl.constexpr, SOFTCAP: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    b = _find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    local = tile - (q_start // BLOCK_Q + b)
    if local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len  # cached tokens before this step's queries

    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    r = tl.arange(0, BLOCK_M)
    qi = local * BLOCK_Q + r // G_PAD  # query index within the sequence
    gi = r % G_PAD
    row_ok = (qi < q_len) & (gi < G)
    head = kvh * G + gi
    pos = ctx + qi  # absolute position of each row's query
    d = tl.arange(0, HEAD_DIM)
    tok = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    if not KV_FP8:  # the dots run in the cache's dtype; FP8 codes are converted to the query's instead
        q = q.to(k_cache_ptr.dtype.element_ty)

    hi = tl.minimum(seq_len, ctx + tl.minimum((local + 1) * BLOCK_Q, q_len))
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx + local * BLOCK_Q - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    # tiles entirely below every row's causal limit need no mask (first query of the tile sees [0, ctx+local*BLOCK_Q])
    full_hi = ctx + local * BLOCK_Q + 1
    if USE_WINDOW:
        full_hi = lo  # keep it simple: mask every tile when windowed
    full_hi = lo + ((full_hi - lo) // BLOCK_N) * BLOCK_N
    for n0 in range(lo, full_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, bt_row, offs_n, offs_n < hi, kvh, d, stride_kb, stride_kt,
                            stride_kh, stride_vb, stride_vt, stride_vh, BLOCK_SIZE, False)
        if KV_FP8:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        qk = tile_scores(q, k, scale_log2, cap_log2, SOFTCAP, DOT_PREC)
        m_i, l_i, acc = online_softmax_update(qk, v, m_i, l_i, acc, False, DOT_PREC)
    for n0 in range(full_hi, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, bt_row, offs_n, nmask, kvh, d, stride_kb, stride_kt, stride_kh,
                            stride_vb, stride_vt, stride_vh, BLOCK_SIZE, True)
        if KV_FP8:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        qk = tile_scores(q, k, scale_log2, cap_log2, SOFTCAP, DOT_PREC)
        allowed = nmask[None, :] & (offs_n[None, :] <= pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (offs_n[None, :] > pos[:, None] - window)
        # padded rows, and rows whose window starts past this tile, have no score here yet
        m_i, l_i, acc = online_softmax_update(tl.where(allowed, qk, float("-inf")), v, m_i, l_i, acc, True, DOT_PREC)
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if KV_FP8:
        acc = acc * v_scale
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _default_tiles(G_PAD: int, fp32: bool, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N, num_warps)."""
    if fp32:  # head_dim 256 (Gemma): a narrower K/V tile keeps three stages within shared memory
        return (32, 16, 4) if head_dim > 128 else (32, 32, 4)
    if head_dim > 128:  # Gemma's 256: 8 warps keep the [64, 256] fp32 accumulator at 64 registers a thread
        return 64, 32, 8  # (FlashAttention-2's choice for head_dim 256; not yet swept on a GPU here)
    return 64, 64, 4


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                  window: int | None = None, out: torch.Tensor | None = None,
                  block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
                  softcap: float = 0.0) -> torch.Tensor:
    """q: [T, H, D] flat varlen queries (sequence b at rows qsl[b]:qsl[b+1]); returns out [T, H, D].
    k_scale / v_scale: an FP8 cache's scales (read value = code * scale); ignored for other caches.
    softcap > 0: scores soft-capped, tanh(s / softcap) * softcap (0: off)."""
    T, H, D = q.shape
    B = seq_lens.shape[0]
    nb, bs, kvh, d2 = k_cache.shape
    assert D == d2 and H % kvh == 0 and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    G = H // kvh
    G_PAD = triton.next_power_of_2(G)
    if out is None:
        out = torch.empty_like(q)
    if B == 0 or T == 0:
        return out
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    fp32 = (q.dtype if kv_fp8 else k_cache.dtype) == torch.float32  # the dots' dtype
    if not kv_fp8:
        k_scale = v_scale = 1.0
    dm, dn, dw = _default_tiles(G_PAD, fp32, D)
    block_m = block_m or dm
    block_n = block_n or dn
    num_warps = num_warps or dw
    block_m = max(block_m, 16, G_PAD)
    block_q = block_m // G_PAD
    grid = (T // block_q + B, kvh)
    launch_fitting(
        _prefill_kernel, grid, num_warps, num_stages or TRITON_DEFAULT_STAGES,
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        scale * _LOG2E * k_scale, float(v_scale), window or 0, B, float(softcap) * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        G=G, G_PAD=G_PAD, HEAD_DIM=D, BLOCK_SIZE=bs, BLOCK_Q=block_q, BLOCK_N=block_n,
        USE_WINDOW=bool(window), DOT_PREC="ieee" if fp32 else "tf32", KV_FP8=kv_fp8, SOFTCAP=softcap > 0,
    )
    return out
