"""Triton kernels behind batchgen.engine.fused_ops (RMSNorm [+ residual add], SiLU-and-mul, RoPE)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, n_rows, N, eps,
                     stride_x, stride_r, stride_o, stride_ro,
                     BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_RES: tl.constexpr, OFFSET: tl.constexpr,
                     USE_PDL: tl.constexpr):
    if USE_PDL:  # see pdl.py: wait for the previous kernel, then let the next one launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    dtype = x.dtype
    x = x.to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dtype)  # the residual stream is kept in the model dtype (as in HF)
        tl.store(res_out_ptr + rows64[:, None] * stride_ro + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, 1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    if OFFSET:  # Gemma: x * rstd * (1 + w) all in fp32, rounded once
        h = x * rstd[:, None]
        w = w + 1.0
    else:  # HF Llama: normalise in fp32, cast, then scale by weight
        h = (x * rstd[:, None]).to(dtype).to(tl.float32)
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], (h * w[None, :]).to(out_ptr.dtype.element_ty),
             mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
             out_dtype: torch.dtype, offset: bool = False):
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, N), dtype=out_dtype, device=x.device)
    BLOCK_N = triton.next_power_of_2(N)
    ROWS = max(1, min(16, 2048 // BLOCK_N))
    num_warps = 8 if BLOCK_N >= 4096 else 4 if BLOCK_N >= 1024 else 2
    if residual is not None:
        r2 = residual.reshape(-1, N)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res_out = torch.empty_like(x2)
    else:
        r2 = res_out = x2
    if rows:
        _rms_norm_kernel[(triton.cdiv(rows, ROWS),)](
            x2, r2, weight, out, res_out, rows, N, eps,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            BLOCK_N=BLOCK_N, ROWS=ROWS, HAS_RES=residual is not None, OFFSET=offset, num_warps=num_warps,
            **pdl.launch_options(x.device))
    out = out.view(x.shape)
    if residual is not None:
        return out, res_out.view(x.shape)
    return out


@triton.jit
def silu_mul(gate, up):
    """HF's SiLU-and-mul on gate and up in the model dtype: act(gate) rounded to that dtype, then
    times up, in fp32 (the caller rounds or feeds it on)."""
    g = gate.to(tl.float32)
    return (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32) * up.to(tl.float32)


@triton.jit
def gelu_tanh_mul(gate, up):
    """HF's gelu_pytorch_tanh(gate) * up (Gemma's GeGLU), rounded like silu_mul: 0.5 x (1 + tanh(u)) is
    x * sigmoid(2u), u = sqrt(2 / pi) * (x + 0.044715 x^3)."""
    g = gate.to(tl.float32)
    u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    return (g / (1.0 + tl.exp(-2.0 * u))).to(gate.dtype).to(tl.float32) * up.to(tl.float32)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_o, BLOCK: tl.constexpr, GELU: tl.constexpr,
                     USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0)
    if GELU:
        y = gelu_tanh_mul(g, u)
    else:
        y = silu_mul(g, u)
    tl.store(out_ptr + row * stride_o + cols, y.to(g.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """silu(gate) * up, or with gelu=True gelu_tanh(gate) * up; x is gate | up on its last dim."""
    I2 = x.shape[-1]
    I = I2 // 2
    x2 = x.reshape(-1, I2)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, I), dtype=x.dtype, device=x.device)
    BLOCK = min(1024, triton.next_power_of_2(I))
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(I, BLOCK))](x2, out, I, x2.stride(0), out.stride(0), BLOCK=BLOCK,
                                                       GELU=gelu, num_warps=4, **pdl.launch_options(x.device))
    return out.view(*x.shape[:-1], I)


@triton.jit
def rope_cos_sin(cs_ptr, pos, stride_c, HALF: tl.constexpr, HALF_PAD: tl.constexpr, INTERLEAVED: tl.constexpr):
    """RoPE at position pos: cos and sin [1, HALF_PAD] (fp32), the lanes i1 / i2 rotated as pairs
    (neox halves or interleaved), and the lane mask."""
    j = tl.arange(0, HALF_PAD)
    jm = j < HALF
    cos = tl.load(cs_ptr + pos * stride_c + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * stride_c + HALF + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    if INTERLEAVED:
        i1 = 2 * j
        i2 = 2 * j + 1
    else:
        i1 = j
        i2 = j + HALF
    return cos, sin, i1, i2, jm


@triton.jit
def rotate_heads(ptr, stride_h, H: tl.constexpr, H_PAD: tl.constexpr, cos, sin, i1, i2, jm):
    """Rotate the H heads at ptr (one token) in place: fp32 math, rounded once to their dtype."""
    h = tl.arange(0, H_PAD)
    m = (h[:, None] < H) & jm[None, :]
    p1 = ptr + h[:, None] * stride_h + i1[None, :]
    p2 = ptr + h[:, None] * stride_h + i2[None, :]
    x1 = tl.load(p1, mask=m, other=0.0)
    x2 = tl.load(p2, mask=m, other=0.0)
    dt = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(dt), mask=m)
    tl.store(p2, (x2 * cos + x1 * sin).to(dt), mask=m)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
                 HQ: tl.constexpr, HK: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr, INTERLEAVED: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos, sin, i1, i2, jm = rope_cos_sin(cache_ptr, pos, stride_c, HALF, HALF_PAD, INTERLEAVED)
    rotate_heads(q_ptr + t * stride_qt, stride_qh, HQ, HQ_PAD, cos, sin, i1, i2, jm)
    rotate_heads(k_ptr + t * stride_kt, stride_kh, HK, HK_PAD, cos, sin, i1, i2, jm)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
               interleaved: bool) -> None:
    T, HQ, D = q.shape
    HK = k.shape[1]
    rot = cos_sin_cache.shape[-1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and k.shape[0] == T and rot <= D and q.dtype == k.dtype
    if T == 0:
        return
    half = rot // 2
    _rope_kernel[(T,)](q, k, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                       cos_sin_cache.stride(0), HQ=HQ, HK=HK, HQ_PAD=triton.next_power_of_2(HQ),
                       HK_PAD=triton.next_power_of_2(HK), HALF=half, HALF_PAD=triton.next_power_of_2(half),
                       INTERLEAVED=interleaved, num_warps=4)
