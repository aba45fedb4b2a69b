"""Write the new tokens' K/V into the paged cache at slot_mapping (slot < 0: padding, skipped).

An FP8 cache (float8_e4m3fn) stores codes: x / scale in fp32 (IEEE division), saturated at +-448, rounded
to nearest even: kv_fp8.quantize, bit for bit. k_scale / v_scale are plain float arguments (1.0 and unused
for other caches): a CUDA graph captures them once, and they never change after load.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kernels import pdl
from ...kernels.fused import rope_cos_sin, rotate_heads


@triton.jit
def _kv_code(x, scale, FP8: tl.constexpr):
    """x as the cache stores it, before the cast to the cache's dtype: for FP8 the e4m3 code's value."""
    if FP8:
        x = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -448.0, 448.0)
    return x


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale, v_scale,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, D_PAD)
    mask = (h[:, None] < KV_HEADS) & (d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + blk * stride_kcb + off * stride_kct + h[:, None] * stride_kch + d[None, :],
             _kv_code(k, k_scale, FP8).to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + blk * stride_vcb + off * stride_vct + h[:, None] * stride_vch + d[None, :],
             _kv_code(v, v_scale, FP8).to(v_cache_ptr.dtype.element_ty), mask=mask)


def _fp8(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert fp8 == (v_cache.dtype == torch.float8_e4m3fn), "K and V caches in one dtype"
    return fp8


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k, v: [T, kv_heads, head_dim] (last dim contiguous); caches [num_blocks, block_size, kv_heads, head_dim].
    k_scale / v_scale: an FP8 cache's scales (its codes are x / scale)."""
    T, kvh, d = k.shape
    if T == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert k_cache.shape[2] == kvh and k_cache.shape[3] == d and slot_mapping.shape[0] >= T
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping, float(k_scale), float(v_scale),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        KV_HEADS=kvh, HEAD_DIM=d, H_PAD=triton.next_power_of_2(kvh), D_PAD=triton.next_power_of_2(d),
        BLOCK_SIZE=k_cache.shape[1], FP8=_fp8(k_cache, v_cache), num_warps=4 if kvh * d >= 1024 else 1,
    )


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale, v_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_c,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    HQ: tl.constexpr, HK: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    ROT: tl.constexpr, PASS_PAD: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # see pdl.py
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos, sin, i1, i2, jm = rope_cos_sin(cs_ptr, pos, stride_c, HALF, HALF_PAD, INTERLEAVED)
    rotate_heads(q_ptr + t * stride_qt, stride_qh, HQ, HQ_PAD, cos, sin, i1, i2, jm)  # q: in place
    dt = q_ptr.dtype.element_ty
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        # k: rotated, written straight into the cache (k itself is left as it was); v: copied
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        hk = tl.arange(0, HK_PAD)
        hm = hk[:, None] < HK
        mk = hm & jm[None, :]
        kp = k_ptr + t * stride_kt + hk[:, None] * stride_kh
        kc = k_cache_ptr + blk * stride_kcb + off * stride_kct + hk[:, None] * stride_kch
        y1 = tl.load(kp + i1[None, :], mask=mk, other=0.0).to(tl.float32)
        y2 = tl.load(kp + i2[None, :], mask=mk, other=0.0).to(tl.float32)
        cdt = k_cache_ptr.dtype.element_ty
        # HF numerics: rotated k rounded to the model dtype, then stored in the cache dtype (FP8: quantized)
        tl.store(kc + i1[None, :], _kv_code((y1 * cos - y2 * sin).to(dt), k_scale, FP8).to(cdt), mask=mk)
        tl.store(kc + i2[None, :], _kv_code((y2 * cos + y1 * sin).to(dt), k_scale, FP8).to(cdt), mask=mk)
        if ROT < HEAD_DIM:  # partial rotary: the tail is copied unrotated
            e = ROT + tl.arange(0, PASS_PAD)
            me = hm & (e[None, :] < HEAD_DIM)
            tail = tl.load(kp + e[None, :], mask=me, other=0.0)
            tl.store(kc + e[None, :], _kv_code(tail, k_scale, FP8).to(cdt), mask=me)
        d = tl.arange(0, D_PAD)
        mv = hm & (d[None, :] < HEAD_DIM)
        v = tl.load(v_ptr + t * stride_vt + hk[:, None] * stride_vh + d[None, :], mask=mv, other=0.0)
        tl.store(v_cache_ptr + blk * stride_vcb + off * stride_vct + hk[:, None] * stride_vch + d[None, :],
                 _kv_code(v, v_scale, FP8).to(v_cache_ptr.dtype.element_ty), mask=mv)


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, interleaved: bool = False, k_scale: float = 1.0,
                  v_scale: float = 1.0) -> None:
    """One launch for fused_ops.apply_rope(q, k, ...) + write_kv(k, v, ...): q [T, H, D] is rotated in
    place; k [T, KVH, D] is rotated into the cache at slot_mapping (k itself is not modified), v copied.
    Rotates the first rot_dim = cos_sin_cache.shape[-1] dims; slot < 0 (padding) writes no cache.
    k_scale / v_scale: an FP8 cache's scales (as in write_kv)."""
    T, HQ, D = q.shape
    HK = k.shape[1]
    if T == 0:
        return
    rot = cos_sin_cache.shape[-1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and rot <= D and rot % 2 == 0
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    assert k_cache.shape[2] == HK and k_cache.shape[3] == D and slot_mapping.shape[0] >= T and k.shape[0] == T
    half = rot // 2
    _rope_write_kv_kernel[(T,)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, float(k_scale), float(v_scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HQ=HQ, HK=HK, HQ_PAD=triton.next_power_of_2(HQ), HK_PAD=triton.next_power_of_2(HK),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), HEAD_DIM=D, D_PAD=triton.next_power_of_2(D),
        ROT=rot, PASS_PAD=triton.next_power_of_2(max(D - rot, 1)), INTERLEAVED=interleaved,
        BLOCK_SIZE=k_cache.shape[1], FP8=_fp8(k_cache, v_cache), num_warps=4, **pdl.launch_options(q.device),
    )
