"""An FP8 checkpoint's own weights as Fp8Linears: no requantization, the stored e4m3 codes and scales.

The loader keeps each FP8 linear as stored (fp8_weights.QuantizedLinear, keyed by checkpoint name, with
the rows of our fused qkv_proj / gate_up_proj it fills). Here the parts of a fused projection are stacked
in row order and their scales become one per output row (a per-tensor scale is every row's). Block-wise
scales (128 x 128, DeepSeek / Qwen3 FP8) are not per-row: those projections stay dequantized.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .apply import PROJECTIONS
from .fp8_linear import Fp8Linear


def checkpoint_linears(model: nn.Module) -> dict[str, Fp8Linear]:
    """"layers.{i}.{projection}" -> Fp8Linear from the checkpoint's FP8 weights (on the model's device),
    for every projection whose parts all have per-channel or per-tensor scales. Empty for a plain
    checkpoint or one loaded without keep_quantized."""
    kept = getattr(getattr(model, "fp8_checkpoint", None), "linears", None) or {}
    parts: dict[str, list] = defaultdict(list)
    for q in kept.values():
        parts[q.target.removesuffix(".weight")].append(q)
    out: dict[str, Fp8Linear] = {}
    for path, group in parts.items():
        if any(q.kind == "block" for q in group):
            continue
        group.sort(key=lambda q: q.rows[0] if q.rows else 0)
        module = model.get_submodule(path)
        if sum(q.weight.shape[0] for q in group) != module.weight.shape[0]:
            continue  # not every part of the fused projection is FP8 in the checkpoint
        device = module.weight.device
        weight = torch.cat([q.weight for q in group]).to(device)
        scale = torch.cat([q.scale.reshape(-1).expand(q.weight.shape[0]) for q in group]).to(device)
        out[path] = Fp8Linear.from_quantized(weight, scale, module.bias)
    return out


def covers_every_projection(model: nn.Module, linears: dict[str, Fp8Linear]) -> bool:
    """Whether the checkpoint's FP8 weights stand in for every projection apply_fp8 swaps."""
    n_layers = len(getattr(model, "layers", ()))
    return n_layers > 0 and all(f"layers.{i}.{p}" in linears for i in range(n_layers) for p in PROJECTIONS)
