"""The FP8 (e4m3) KV cache: the numerics every attention backend shares, and the per-layer scales.

A cache in float8_e4m3fn holds codes, one fp32 scale for K and one for V per layer:
    stored = e4m3(clamp(x / scale, -448, 448))     (x in fp32, IEEE division, round to nearest even)
    read   = float32(stored) * scale
The Triton kernels do exactly this (write: the same division and saturation; read: the codes converted
to the query's dtype, which holds every e4m3 value exactly, with the k scale folded into the softmax scale
and the v scale into the output); the torch backend does it literally. K is quantized after RoPE.

Scales come from the checkpoint where it has them (`k_scale` / `v_scale` per layer, as llm-compressor
and vLLM write them; see read_kv_scales for the names), else DEFAULT_SCALE. The scale rides on the cache
tensor itself (`cache.kv_scale`, a Python float set once when the runner allocates it): the model code
passes caches as it always has, and the kernels take the scale as a plain float argument, which a CUDA
graph captures once (scales never change after load).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("batchgen.engine")

KV_FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value (it has no inf): larger magnitudes saturate
# Without checkpoint scales the codes are the values themselves (vLLM's default too): e4m3 keeps 3
# mantissa bits from 2^-6 to 448, and a trained model's post-RoPE K and its V sit well inside that range
# (|x| of order 0.1 to 20); only values below 2^-6 lose relative precision (absolute error <= 2^-10).
DEFAULT_SCALE = 1.0
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "fp8": KV_FP8}
# layer i's scale: ...layers.{i}.self_attn.k_scale, ...self_attn.k_proj.k_scale, ...self_attn.attn.k_scale,
# one kv_scale for both, or AutoFP8's k_proj.output_scale / v_proj.output_scale
_SCALE_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?(?:(k|v|kv)_scale|(k|v)_proj\.output_scale)$")


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensors' dtype for Engine(kv_cache_dtype=...): "auto" is the model's."""
    return model_dtype if kv_cache_dtype == "auto" else _DTYPES[kv_cache_dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return "fp8 e4m3" if dtype == KV_FP8 else str(dtype).removeprefix("torch.")


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == KV_FP8


def scale_of(cache: torch.Tensor) -> float:
    """The scale a cache's codes are read with (1.0 for a cache that holds plain values)."""
    return float(getattr(cache, "kv_scale", DEFAULT_SCALE)) if cache.dtype == KV_FP8 else 1.0


def set_scale(cache: torch.Tensor, scale: float) -> torch.Tensor:
    cache.kv_scale = float(scale)  # a plain attribute on this tensor object: the backends read it back
    return cache


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x -> e4m3 codes: x / scale in fp32, saturated at +-448, rounded to nearest even."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(KV_FP8)


def dequantize(codes: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.float() * scale).to(dtype)


def to_cache(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """New K or V rows as `cache` stores them: codes for an fp8 cache, else the cache's dtype."""
    return quantize(x, scale_of(cache)) if cache.dtype == KV_FP8 else x.to(cache.dtype)


def raw(t: torch.Tensor) -> torch.Tensor:
    """An e4m3 tensor as its bytes (uint8, same strides), anything else as it is: indexing and scatter then
    need no float8 kernels, which not every torch build has on every device."""
    return t.view(torch.uint8) if t.dtype == KV_FP8 else t


def from_cache(rows: torch.Tensor, cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows read from `cache` (or from raw(cache)) as values in `dtype` (dequantized for an fp8 cache)."""
    if cache.dtype != KV_FP8:
        return rows.to(dtype)
    return dequantize(rows.view(KV_FP8) if rows.dtype == torch.uint8 else rows, scale_of(cache), dtype)


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one token over every layer (the fp32 scales are per layer: nothing per token)."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


@dataclass(frozen=True)
class KVScales:
    k: tuple[float, ...]  # per layer
    v: tuple[float, ...]
    from_checkpoint: int  # layers whose scales the checkpoint gave

    @classmethod
    def default(cls, num_layers: int) -> KVScales:
        return cls((DEFAULT_SCALE,) * num_layers, (DEFAULT_SCALE,) * num_layers, 0)

    def describe(self) -> str:
        n = len(self.k)
        if self.from_checkpoint == n:
            return "k/v scales from the checkpoint"
        if self.from_checkpoint == 0:
            return f"k/v scales {DEFAULT_SCALE} (the checkpoint has none)"
        return f"k/v scales from the checkpoint for {self.from_checkpoint} of {n} layers, {DEFAULT_SCALE} elsewhere"


def read_kv_scales(model_dir: Path | None, num_layers: int) -> KVScales:
    """Per-layer K and V scales from the checkpoint's safetensors (any format: compressed-tensors with a
    kv_cache_scheme, FP8 weight checkpoints, plain ones), DEFAULT_SCALE for layers it has none for. A
    scale of more than one element (per head) counts as its largest: nothing saturates that would not."""
    from safetensors import safe_open

    from .fp8_checkpoint import Fp8CheckpointError

    found: dict[tuple[str, int], float] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")) if model_dir is not None else []:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                m = _SCALE_NAME.search(name)
                if m is None:
                    continue
                layer, which = int(m.group(1)), m.group(2) or m.group(3)
                t = st.get_tensor(name).float()
                value = float(t.max()) if t.numel() else 0.0
                if not (value > 0 and value < float("inf")):
                    raise Fp8CheckpointError(f"{name} = {value}: a KV cache scale must be a finite number > 0")
                if layer >= num_layers:
                    raise Fp8CheckpointError(f"{name}: layer {layer}, but the model has {num_layers} layers")
                for kind in ("k", "v") if which == "kv" else (which,):
                    found[kind, layer] = max(found.get((kind, layer), 0.0), value)
    given = sum(("k", i) in found and ("v", i) in found for i in range(num_layers))
    scales = KVScales(tuple(found.get(("k", i), DEFAULT_SCALE) for i in range(num_layers)),
                      tuple(found.get(("v", i), DEFAULT_SCALE) for i in range(num_layers)), given)
    if 0 < len(found) < 2 * num_layers:
        log.info("FP8 KV cache: %s", scales.describe())
    return scales
