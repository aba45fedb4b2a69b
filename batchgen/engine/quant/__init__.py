"""Quantized weights for the engine: FP8 (e4m3) with per-channel weight and per-token activation scales.

    from batchgen.engine.quant import apply_fp8, Fp8Linear
    summary = apply_fp8(model)       # after the model loads, before the GPU linear layout
"""
from __future__ import annotations

from .apply import PROJECTIONS, Fp8Summary, apply_fp8
from .fp8 import E4M3, E4M3_MAX, dequantize, quantize_activation, quantize_rows, quantize_weight
from .fp8_linear import Fp8Linear, fp8_tensor_cores

__all__ = ["PROJECTIONS", "Fp8Summary", "apply_fp8", "E4M3", "E4M3_MAX", "dequantize", "quantize_activation",
           "quantize_rows", "quantize_weight", "Fp8Linear", "fp8_tensor_cores"]
