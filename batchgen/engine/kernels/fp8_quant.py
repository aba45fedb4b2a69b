"""RMSNorm with its output quantized for the FP8 decode GEMM (kernels/fp8_skinny_gemm.py).

In an FP8 decode layer the norm before qkv_proj and gate_up_proj writes e4m3 codes and one fp32 scale
per token per 128 columns (quant.fp8.Fp8Rows) instead of 16-bit rows: the GEMM after it reads half the
activation bytes and quantizes nothing itself. The values are quantize_activation_groups(rms_norm(x)):
the norm rounded to the model dtype exactly as fused.rms_norm writes it, then quantized.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
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
    scale = tl.maximum(tl.max(tl.abs(y), 1) / E4M3_MAX, 1e-12)  # [GROUPS]
    codes = tl.clamp(y / scale[:, None], -E4M3_MAX, E4M3_MAX)
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
