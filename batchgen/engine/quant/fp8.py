"""FP8 (e4m3) numerics: row-wise scales, quantize and dequantize.

One recipe for weights and activations: each row (a weight's output channel, an activation's token)
gets an fp32 scale amax(|row|) / 448, so the row's largest magnitude lands on e4m3's largest finite
value and nothing saturates. The GPU path (fp8_linear.py, torch._scaled_mm) and the CPU emulation
both quantize with these functions: the only difference between them is the GEMM's accumulation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(float8_e4m3fn).max: e4m3fn has no inf, 0x7f/0xff are NaN
# an all-zero row gets this scale instead of 0 (its codes are all 0 either way, and 0 / 0 is NaN)
MIN_SCALE = 1e-12
E4M3_REL_ERR = 2.0 ** -4  # round-to-nearest with 3 mantissa bits: half an ulp, relative, for normals
E4M3_MIN_NORMAL = 2.0 ** -6  # below this (in scaled units) e4m3 is subnormal: absolute error 2^-10


def row_scales(t: torch.Tensor) -> torch.Tensor:
    """fp32 scale per row of `t` ([..., K] -> [..., 1]): amax(|row|) / 448."""
    amax = t.abs().amax(dim=-1, keepdim=True).float()
    # a divisor on the tensor's device: CUDA torch turns division by a Python number into a multiply by its
    # reciprocal (an ulp off now and then), the CPU and the Triton kernels divide (IEEE): one recipe everywhere
    return (amax / amax.new_full((), E4M3_MAX)).clamp_(min=MIN_SCALE)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [..., K] -> (e4m3 codes [..., K], fp32 scale [..., 1]) with t ~= codes * scale. The division
    is in fp32 and the clamp only guards rounding (|t| / scale <= 448 by construction)."""
    scale = row_scales(t)
    codes = (t.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes, scale


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear's weight [N, K] (HF layout, out x in) -> (e4m3 [N, K], fp32 scale [N]): one scale per
    output channel."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight takes a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    codes, scale = quantize_rows(w.detach())
    return codes, scale.view(-1)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization of activations x [M, K] -> (e4m3 [M, K], fp32 scale [M, 1])."""
    return quantize_rows(x)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes [R, K] times their fp32 row scales ([R] or [R, 1]), in float32."""
    return codes.float() * scale.float().reshape(-1, 1)


@dataclass(frozen=True)
class Fp8Rows:
    """Activations already in FP8 for the decode GEMM: e4m3 codes [M, K] and one fp32 scale per token per
    128 columns [M, ceil(K / 128)] (quantize_activation_groups' recipe), as one kernel hands them to the next."""
    codes: torch.Tensor
    scales: torch.Tensor

    def dequantize(self, group: int = 128) -> torch.Tensor:
        return self.codes.float() * self.scales.repeat_interleave(group, dim=1)[:, : self.codes.shape[1]]


def quantize_activation_groups(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scale [M, ceil(K / group)]): one scale per token per `group`
    columns (the last group may be short), the decode kernel's W8A8 recipe (kernels/fp8_skinny_gemm.py)."""
    M, K = x.shape
    padded = torch.nn.functional.pad(x.float(), (0, (-K) % group)).view(M, -1, group)
    codes, scale = quantize_rows(padded)
    return codes.view(M, -1)[:, :K], scale.view(M, -1)


def emulate_skinny(x: torch.Tensor | Fp8Rows, w: torch.Tensor, w_scale: torch.Tensor, act_fp8: bool,
                   group: int = 128) -> torch.Tensor:
    """What the FP8 decode GEMM computes, in float32 on any device: x [M, K] @ dequantized w [N, K].T,
    with x quantized per token per group (act_fp8) or taken as it is (W8A16)."""
    if isinstance(x, Fp8Rows):
        xf = x.dequantize(group)
    elif act_fp8:
        xf = Fp8Rows(*quantize_activation_groups(x, group)).dequantize(group)
    else:
        xf = x.float()
    return xf @ dequantize(w, w_scale).t()
