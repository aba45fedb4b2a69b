"""Activation quantization kernels for the FP8 GEMMs: RMSNorm with its output quantized, and plain rows.

rms_norm_fp8: for the FP8 decode GEMM (kernels/fp8_skinny_gemm.py).
In an FP8 decode layer the norm before qkv_proj and gate_up_proj writes e4m3 codes and one fp32 scale
per token per 128 columns (quant.fp8.Fp8Rows) instead of 16-bit rows: the GEMM after it reads half the
activation bytes and quantizes nothing itself. The values are quantize_activation_groups(rms_norm(x)):
the norm rounded to the model dtype exactly as fused.rms_norm writes it, then quantized.

rms_norm_quantize_fp8: the same for the FP8 GEMM above decode size (kernels/fp8_gemm.py): the optional residual
add, the norm (Llama's or Gemma's rounding) and one scale per token in one launch, bit for bit
quantize_fp8(fused.rms_norm(x [+ residual]), per_group=False): the 16-bit norm output is never written.

quantize_fp8: x -> e4m3 codes with one scale per token (torch._scaled_mm's row-wise recipe,
quant.fp8.quantize_activation) or per token per 128 columns (Fp8Rows), in one launch where the torch
ops take five (abs, amax, divide, clamp, cast) and a float32 copy of x.

act_and_mul_quantize_fp8: down_proj's input above decode size, SiLU(gate) * up (or Gemma's GeGLU) of the
gate_up GEMM's output as fused.silu_and_mul writes it in the model dtype, quantized per token like
quantize_fp8: one launch for the two, and the [M, I] 16-bit product is never written or read back.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .fused import gelu_tanh_mul, silu_mul
from ..quant.fp8 import Fp8Rows

GROUP = 128
E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def _rms_norm_fp8_kernel(x_ptr, w_ptr, q_ptr, s_ptr, N, eps, stride_x, stride_q, stride_s,
                         GROUPS: tl.constexpr, GROUP_N: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # pdl.py: wait for the previous kernel, then let the next one launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GROUPS)
    c = tl.arange(0, GROUP_N)
    cols = g[:, None] * GROUP_N + c[None, :]  # [GROUPS, 128]: the row as its quantization groups
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    xf = x.to(tl.float32)
    var = tl.sum(tl.sum(xf * xf, 1), 0) / N
    h = (xf * (1.0 / tl.sqrt(var + eps))).to(dtype).to(tl.float32)  # as fused._rms_norm_kernel rounds
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (h * w).to(dtype).to(tl.float32)  # the 16-bit norm output, then its groups quantized
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(y), 1), E4M3_MAX), 1e-12)  # [GROUPS]; IEEE: torch's codes
    codes = tl.clamp(tl.math.div_rn(y, scale[:, None]), -E4M3_MAX, E4M3_MAX)
    tl.store(q_ptr + row * stride_q + cols, codes.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_s + g, scale, mask=g * GROUP_N < N)


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Fp8Rows:
    """rms_norm(x) * weight for x [M, N] (16-bit, rows contiguous), as Fp8Rows."""
    M, N = x.shape
    assert x.stride(-1) == 1 and weight.numel() == N
    groups = triton.cdiv(N, GROUP)
    codes = torch.empty((M, N), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((M, groups), dtype=torch.float32, device=x.device)
    if M:
        _rms_norm_fp8_kernel[(M,)](x, weight, codes, scales, N, eps, x.stride(0), codes.stride(0), scales.stride(0),
                                   GROUPS=triton.next_power_of_2(groups), GROUP_N=GROUP,
                                   num_warps=8 if N >= 4096 else 4, **pdl.launch_options(x.device))
    return Fp8Rows(codes, scales)


@triton.jit
def _row_scale_codes(x):
    """A row (float32, any 2-D shape) with one scale: amax / 448 (at least 1e-12) and its e4m3 code values.
    IEEE divisions: torch's codes (quant.fp8.quantize_activation), bit for bit."""
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.max(tl.abs(x), 1), 0), E4M3_MAX), 1e-12)
    return scale, tl.clamp(tl.math.div_rn(x, scale), -E4M3_MAX, E4M3_MAX)


@triton.jit
def _rms_norm_quantize_kernel(x_ptr, r_ptr, w_ptr, res_out_ptr, q_ptr, s_ptr, N, eps,
                              stride_x, stride_r, stride_ro, stride_q,
                              BLOCK_N: tl.constexpr, HAS_RES: tl.constexpr, OFFSET: tl.constexpr,
                              USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    # [1, BLOCK_N] with fused.rms_norm's BLOCK_N and warps: a row spread over the threads as there, so its sum
    # of squares adds in the same order; the arithmetic below is fused._rms_norm_kernel's, op for op
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    x = x.to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dtype)  # the residual stream in the model dtype
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, 1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if OFFSET:  # Gemma: x * rstd * (1 + w) in fp32, rounded once
        h = x * rstd[:, None]
        w = w + 1.0
    else:  # Llama: normalised in fp32, rounded, then scaled by the weight
        h = (x * rstd[:, None]).to(dtype).to(tl.float32)
    y = (h * w).to(dtype).to(tl.float32)  # the norm's 16-bit output; the padding is 0
    scale, codes = _row_scale_codes(y)
    tl.store(s_ptr + row, scale)
    # 8 codes a thread, as the 16-bit loads: left to itself the compiler lays the whole row out for 16-byte code
    # stores (16 a thread), and the sum of squares above adds in another order than fused.rms_norm's
    q_cols = tl.max_contiguous(cols, [1, 8])
    tl.store(q_ptr + row * stride_q + q_cols, codes.to(q_ptr.dtype.element_ty), mask=mask)


def rms_norm_quantize_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                          offset: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [M, N] (16-bit) -> (e4m3 [M, N], fp32 scales [M, 1], x + residual or None): the codes and scales of
    quantize_fp8(h, per_group=False) for h, new_residual = fused.rms_norm(x, weight, eps, residual, offset=offset),
    bit for bit, and that new_residual."""
    M, N = x.shape
    assert weight.numel() == N and (residual is None or residual.shape == x.shape)
    x = x if x.stride(-1) == 1 else x.contiguous()
    codes = torch.empty((M, N), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if residual is not None:
        r = residual if residual.stride(-1) == 1 else residual.contiguous()
        res_out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        r = res_out = x
    if M:
        block_n = triton.next_power_of_2(N)
        warps = 8 if block_n >= 4096 else 4 if block_n >= 1024 else 2  # fused.rms_norm's: its reduction order
        _rms_norm_quantize_kernel[(M,)](x, r, weight, res_out, codes, scales, N, eps,
                                        x.stride(0), r.stride(0), res_out.stride(0), codes.stride(0),
                                        BLOCK_N=block_n, HAS_RES=residual is not None, OFFSET=offset,
                                        num_warps=warps, **pdl.launch_options(x.device))
    return codes, scales, res_out if residual is not None else None


@triton.jit
def _quantize_fp8_kernel(x_ptr, q_ptr, s_ptr, N, stride_x, stride_q, stride_s,
                         GROUPS: tl.constexpr, GROUP_N: tl.constexpr, PER_GROUP: tl.constexpr,
                         USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GROUPS)
    c = tl.arange(0, GROUP_N)
    cols = g[:, None] * GROUP_N + c[None, :]
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if PER_GROUP:
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), 1), E4M3_MAX), 1e-12)  # IEEE divisions: torch's codes, bit for bit
        codes = tl.clamp(tl.math.div_rn(x, scale[:, None]), -E4M3_MAX, E4M3_MAX)
        tl.store(s_ptr + row * stride_s + g, scale, mask=g * GROUP_N < N)
    else:  # one scale for the row
        scale, codes = _row_scale_codes(x)
        tl.store(s_ptr + row * stride_s, scale)
    tl.store(q_ptr + row * stride_q + cols, codes.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_fp8(x: torch.Tensor, per_group: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (rows contiguous) -> (e4m3 [M, K], fp32 scales [M, 1], or [M, ceil(K / 128)] per_group):
    quant.fp8.quantize_activation's and quantize_activation_groups' codes and scales."""
    M, K = x.shape
    assert x.stride(-1) == 1
    groups = triton.cdiv(K, GROUP)
    codes = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((M, groups if per_group else 1), dtype=torch.float32, device=x.device)
    if M:
        _quantize_fp8_kernel[(M,)](x, codes, scales, K, x.stride(0), codes.stride(0), scales.stride(0),
                                   GROUPS=triton.next_power_of_2(groups), GROUP_N=GROUP, PER_GROUP=per_group,
                                   num_warps=8 if K >= 4096 else 4, **pdl.launch_options(x.device))
    return codes, scales


@triton.jit
def _act_mul_quantize_kernel(x_ptr, q_ptr, s_ptr, I, stride_x, stride_q, stride_s,
                             GROUPS: tl.constexpr, GROUP_N: tl.constexpr, GELU: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GROUPS)
    c = tl.arange(0, GROUP_N)
    cols = g[:, None] * GROUP_N + c[None, :]
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0)
    if GELU:
        y = gelu_tanh_mul(gate, up)
    else:
        y = silu_mul(gate, up)
    y = y.to(gate.dtype).to(tl.float32)  # the product as silu_and_mul stores it; the padding is 0
    scale, codes = _row_scale_codes(y)
    tl.store(s_ptr + row * stride_s, scale)
    tl.store(q_ptr + row * stride_q + cols, codes.to(q_ptr.dtype.element_ty), mask=mask)


def act_and_mul_quantize_fp8(x: torch.Tensor, gelu: bool = False,
                             num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x = gate | up [M, 2I] (16-bit, rows contiguous) -> (e4m3 [M, I], fp32 scales [M, 1]): the codes and scales
    of quantize_fp8(silu_and_mul(x), per_group=False), bit for bit; gelu: of gelu_tanh(gate) * up.
    num_warps: a program's (one row's) warps, for sweeps."""
    M, I2 = x.shape
    assert x.stride(-1) == 1 and I2 % 2 == 0
    I = I2 // 2
    groups = triton.next_power_of_2(triton.cdiv(I, GROUP))
    codes = torch.empty((M, I), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M:  # the row lives in registers: 16 warps from 8k columns keep it at <= 64 values a thread
        warps = num_warps or (16 if I >= 8192 else 8 if I >= 4096 else 4)  # H200: 16 warps 14.3 us, 8 18.4 (M=352)
        _act_mul_quantize_kernel[(M,)](x, codes, scales, I, x.stride(0), codes.stride(0), scales.stride(0),
                                       GROUPS=groups, GROUP_N=GROUP, GELU=gelu, num_warps=warps,
                                       **pdl.launch_options(x.device))
    return codes, scales
