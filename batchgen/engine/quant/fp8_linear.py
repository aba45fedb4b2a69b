"""Fp8Linear: a projection whose weight is held in e4m3 with one fp32 scale per output channel.

forward(x), on a CUDA device with FP8 tensor cores (capability >= 8.9):
  - decode-sized x (at most BATCHGEN_FP8_DECODE_MAX_M rows, default 64): the Triton FP8 skinny GEMM
    (kernels/fp8_skinny_gemm.py; x in e4m3 per token per 128 columns, or bf16: BATCHGEN_FP8_DECODE_ACT),
    which also gives the fused decode layer its epilogues (normed / add_to, as
    linear_layout.InputMajorLinear);
  - larger x: x quantized per token (kernels/fp8_quant.quantize_fp8, fp8.quantize_activation's codes),
    then the Triton FP8 GEMM (kernels/fp8_gemm.py: both scales and a residual add in its epilogue), or
    above BATCHGEN_FP8_GEMM_MAX_M rows torch._scaled_mm with row-wise scales (x's [M, 1], the weight's [1, N]);
    from_norm (the unfused layer's qkv_proj / gate_up_proj) has the norm before it write those codes itself;
anywhere else (the CPU, older GPUs, shapes _scaled_mm refuses): the same numerics emulated, both operands
dequantized and multiplied in float32. _scaled_mm and the emulation quantize alike, so they differ only in
accumulation order; fp8.emulate_skinny is the decode kernel's recipe in float32.

It is deliberately not an nn.Linear: linear_layout.make_input_major swaps nn.Linear only, so the
bf16 input-major / skinny-GEMM / fused-decode layout never touches an FP8 projection.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from . import fp8
from .. import fused_ops
from ..switches import Switches, switches

_ALIGN = 16  # _scaled_mm needs K and N multiples of 16
DecodeConfig = tuple[int, int, int, int, int]  # the FP8 skinny GEMM's BN, BK, SPLIT_K, num_warps, num_stages
# swept at M=32 on the H200 (benchmarks/gemm_sweep.py --fp8, kernels alone), keyed by (in, out); others take the
# default (W8A8; the fastest at M=8 too but for qkv_proj, where it ties). gate_up's BN = 128 lets its epilogue
# hand down_proj quantized rows (one 128-column group per program). q/k/v and down_proj then A/B'd in the whole
# seed step (BATCHGEN_SKINNY_CONFIGS "fp8:K,N" entries; results/2026-12-04-h200-fp8-decode-configs.jsonl): fewer,
# deeper programs than their fastest alone (down split 4 / 6 stages: 4.059 ms a step against 4.110 with split 8 /
# 4 stages; q/k/v split 2 / 6 stages on top: 4.050).
FP8_TUNED: dict[tuple[int, int], DecodeConfig] = {
    (4096, 6144): (64, 128, 2, 4, 6), (4096, 4096): (128, 128, 4, 8, 6),
    (4096, 28672): (128, 128, 1, 8, 4), (14336, 4096): (128, 128, 4, 8, 6),
}


def swept_decode_config(sw: Switches, in_features: int, out_features: int) -> DecodeConfig | None:
    """A swept decode config from BATCHGEN_SKINNY_CONFIGS's "fp8:K,N" entry (benchmarks), else None."""
    if not sw.skinny_configs:
        return None
    from ..models.linear_layout import config_from_file

    key = f"fp8:{in_features},{out_features}"
    config = config_from_file(sw.skinny_configs, key)
    if config is not None and config[1] != 128:  # the kernel's BK is the activations' 128-column group
        raise ValueError(f"BATCHGEN_SKINNY_CONFIGS={sw.skinny_configs}: entry {key!r} is {list(config)}, but the FP8 "
                         "decode GEMM's BK (the second number) must be 128")
    return config


@functools.lru_cache(maxsize=None)
def fp8_tensor_cores(device: torch.device) -> bool:
    """Whether `device` runs row-wise-scaled FP8 GEMMs: CUDA capability >= 8.9 and a tiny
    torch._scaled_mm that works (a build without the row-wise kernel says so by raising)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) < (8, 9) or not hasattr(torch, "_scaled_mm"):
        return False
    try:
        a = torch.ones(16, 32, device=device).to(fp8.E4M3)
        b = torch.ones(16, 32, device=device).to(fp8.E4M3)
        torch._scaled_mm(a, b.t(), scale_a=torch.ones(16, 1, device=device),
                         scale_b=torch.ones(1, 16, device=device), out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


class Fp8Linear(nn.Module):
    """y = x @ W.T (+ bias) with W = weight (e4m3, [N, K]) * weight_scale (fp32, [N])."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dtype != fp8.E4M3 or weight.dim() != 2:
            raise ValueError(f"Fp8Linear: weight must be a 2-D {fp8.E4M3} tensor, got {weight.dtype} "
                             f"of shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        if weight_scale.numel() == 1:  # a per-tensor scale (some FP8 checkpoints) is every row's
            weight_scale = weight_scale.reshape(1).expand(self.out_features)
        if weight_scale.numel() != self.out_features:
            raise ValueError(f"Fp8Linear: weight_scale needs one scale per output channel ({self.out_features}), "
                             f"got shape {tuple(weight_scale.shape)}")
        # buffers, not parameters: model.parameters() (the engine reads its dtype there) stays in the model dtype
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.detach().float().reshape(-1).contiguous())
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        self._dequantized: torch.Tensor | None = None  # CPU emulation: fp32 weight, built once
        self._place()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        """Quantize an nn.Linear's weight per output channel (on its own device)."""
        codes, scale = fp8.quantize_weight(linear.weight)
        return cls(codes, scale, linear.bias)

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> "Fp8Linear":
        """From an e4m3 weight [N, K] and its scales as an FP8 checkpoint stores them: one per output channel
        ([N] or [N, 1], compressed-tensors' channel strategy) or one for the tensor; no requantization."""
        return cls(weight, weight_scale, bias)

    def _tensor_cores_here(self) -> bool:
        """Whether forward runs torch._scaled_mm (FP8 tensor cores) where the weight is now, or is emulated.
        Decided once per placement (here and after a move), not per call: the step path stays cheap."""
        aligned = self.in_features % _ALIGN == 0 and self.out_features % _ALIGN == 0
        return aligned and fp8_tensor_cores(self.weight.device)

    def _place(self) -> None:
        """The paths for where the weight is now: the Triton FP8 GEMMs and _scaled_mm, or the emulation."""
        self.uses_tensor_cores = self._tensor_cores_here()
        self.skinny: DecodeConfig | None = None  # the FP8 skinny GEMM's config, None = not used here
        self._skinny_max_m = self._gemm_max_m = 0
        sw = switches()
        if self.uses_tensor_cores and sw.fp8_skinny:  # triton is imported only where it is used
            from ..kernels import fp8_quant, fp8_skinny_gemm as kernel
            from ..kernels.fp8_gemm import fp8_gemm

            self._kernel, self._skinny_max_m = kernel.fp8_skinny_gemm, max(0, min(sw.fp8_decode_max_m, kernel.MAX_M))
            self._gemm, self._gemm_max_m = fp8_gemm, sw.fp8_gemm_max_m
            self._rms_norm_fp8, self._quantize_fp8 = fp8_quant.rms_norm_fp8, fp8_quant.quantize_fp8
            self._rms_norm_quantize = fp8_quant.rms_norm_quantize_fp8
            self._act_and_mul_quantize = fp8_quant.act_and_mul_quantize_fp8
            self._quantize_on_load_rows = kernel.MAX_M_QUANTIZE_ON_LOAD
            self._act_fp8 = sw.fp8_decode_act == "fp8"
            sms = torch.cuda.get_device_properties(self.weight.device).multi_processor_count
            shape = (self.in_features, self.out_features)
            tuned = swept_decode_config(sw, *shape) or FP8_TUNED.get(shape)
            self._prefetch = sw.fp8_skinny_prefetch
            self.skinny = tuned or kernel.default_config(self.out_features, self.in_features, sms)
            self._gate_config = tuned or kernel.default_config(self.out_features // 2, self.in_features, sms, gated=True)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # .to(device) / .cuda() move the buffers: the path and the CPU cache follow the weight
        out = super()._apply(fn, recurse)
        self._dequantized = None
        self._place()
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the FP8 GEMM multiplies by, in float32 [N, K]."""
        return fp8.dequantize(self.weight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self._skinny_rows(x2):
            y = self._decode(x2, x.dtype)
        elif self._gemm_rows(x2):
            y = self._triton_gemm(x2)
        else:
            y = self._scaled_mm(x2) if x.is_cuda and self.uses_tensor_cores else self._emulated(x2)
        return y.view(*lead, self.out_features)

    # ------------------------------------------------------------------ decode (the fused layer's API)
    def _skinny_rows(self, x: torch.Tensor | fp8.Fp8Rows) -> bool:
        x = x.codes if isinstance(x, fp8.Fp8Rows) else x
        return x.is_cuda and 0 < x.shape[0] <= self._skinny_max_m and x.stride(-1) == 1

    def _decode(self, x: torch.Tensor | fp8.Fp8Rows, dtype: torch.dtype, **epilogue) -> torch.Tensor | fp8.Fp8Rows:
        config = self._gate_config if epilogue.get("gated") else self.skinny
        if self._act_fp8 and not isinstance(x, fp8.Fp8Rows) and x.shape[0] > self._quantize_on_load_rows:
            x = fp8.Fp8Rows(*self._quantize_fp8(x, per_group=True))  # once, not by every program of the GEMM
        return self._kernel(x, self.weight, self.weight_scale, self.bias, act_fp8=self._act_fp8, config=config,
                            dtype=dtype, prefetch=self._prefetch, **epilogue)

    @property
    def can_gate(self) -> bool:
        """Whether decode steps can fold SiLU-and-mul into this (gate | up) projection's epilogue."""
        return self.skinny is not None

    def normed(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
               gated: bool = False) -> torch.Tensor | fp8.Fp8Rows:
        """rms_norm(x) @ W.T for decode-sized x (the fused layer); gated (needs can_gate): W is gate | up and
        the result SiLU(gate) * up, handed on as Fp8Rows where the epilogue can quantize it (W8A8, BN = 128).
        W8A8: the norm writes its output quantized (kernels/fp8_quant.py)."""
        w8a8 = self._act_fp8 and self._skinny_rows(x)
        h = self._rms_norm_fp8(x, norm_weight, eps) if w8a8 else fused_ops.rms_norm(x, norm_weight, eps)
        if not gated:
            return self._decode(h, x.dtype) if self._skinny_rows(h) else self(h)
        return self._decode(h, x.dtype, gated=True, out_fp8=w8a8 and self._gate_config[0] == 128)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor | fp8.Fp8Rows) -> torch.Tensor:
        """residual += x @ W.T (+ bias), in place; in the GEMM's epilogue for decode-sized x."""
        if self._skinny_rows(x):
            return self._decode(x, residual.dtype, residual=residual, out=residual)
        if self._gemm_rows(x):
            return self._triton_gemm(x, residual=residual, out=residual)
        return residual.add_(self(x))

    def of_gated(self, gate_up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """self(silu(gate) * up) for gate_up = gate | up (gelu: Gemma's gelu_tanh(gate) * up), the MLP's
        down projection. Above decode size on FP8 tensor cores the product comes quantized from one kernel
        (fp8_quant.act_and_mul_quantize_fp8, the same codes as quantizing silu_and_mul's output)."""
        g2 = gate_up.reshape(-1, gate_up.shape[-1])
        if (self.skinny is None or not g2.is_cuda or g2.shape[0] <= self._skinny_max_m
                or g2.dtype not in (torch.bfloat16, torch.float16)):
            act = fused_ops.gelu_tanh_and_mul if gelu else fused_ops.silu_and_mul
            return self(act(gate_up))
        xq, xs = self._act_and_mul_quantize(g2.contiguous(), gelu)
        if g2.shape[0] <= self._gemm_max_m:
            y = self._gemm(xq, xs, self.weight, self.weight_scale, self.bias, dtype=g2.dtype)
        else:
            y = self._scaled_mm_quantized(xq, xs, g2.dtype)
        return y.view(*gate_up.shape[:-1], self.out_features)

    def from_norm(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                  offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(h), new_residual) for h, new_residual = fused_ops.rms_norm(x, norm_weight, eps, residual,
        offset=offset); without a residual new_residual is x (the layer's residual stream either way). On the
        Triton FP8 GEMM's rows (above decode size) the norm writes h's codes and scales itself
        (fp8_quant.rms_norm_quantize_fp8, quantize_fp8(h)'s bit for bit): one launch where there were two."""
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= self._skinny_max_m or not self._gemm_rows(x2):  # decode rows, _scaled_mm's, the emulation
            if residual is None:
                return self(fused_ops.rms_norm(x, norm_weight, eps, offset=offset)), x
            h, residual = fused_ops.rms_norm(x, norm_weight, eps, residual, offset=offset)
            return self(h), residual
        r2 = residual.reshape(x2.shape) if residual is not None else None
        xq, xs, new_residual = self._rms_norm_quantize(x2, norm_weight, eps, r2, offset)
        y = self._gemm(xq, xs, self.weight, self.weight_scale, self.bias, dtype=x.dtype)
        return y.view(*x.shape[:-1], self.out_features), x if residual is None else new_residual.view(x.shape)

    def _gemm_rows(self, x: torch.Tensor | fp8.Fp8Rows) -> bool:
        return (isinstance(x, torch.Tensor) and x.is_cuda and 0 < x.shape[0] <= self._gemm_max_m
                and x.dtype in (torch.bfloat16, torch.float16))

    def _triton_gemm(self, x: torch.Tensor, **epilogue) -> torch.Tensor:
        xq, xs = self._quantize_fp8(x.contiguous(), per_group=False)
        return self._gemm(xq, xs, self.weight, self.weight_scale, self.bias, dtype=x.dtype, **epilogue)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty(0, self.out_features)
        x = x.contiguous()
        # one Triton launch where it can (the same codes and scales as the torch ops)
        xq, xs = self._quantize_fp8(x, per_group=False) if self.skinny is not None else fp8.quantize_activation(x)
        return self._scaled_mm_quantized(xq, xs, x.dtype)

    def _scaled_mm_quantized(self, xq: torch.Tensor, xs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # second operand column-major: the row-major [N, K] weight's transpose; scales [M, 1] and [1, N]
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale.view(1, -1),
                             out_dtype=torch.bfloat16)
        if self.bias is not None:  # after the GEMM: row-wise _scaled_mm takes no bias on every build
            y = y + self.bias
        return y if y.dtype == dtype else y.to(dtype)

    def _emulated(self, x: torch.Tensor) -> torch.Tensor:
        """The same numerics in float32: per-token quantize, dequantize both, matmul, cast."""
        xq, xs = fp8.quantize_activation(x)
        y = fp8.dequantize(xq, xs) @ self._weight_f32().t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def _weight_f32(self) -> torch.Tensor:
        # cached on the CPU (the emulation is there for numerics, and re-dequantizing every step is
        # the slow part); on a GPU without FP8 it is rebuilt per call, so the weights stay 1 byte each
        if self.weight.device.type != "cpu":
            return self.dequantized_weight()
        if self._dequantized is None or self._dequantized.device != self.weight.device:
            self._dequantized = self.dequantized_weight()
        return self._dequantized

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=e4m3 per-channel")
