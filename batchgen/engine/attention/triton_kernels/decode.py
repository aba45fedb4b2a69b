"""Paged decode attention (one query token per sequence), split over the KV length.

Grid (B, kv_heads, NUM_SPLITS). Program (b, h, s) handles every query head of kv head h (GQA: K/V
are loaded once for the whole group) over the s-th of NUM_SPLITS equal pieces of sequence b's
attended range. The piece length is computed in the kernel from the sequence's own length, so
every sequence uses all splits however loose the host's max_seq_len bound is (CUDA graphs).
With NUM_SPLITS == 1 the program writes the output directly; otherwise it writes a normalised
partial output and its log-sum-exp, and the last split of each (sequence, kv head) to finish merges
them (a counter per pair, reset by the merging program; one launch, no separate reduce kernel,
which measured slower and was removed).

No host reads of device values: the grid depends only on B, kv_heads and the host bound
max_seq_len; programs past a sequence's end exit early.

An FP8 cache (kv_fp8.py) is read as codes converted to fp16 (exact: every e4m3 value is an fp16 value; the
query is rounded to fp16 too, clamped into its range, and p is fp16, finer than bf16 on [0, 1]; with an fp32
query the dots stay fp32), its k scale folded into the softmax scale and its v scale into the output: the
same sums as attention over the dequantized K/V, with half the bytes read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kernels import pdl
from ...kernels.counters import zeroed_counters
from ...kernels.launch import TRITON_DEFAULT_STAGES, launch_fitting, sm_count

_LOG2E = 1.4426950408889634


@triton.jit
def softcap_log2(x, cap_log2):
    """Soft-capping (Gemma 2) on scores in the log2 domain: x = s * log2(e), cap_log2 = cap * log2(e); returns
    tanh(s / cap) * cap * log2(e), tanh(y) written 2 / (1 + e^(-2y)) - 1 with e^(-2y) = 2^(-2 y log2(e)) (no
    libdevice: the interpreter runs it too)."""
    return cap_log2 * (2.0 / (1.0 + tl.exp2(x * (-2.0 * 1.4426950408889634 / cap_log2))) - 1.0)


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, bt_row, offs_n, nmask, kvh, d, stride_kb, stride_kt, stride_kh,
                 stride_vb, stride_vt, stride_vh, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr):
    """The K and V rows of tokens offs_n of one kv head through the sequence's block table row: [N, HEAD_DIM]
    each, in the cache's dtype. MASKED: tokens where nmask is False read block 0 and load zeros (the tail tile);
    else every token is in range (no predicates)."""
    if MASKED:
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE).to(tl.int64)
    tok = offs_n % BLOCK_SIZE
    if MASKED:
        k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + tok[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=nmask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + tok[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                    mask=nmask[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + tok[:, None] * stride_kt + kvh * stride_kh + d[None, :])
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + tok[:, None] * stride_vt + kvh * stride_vh + d[None, :])
    return k, v


@triton.jit
def tile_scores(q, k, scale_log2, cap_log2, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr):
    """q [M, HEAD_DIM] against a K tile [N, HEAD_DIM] in q's dtype: scores [M, N] in the log2 domain, soft-capped
    when SOFTCAP (the callers mask them)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
    if SOFTCAP:
        qk = softcap_log2(qk, cap_log2)
    return qk


@triton.jit
def online_softmax_update(qk, v, m_i, l_i, acc, ROWS_MAY_BE_EMPTY: tl.constexpr, DOT_PREC: tl.constexpr):
    """A tile's scores qk [M, N] (masked ones -inf) and values v [N, HEAD_DIM] into the running row maxima m_i,
    sums l_i and unnormalised output acc [M, HEAD_DIM]; returns them updated. ROWS_MAY_BE_EMPTY: a row may have
    had no score yet (its -inf maximum must not make NaNs)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = m_new
    if ROWS_MAY_BE_EMPTY:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(qk - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _split_range(seq_len, window, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr):
    """A sequence's attended range [start, seq_len), its length, and the length of each of its
    NUM_SPLITS pieces (whole BLOCK_N tiles)."""
    start = 0
    if USE_WINDOW:
        start = tl.maximum(seq_len - window, 0)
    length = seq_len - start
    part = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    return start, length, part


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, sem_ptr,
    scale_log2, v_scale, window, cap_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt,
    G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    KV_FP8: tl.constexpr, FP8_DOT_F16: tl.constexpr, SOFTCAP: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # see pdl.py: every program waits before touching anything, the next kernel launches
        tl.extra.cuda.gdc_wait()  # once all programs are past their main loop
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start, length, part = _split_range(seq_len, window, NUM_SPLITS, BLOCK_N, USE_WINDOW)
    lo = start + s * part
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * G + g
    gmask = g < G
    if lo >= seq_len:
        if s == 0:  # empty sequence (graph padding): zeros, not garbage
            t = tl.load(qsl_ptr + b).to(tl.int64)
            tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     tl.zeros([G_PAD, HEAD_DIM], tl.float32).to(out_ptr.dtype.element_ty),
                     mask=gmask[:, None])
        return
    hi = tl.minimum(lo + part, seq_len)
    t = tl.load(qsl_ptr + b).to(tl.int64)
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    if not KV_FP8:  # the dots run in the cache's dtype; FP8 codes are converted to the query's instead
        q = q.to(k_cache_ptr.dtype.element_ty)
    elif FP8_DOT_F16:  # or to fp16 (one cvt per two codes, bf16 takes several); q clamped into fp16's range
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, bt_row, offs_n, nmask, kvh, d, stride_kb, stride_kt, stride_kh,
                            stride_vb, stride_vt, stride_vh, BLOCK_SIZE, True)
        if KV_FP8:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        qk = tl.where(nmask[None, :], tile_scores(q, k, scale_log2, cap_log2, SOFTCAP, DOT_PREC), float("-inf"))
        # a program starts at a token of its sequence: every row has a score from the first tile on
        m_i, l_i, acc = online_softmax_update(qk, v, m_i, l_i, acc, False, DOT_PREC)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    acc = acc / l_i[:, None]
    if KV_FP8:
        acc = acc * v_scale
    if NUM_SPLITS == 1:
        tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    else:
        H = tl.num_programs(1) * G
        row = (b.to(tl.int64) * H + heads) * NUM_SPLITS + s  # [G_PAD]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])
        tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=gmask)
        # the last of this (b, kvh)'s non-empty splits to finish merges them (no reduce launch):
        # barrier so every thread's partial stores precede the counter's release, acq_rel atomic
        # (one thread), L2 reads of the partials; the merging program resets the counter to 0.
        n_valid = tl.cdiv(length, part)
        tl.debug_barrier()
        sem = sem_ptr + b * tl.num_programs(1) + kvh
        cnt = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
        if cnt == n_valid - 1:
            row0 = (b.to(tl.int64) * H + heads) * NUM_SPLITS
            m_r = tl.full([G_PAD], float("-inf"), tl.float32)
            l_r = tl.zeros([G_PAD], tl.float32)
            o_r = tl.zeros([G_PAD, HEAD_DIM], tl.float32)
            for j in range(0, n_valid):
                lse_j = tl.load(part_lse_ptr + row0 + j, mask=gmask, other=0.0, cache_modifier=".cg")
                po = tl.load(part_out_ptr + (row0 + j)[:, None] * HEAD_DIM + d[None, :], mask=gmask[:, None],
                             other=0.0, cache_modifier=".cg")
                m_n = tl.maximum(m_r, lse_j)
                a_r = tl.exp2(m_r - m_n)
                w_j = tl.exp2(lse_j - m_n)
                o_r = o_r * a_r[:, None] + po * w_j[:, None]
                l_r = l_r * a_r + w_j
                m_r = m_n
            tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     (o_r / l_r[:, None]).to(out_ptr.dtype.element_ty), mask=gmask[:, None])
            tl.atomic_xchg(sem, 0, sem="relaxed", scope="gpu")


# FP8 caches: dots in fp16, not the query's bf16 (e4m3 -> fp16 is one cvt per two codes, -> bf16 several). H200,
# 8B heads, us per layer: B=32 L=768 25.5 against 29.5; B=352 L=1100 347 against 363. Transposing the dots (tokens
# on the tensor core's M side) measured slower for both cache dtypes (32.7 / 42.8 us at B=32) and was dropped.
FP8_DOT_F16 = True
def choose_num_splits(batch: int, kv_heads: int, max_len: int, device: torch.device,
                      block_n: int, programs_per_sm: int = 2, min_part: int = 128) -> int:
    """Host-only heuristic: split only when batch * kv_heads programs leave the GPU short of about
    programs_per_sm per SM (power of 2, rounded down), pieces of at least min_part tokens.
    H100, llama heads 32/8, ctx 768, bf16 (notes/KERNELS.md): B=8 -> 4, B=16 -> 2, B>=32 -> 1 measured best;
    splitting at B=32 (S=4, the old choice) cost 15% (46.2 vs 39.3 us)."""
    base = max(batch * kv_heads, 1)
    want = max(programs_per_sm * sm_count(device) // base, 1)
    cap = max(-(-max_len // max(min_part, block_n)), 1)
    n = max(1, min(want, cap, 64))
    return 1 << (n.bit_length() - 1)  # power of 2, rounded down (fewer compiled variants)


# FP8 caches at large batches: the kernel (205 registers a thread, two programs an SM) is bound by its arithmetic
# (notes/KERNELS.md), so cap the registers at 168 for a third program an SM, with 3 stages. H200, 8B heads,
# BLOCK_N 128, us per layer: B=352 L=1100 290 against 347; B=32 L=768 26.0 against 25.4 (too few programs to fill
# a third slot), so the cap only applies once the grid holds more than FP8_CAP_MIN_WAVES two-program waves.
FP8_REGISTER_CAP = 168
FP8_CAP_MIN_WAVES = 2


def fp8_register_cap(programs: int, device: torch.device) -> tuple[int | None, int | None]:
    """(maxnreg, num_stages) for the FP8-cache decode kernel with `programs` programs: the cap, or (None, None)."""
    if programs > FP8_CAP_MIN_WAVES * 2 * sm_count(device):
        return FP8_REGISTER_CAP, 3
    return None, None


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_seq_len: int, scale: float,
                 window: int | None = None, out: torch.Tensor | None = None,
                 num_splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
                 softcap: float = 0.0, fp8_dot_f16: bool | None = None, maxnreg: int | None = None) -> torch.Tensor:
    """q: [T, H, D] with sequence b's query at row query_start_loc[b]; returns out [T, H, D] (rows of
    sequences b < B written; other rows untouched). max_seq_len: host upper bound of seq_lens.
    With num_splits > 1 the last split program of each (sequence, kv head) merges the partial results.
    k_scale / v_scale: an FP8 cache's scales (read value = code * scale); ignored for other caches.
    softcap > 0: scores soft-capped, tanh(s / softcap) * softcap (0: off, the kernels of every other model).
    fp8_dot_f16: an FP8 cache's dots in fp16 rather than the query's dtype (None: FP8_DOT_F16).
    maxnreg: a register cap per thread (sweeps: the FP8 kernel at BLOCK_N 128 takes ~205, two programs an SM)."""
    T, H, D = q.shape
    B = seq_lens.shape[0]
    nb, bs, kvh, d2 = k_cache.shape
    assert D == d2 and H % kvh == 0 and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    G = H // kvh
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    fp32 = (q.dtype if kv_fp8 else k_cache.dtype) == torch.float32  # the dots' dtype
    if not kv_fp8:
        k_scale = v_scale = 1.0
    if block_n is None:  # H100 sweep (notes/KERNELS.md): 128 tokens x 2 stages, 4 warps for 16-bit caches;
        # head_dim 256 (Gemma) halves the tile so K and V stages fit shared memory (2 x 2 x 64 x 256 x 2 B = 128 KiB)
        block_n = (16 if fp32 else 64) if D > 128 else (32 if fp32 else 128)
    if num_warps is None:
        num_warps = 4
    max_len = min(max_seq_len, window) if window else max_seq_len
    if num_splits is None:
        num_splits = choose_num_splits(B, kvh, max_len, q.device, block_n)
    if maxnreg is None and num_stages is None and kv_fp8 and not fp32 and D <= 128 and q.is_cuda:
        maxnreg, num_stages = fp8_register_cap(B * kvh * num_splits, q.device)
    if num_stages is None and not fp32:
        num_stages = 2
    use_window = bool(window)
    if num_splits > 1:
        part_out = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    sem = zeroed_counters("decode", B * kvh, q.device, 1 << 14) if num_splits > 1 else seq_lens
    launch_fitting(
        _decode_split_kernel, (B, kvh, num_splits), num_warps, num_stages or TRITON_DEFAULT_STAGES,
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        out, part_out, part_lse, sem,
        scale * _LOG2E * k_scale, float(v_scale), window or 0, float(softcap) * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        G=G, G_PAD=max(16, triton.next_power_of_2(G)), HEAD_DIM=D, BLOCK_SIZE=bs,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, USE_WINDOW=use_window,
        DOT_PREC="ieee" if fp32 else "tf32", KV_FP8=kv_fp8,
        FP8_DOT_F16=kv_fp8 and not fp32 and (FP8_DOT_F16 if fp8_dot_f16 is None else fp8_dot_f16),
        SOFTCAP=softcap > 0, **pdl.launch_options(q.device), **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    return out
